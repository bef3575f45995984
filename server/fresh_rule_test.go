package server

import (
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// agedView is a policy over the harness's static owners whose ownership
// view is read at readAt, as WireGuard's (freshPolicy): FreshenAt "reads"
// (readAt = now) when the view began more than bound before the
// request's arrival, and Authorize records the view each judgement saw.
type agedView struct {
	*policy.Policy
	bound time.Duration

	mu     sync.Mutex
	readAt time.Time
	reads  int
	judged []time.Time // readAt at each Authorize
}

func (v *agedView) Stale() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return time.Since(v.readAt) > v.bound
}

func (v *agedView) FreshenAt(at time.Time) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if at.Sub(v.readAt) > v.bound {
		v.readAt = time.Now()
		v.reads++
	}
}

func (v *agedView) Authorize(r policy.Request) (policy.Owner, policy.Reason) {
	v.mu.Lock()
	v.judged = append(v.judged, v.readAt)
	v.mu.Unlock()
	return v.Policy.Authorize(r)
}

// TestFreshViewForEveryOpeningRequest (h/fresh; h/hunt2's MEDIUM
// availability: TestWireGuardDeviceSwapFirstMapping): with an ownership
// whose view may lag (WireGuard), every request that opens or extends a
// pinhole (PCP MAP and PEER, a renewal, a NAT-PMP mapping; THIRD_PARTY
// or not) is judged, in the socket reader's early check and in the
// engine, by a view whose read began no more than the fresh bound before
// it arrived: the reader hands one that finds the view stale to the
// THIRD_PARTY queue (earlyDeferred), whose judging waits for a read
// (FreshenAt), and the engine then sees that view. Deletes, ANNOUNCE and
// the NAT-PMP address request cost no read. A view within the bound is
// not re-read. Before, only a THIRD_PARTY target was: an own-source MAP,
// PEER or NAT-PMP mapping went to the engine and was judged by the view
// read an hour before it (here): on h/hunt2's code, 'stale view true: the
// socket reader's verdict 0, want handed to the queue true' for the PCP
// MAP, its renewal, PEER and both NAT-PMP mappings.
func TestFreshViewForEveryOpeningRequest(t *testing.T) {
	h := newHarness(t)
	pol, err := policy.New(h.pcfg, h.own)
	if err != nil {
		t.Fatal(err)
	}
	v := &agedView{Policy: pol, bound: time.Minute}
	h.startWith(func(d *Deps) { d.Policy = v }, nil)
	pcpReq := func(r *pcp.Request) []byte { return pcp.AppendRequest(nil, r) }
	pmp := func(op pcp.PMPOpcode, port uint16, life time.Duration) []byte {
		return pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: op, InternalPort: port, Lifetime: life})
	}
	tp := mapReq(addrA, pcp.ProtoTCP, 8443, 0, time.Hour, 9)
	tp.Options.ThirdParty = addrA2
	for _, tc := range []struct {
		name  string
		src   netip.Addr
		b     []byte
		opens bool
	}{
		{"PCP MAP", addrA, pcpReq(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)), true},
		{"PCP MAP renewal", addrA, pcpReq(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)), true},
		{"PCP PEER", addrA, pcpReq(peerReq(addrA, pcp.ProtoTCP, 444, remote, time.Hour, 2)), true},
		{"PCP THIRD_PARTY MAP", addrA, pcpReq(tp), true},
		{"NAT-PMP TCP mapping", v4A, pmp(pcp.PMPOpMapTCP, 9300, time.Hour), true},
		{"NAT-PMP UDP mapping renewal", v4A, pmp(pcp.PMPOpMapUDP, 9300, time.Hour), true},
		{"PCP MAP delete", addrA, pcpReq(mapReq(addrA, pcp.ProtoTCP, 443, 0, 0, 1)), false},
		{"NAT-PMP delete", v4A, pmp(pcp.PMPOpMapTCP, 9300, 0), false},
		{"NAT-PMP address request", v4A, pmp(pcp.PMPOpAddress, 0, 0), false},
		{"ANNOUNCE", addrA, pcpReq(pcp.NewAnnounce(addrA)), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, stale := range []bool{true, false} {
				v.mu.Lock()
				v.readAt, v.reads, v.judged = time.Now(), 0, nil
				if stale {
					v.readAt = v.readAt.Add(-time.Hour)
				}
				v.mu.Unlock()
				src := netip.AddrPortFrom(tc.src, 40000)
				local := local6
				if tc.src.Is4() {
					local = local4
				}
				sent := time.Now()
				_, verdict := h.s.earlyIn(nil, nil, tc.b, src, netip.Addr{}, "", h.clock.Now(), time.Time{}, true)
				if want := stale && tc.opens; (verdict == earlyDeferred) != want {
					t.Fatalf("stale view %v: the socket reader's verdict %v, want handed to the queue %v", stale, verdict, want)
				}
				if verdict == earlyDeferred {
					// The queue's judging (judgeQueued), arrived = sent.
					if _, v := h.s.earlyIn(nil, nil, tc.b, src, netip.Addr{}, "", h.clock.Now(), sent, false); v != earlyEngine {
						t.Fatalf("stale view: the queue's verdict %v, want for the engine", v)
					}
				}
				if verdict != earlyAnswered {
					h.s.Handle(local, src, tc.b)
				}
				v.mu.Lock()
				reads, judged := v.reads, v.judged
				v.mu.Unlock()
				for _, at := range judged {
					if tc.opens && sent.Sub(at) > v.bound {
						t.Errorf("stale view %v: judged by a view read %v before it was sent, want within %v", stale, sent.Sub(at).Round(time.Minute), v.bound)
					}
				}
				if want := 0; (!stale || !tc.opens) && reads != want {
					t.Errorf("stale view %v: %d reads, want %d (a delete, ANNOUNCE, or a view within the bound reads nothing)", stale, reads, want)
				}
			}
		})
	}
}
