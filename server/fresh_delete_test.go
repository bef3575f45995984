package server

import (
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// swappedView is a policy over the harness's static owners whose view,
// while swapped, is WireGuard's between a device change (DevicesChanged)
// and the next read: it has no peers on the changed interface, so every
// source is nobody's (NoOwner), and it judges no request (Stale,
// SwapPending). FreshenAt "reads": the view has its owners again.
type swappedView struct {
	*policy.Policy

	mu      sync.Mutex
	swapped bool
	reads   int
}

func (v *swappedView) Stale() bool { return v.SwapPending() }

func (v *swappedView) SwapPending() bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.swapped
}

func (v *swappedView) FreshenAt(time.Time) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.swapped {
		v.swapped = false
		v.reads++
	}
}

func (v *swappedView) Authorize(r policy.Request) (policy.Owner, policy.Reason) {
	if v.SwapPending() {
		return policy.Owner{}, policy.NoOwner
	}
	return v.Policy.Authorize(r)
}

// TestDeleteWaitsForDeviceChangeRead (h/delwait; h/flake's left): a
// delete (PCP MAP of lifetime 0, NAT-PMP mapping of lifetime 0) that
// arrives while the ownership's view was read before the last device
// change (its interface's peers dropped until the re-read) is handed by
// the socket reader to the THIRD_PARTY queue, judged there after the
// read (FreshenAt) and granted: its lease and pinhole are gone. With the
// view read since the change, a delete is not handed over and costs no
// read. A flood of deletes from unowned sources during the change costs
// one read, and each is still refused NOT_AUTHORIZED by the fresh view.
// On main the delete was judged by the swapped view: 'PCP MAP delete,
// device change not read: the socket reader answered NOT_AUTHORIZED',
// 'NAT-PMP delete, ...: delete refused: NOT_AUTHORIZED' (by the engine).
func TestDeleteWaitsForDeviceChangeRead(t *testing.T) {
	h := newHarness(t)
	pol, err := policy.New(h.pcfg, h.own)
	if err != nil {
		t.Fatal(err)
	}
	v := &swappedView{Policy: pol}
	h.startWith(func(d *Deps) { d.Policy = v }, nil)
	for _, tc := range []struct {
		name   string
		src    netip.Addr
		open   []byte // the mapping, granted before the change
		del    []byte
		hole   pinhole.Pinhole             // its protocol, internal address and port
		result func([]byte) (string, bool) // the reply's result, and whether it is a success
	}{
		{
			"PCP MAP delete", addrA,
			pcp.AppendRequest(nil, mapReq(addrA, pcp.ProtoTCP, 443, 443, time.Hour, 1)),
			pcp.AppendRequest(nil, mapReq(addrA, pcp.ProtoTCP, 443, 0, 0, 1)),
			pinhole.Pinhole{Protocol: protoTCP, InternalAddr: addrA, InternalPort: 443},
			pcpReplyResult,
		},
		{
			"NAT-PMP delete", v4A,
			pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: pcp.PMPOpMapTCP, InternalPort: 9300, SuggestedExternalPort: 9300, Lifetime: time.Hour}),
			pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: pcp.PMPOpMapTCP, InternalPort: 9300}),
			pinhole.Pinhole{Protocol: protoTCP, InternalAddr: v4A, InternalPort: 9300},
			pmpReplyResult,
		},
	} {
		for _, swapped := range []bool{true, false} {
			what := tc.name + ", device change not read"
			if !swapped {
				what = tc.name + ", view read since"
			}
			t.Run(what, func(t *testing.T) {
				v.mu.Lock()
				v.swapped = false // whatever an earlier subtest left
				v.mu.Unlock()
				if r, ok := tc.result(h.raw(tc.src, tc.open)); !ok {
					t.Fatalf("mapping refused: %s", r)
				}
				if !holeOpen(h, tc.hole) {
					t.Fatalf("no pinhole %v after the mapping: %v", tc.hole, h.fw.Holes())
				}
				v.mu.Lock()
				v.swapped, v.reads = swapped, 0
				v.mu.Unlock()
				src := netip.AddrPortFrom(tc.src, 40000)
				sent := time.Now()
				reply, verdict := h.s.earlyIn(nil, nil, tc.del, src, netip.Addr{}, "", h.clock.Now(), time.Time{}, true)
				switch {
				case verdict == earlyAnswered:
					r, _ := tc.result(reply)
					t.Fatalf("the socket reader answered %s, want it handed to the queue %v (else to the engine)", r, swapped)
				case (verdict == earlyDeferred) != swapped:
					// The engine's judging (below) tells what came of it.
					t.Errorf("the socket reader's verdict %v (0: for the engine, 2: handed to the queue), want handed to the queue %v", verdict, swapped)
				}
				if verdict == earlyDeferred {
					// The queue's judging (judgeQueued), arrived = sent.
					if reply, v := h.s.earlyIn(nil, nil, tc.del, src, netip.Addr{}, "", h.clock.Now(), sent, false); v != earlyEngine {
						r, _ := tc.result(reply)
						t.Fatalf("the queue's verdict %v (1: answered %s), want for the engine", v, r)
					}
				}
				if r, ok := tc.result(h.raw(tc.src, tc.del)); !ok {
					t.Fatalf("delete refused: %s", r)
				}
				if holeOpen(h, tc.hole) {
					t.Errorf("pinhole %v left after the delete's SUCCESS", tc.hole)
				}
				v.mu.Lock()
				reads := v.reads
				v.mu.Unlock()
				if want := map[bool]int{true: 1, false: 0}[swapped]; reads != want {
					t.Errorf("%d reads, want %d", reads, want)
				}
			})
		}
	}
	t.Run("flood of unowned deletes during the change", func(t *testing.T) {
		v.mu.Lock()
		v.swapped, v.reads = true, 0
		v.mu.Unlock()
		const n = 200
		var srcs []netip.AddrPort
		for i := range n {
			a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0xff, 14: byte(i >> 8), 15: byte(i)})
			srcs = append(srcs, netip.AddrPortFrom(a, 40000))
		}
		sent := time.Now()
		for _, src := range srcs {
			del := pcp.AppendRequest(nil, mapReq(src.Addr(), pcp.ProtoTCP, 443, 0, 0, 1))
			if _, verdict := h.s.earlyIn(nil, nil, del, src, netip.Addr{}, "", h.clock.Now(), time.Time{}, true); verdict != earlyDeferred {
				t.Fatalf("delete from %v: the socket reader's verdict %v, want handed to the queue", src.Addr(), verdict)
			}
		}
		for _, src := range srcs {
			del := pcp.AppendRequest(nil, mapReq(src.Addr(), pcp.ProtoTCP, 443, 0, 0, 1))
			reply, verdict := h.s.earlyIn(nil, nil, del, src, netip.Addr{}, "", h.clock.Now(), sent, false)
			if r, _ := pcpReplyResult(reply); verdict != earlyAnswered || r != pcp.NotAuthorized.String() {
				t.Fatalf("delete from unowned %v, judged by the read view: verdict %v, %s; want answered NOT_AUTHORIZED", src.Addr(), verdict, r)
			}
		}
		v.mu.Lock()
		reads := v.reads
		v.mu.Unlock()
		if reads != 1 {
			t.Errorf("%d unowned deletes during the change: %d reads, want 1 (one read serves all that arrived before it)", n, reads)
		}
	})
}

// holeOpen reports whether h's firewall holds a pinhole to p's protocol,
// internal address and port.
func holeOpen(h *harness, p pinhole.Pinhole) bool {
	for q := range h.fw.Holes() {
		if q.Protocol == p.Protocol && q.InternalAddr == p.InternalAddr && q.InternalPort == p.InternalPort {
			return true
		}
	}
	return false
}

// pcpReplyResult is the result of the PCP reply b ("no reply" when nil).
func pcpReplyResult(b []byte) (string, bool) {
	if b == nil {
		return "no reply", false
	}
	var r pcp.Response
	if err := pcp.ParseResponse(b, &r); err != nil {
		return err.Error(), false
	}
	return r.Result.String(), r.Result == pcp.Success
}

// pmpReplyResult is the result of the NAT-PMP reply b ("no reply" when nil).
func pmpReplyResult(b []byte) (string, bool) {
	if b == nil {
		return "no reply", false
	}
	var r pcp.PMPResponse
	if err := pcp.ParsePMPResponse(b, &r); err != nil {
		return err.Error(), false
	}
	return r.Result.String(), r.Result == pcp.PMPSuccess
}
