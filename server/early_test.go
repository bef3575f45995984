package server

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestEarlyAnswersAsEngine: the socket readers' early answers (malformed
// requests, PKT-05..07 and VER-01; MAP and PEER refused by ownership,
// MAP-01's first step, and THIRD_PARTY for another client's address,
// TP-04) and ANNOUNCE (ANN-01, ANN-02, from any source) are byte for
// byte what the engine answers; everything that needs the lease table
// (allowed MAP and PEER, NAT-PMP) is left to the engine.
func TestEarlyAnswersAsEngine(t *testing.T) {
	h := newHarness(t)
	stranger := netip.MustParseAddr("2001:db8:ee::1")
	req := func(r *pcp.Request) []byte { return pcp.AppendRequest(nil, r) }
	tpOther := mapReq(addrA, pcp.ProtoTCP, 80, 0, time.Hour, 1)
	tpOther.Options.ThirdParty = addrB
	badOpcode := req(mapReq(addrA, pcp.ProtoTCP, 80, 0, time.Hour, 1))
	badOpcode[1] = 9
	short := req(mapReq(addrA, pcp.ProtoTCP, 80, 0, time.Hour, 1))[:30]
	v3 := req(mapReq(addrA, pcp.ProtoTCP, 80, 0, time.Hour, 1))
	v3[0] = 3
	odd := append(req(mapReq(addrA, pcp.ProtoTCP, 80, 0, time.Hour, 1)), 0, 0)
	for _, tc := range []struct {
		name    string
		src     netip.Addr
		b       []byte
		handled bool
	}{
		{"PKT-05 unsupported opcode", addrA, badOpcode, true},
		{"PKT-04 not a multiple of 4", addrA, odd, true},
		{"PKT-03 short", addrA, short, true},
		{"VER-01 version 3", addrA, v3, true},
		{"MAP-01 unowned source", stranger, req(mapReq(stranger, pcp.ProtoTCP, 80, 0, time.Hour, 1)), true},
		{"MAP-01 unowned source, delete", stranger, req(mapReq(stranger, pcp.ProtoTCP, 80, 0, 0, 1)), true},
		{"PEER unowned source", stranger, req(peerReq(stranger, pcp.ProtoTCP, 80, remote, time.Hour, 1)), true},
		{"TP-04 another client's address", addrA, req(tpOther), true},
		{"allowed MAP", addrA, req(mapReq(addrA, pcp.ProtoTCP, 80, 0, time.Hour, 1)), false},
		{"allowed PEER", addrA, req(peerReq(addrA, pcp.ProtoTCP, 80, remote, time.Hour, 1)), false},
		{"ANN-02 ANNOUNCE", addrA, req(pcp.NewAnnounce(addrA)), true},
		{"ANN-01 ANNOUNCE, lifetime 99", addrA, announceLifetime(99), true},
		{"ANN-02 ANNOUNCE from an unowned source", stranger, req(pcp.NewAnnounce(stranger)), true},
		{"NAT-PMP", v4A, []byte{0, 0}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := netip.AddrPortFrom(tc.src, 40000)
			got, handled := h.s.early(nil, tc.b, src, h.clock.Now())
			if handled != tc.handled {
				t.Fatalf("handled early: %v, want %v", handled, tc.handled)
			}
			if !handled {
				return
			}
			local := local6
			if tc.src.Is4() {
				local = local4
			}
			want := h.s.Handle(local, src, tc.b)
			if !bytes.Equal(got, want) {
				t.Fatalf("early answer\n% x\nengine's\n% x", got, want)
			}
		})
	}
}

// TestEarlyAllocs: the readers' answers to malformed and unauthorised
// requests, and their verdict on ones for the engine, allocate nothing
// (issue 8: at 100 k/s every allocation per packet is GC work on a core
// the load generator shares). Per-request logging is off, as in
// production (sampled, debug level).
func TestEarlyAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("allocation counts: the race detector drops sync.Pool items on purpose")
	}
	h := newHarness(t)
	h.s.plog = zap.NewNop()
	stranger := netip.MustParseAddr("2001:db8:ee::1")
	badOpcode := pcp.AppendRequest(nil, mapReq(addrA, pcp.ProtoTCP, 80, 0, time.Hour, 1))
	badOpcode[1] = 9
	for _, tc := range []struct {
		name    string
		src     netip.Addr
		b       []byte
		handled bool
	}{
		{"malformed", addrA, badOpcode, true},
		{"silent drop", addrA, []byte{2, 0x81, 0, 0}, true},
		{"unauthorised MAP", stranger, pcp.AppendRequest(nil, mapReq(stranger, pcp.ProtoTCP, 80, 0, time.Hour, 1)), true},
		{"unauthorised PEER", stranger, pcp.AppendRequest(nil, peerReq(stranger, pcp.ProtoTCP, 80, remote, time.Hour, 1)), true},
		{"allowed MAP, for the engine", addrA, pcp.AppendRequest(nil, mapReq(addrA, pcp.ProtoTCP, 80, 0, time.Hour, 1)), false},
		{"ANNOUNCE", addrA, pcp.AppendRequest(nil, pcp.NewAnnounce(addrA)), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := netip.AddrPortFrom(tc.src, 40000)
			dst := make([]byte, 0, 2048)
			now := h.clock.Now()
			if _, handled := h.s.early(dst, tc.b, src, now); handled != tc.handled {
				t.Fatalf("handled %v, want %v", handled, tc.handled)
			}
			if n := testing.AllocsPerRun(1000, func() { h.s.early(dst, tc.b, src, now) }); n != 0 {
				t.Errorf("%v allocations per request, want 0", n)
			}
		})
	}
}

// announceLifetime is an ANNOUNCE request with a requested lifetime,
// which ANN-01 says is ignored.
func announceLifetime(secs uint32) []byte {
	b := pcp.AppendRequest(nil, pcp.NewAnnounce(addrA))
	binary.BigEndian.PutUint32(b[4:8], secs)
	return b
}

// TestEarlyTally: a socket reader's early answers reach the shared
// request counters when its tally is flushed (once per batch), each
// counted once, also past the tally's room for kinds of answers.
func TestEarlyTally(t *testing.T) {
	h := newHarness(t)
	stranger := netip.MustParseAddr("2001:db8:ee::1")
	src := netip.AddrPortFrom(stranger, 40000)
	unauth := pcp.AppendRequest(nil, mapReq(stranger, pcp.ProtoTCP, 80, 0, time.Hour, 1))
	badOpcode := pcp.AppendRequest(nil, mapReq(stranger, pcp.ProtoTCP, 80, 0, time.Hour, 1))
	badOpcode[1] = 9
	counter := func(op string, res pcp.ResultCode) float64 {
		return counterValue(t, h.s.m.requests.WithLabelValues("pcp", op, res.String()))
	}
	for _, tc := range []struct {
		name   string
		filled int // kinds already in the tally
	}{
		{"room", 0},
		{"full", tallySize},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var tl tally
			for i := range tc.filled {
				tl.add(&h.s.lis.es, h.s.m, "filler", pcp.ResultCode(100+i))
			}
			before := [2]float64{counter("MAP", pcp.NotAuthorized), counter("other", pcp.UnsuppOpcode)}
			for range 3 {
				h.s.earlyTallied(&tl, nil, unauth, src, "", h.clock.Now())
				h.s.earlyTallied(&tl, nil, badOpcode, src, "", h.clock.Now())
			}
			if tc.filled == 0 {
				if got := counter("MAP", pcp.NotAuthorized) - before[0]; got != 0 {
					t.Errorf("before the flush: %v counted, want 0", got)
				}
			}
			tl.flush()
			tl.flush() // counts nothing twice
			if got := counter("MAP", pcp.NotAuthorized) - before[0]; got != 3 {
				t.Errorf("NOT_AUTHORIZED MAP answers counted: %v, want 3", got)
			}
			if got := counter("other", pcp.UnsuppOpcode) - before[1]; got != 3 {
				t.Errorf("UNSUPP_OPCODE answers counted: %v, want 3", got)
			}
		})
	}
}

// BenchmarkEarlyCount: counting an early answer, from as many goroutines
// as cores (the socket readers), each answer counted at once (shared) or
// in the reader's tally flushed every 4 answers (a closed-loop batch of
// the issue 8 benchmark was 3-5 datagrams).
func BenchmarkEarlyCount(b *testing.B) {
	m := newMetrics(func() float64 { return 0 })
	for _, tc := range []struct {
		name  string
		tally bool
	}{{"shared", false}, {"tally", true}} {
		b.Run(tc.name, func(b *testing.B) {
			var e earlyState
			b.RunParallel(func(pb *testing.PB) {
				var t *tally
				if tc.tally {
					t = new(tally)
				}
				n := 0
				for pb.Next() {
					e.count(t, m, "MAP", pcp.NotAuthorized)
					if n++; t != nil && n%4 == 0 {
						t.flush()
					}
				}
				if t != nil {
					t.flush()
				}
			})
		})
	}
}

// BenchmarkEarly is a socket reader's user-space work per error answer:
// admit (the per-source bucket) and early, for a malformed request and an
// unauthorised MAP, each from a rotating set of sources as in the bench,
// and an ANNOUNCE. The engine runs on the production running clock (the
// error answers and ANNOUNCE read the epoch at it: epochAt).
func BenchmarkEarly(b *testing.B) {
	h := newHarness(b)
	h.s.plog = zap.NewNop()
	clk := newRunClock(nil, nil)
	h.s.clk, h.s.now = clk, clk.now
	h.s.rl = policy.NewRateLimiter(1<<30, 1<<30, 1<<16)
	stranger := netip.MustParseAddr("2001:db8:ee::1")
	badOpcode := pcp.AppendRequest(nil, mapReq(addrA, pcp.ProtoTCP, 80, 0, time.Hour, 1))
	badOpcode[1] = 9
	for _, tc := range []struct {
		name string
		src  netip.Addr
		b    []byte
	}{
		{"malformed", addrA, badOpcode},
		{"unauthorised", stranger, pcp.AppendRequest(nil, mapReq(stranger, pcp.ProtoTCP, 80, 0, time.Hour, 1))},
		{"announce", addrA, pcp.AppendRequest(nil, pcp.NewAnnounce(addrA))},
	} {
		b.Run(tc.name, func(b *testing.B) {
			srcs := make([]netip.AddrPort, 4096)
			for i := range srcs {
				a := tc.src.As16()
				a[6], a[7] = byte(i>>8), byte(i)
				srcs[i] = netip.AddrPortFrom(netip.AddrFrom16(a), 40000)
			}
			dst := make([]byte, 0, 2048)
			var t tally
			now := time.Now()
			i := 0
			for b.Loop() {
				src := srcs[i%len(srcs)]
				i++
				if h.s.admit(tc.b, src, 0, now) != "" {
					b.Fatal("dropped")
				}
				h.s.earlyTallied(&t, dst, tc.b, src, "", now)
				if i%32 == 0 {
					t.flush()
				}
			}
		})
	}
}
