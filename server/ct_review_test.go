package server

import (
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// Review of the conntrack flush on every end of a mapping (revct): which
// filters reach the walk when a mapping moves, its address goes away, or
// the same mapping is made again before the walk ran.

// ctRecorder records the filters the conntrack walk is handed; with gate
// set, each walk first waits for a value on it.
type ctRecorder struct {
	mu   sync.Mutex
	fs   []ctFilter
	gate chan struct{}
}

func (r *ctRecorder) walk(fs []ctFilter) {
	if r.gate != nil {
		<-r.gate
	}
	r.mu.Lock()
	r.fs = append(r.fs, fs...)
	r.mu.Unlock()
}

// has reports whether an inbound (or, with nat, SNAT) filter of
// addr:port reached the walk.
func (r *ctRecorder) has(addr netip.Addr, port uint16, nat bool) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.ContainsFunc(r.fs, func(f ctFilter) bool { return f.nat == nat && f.t.addr == addr && f.t.port == port })
}

// startCt (re)starts h's server with connections flushed (not
// KeepConnections) and the walk recorded by r.
func (h *harness) startCt(t *testing.T, r *ctRecorder) {
	t.Helper()
	h.cfg.KeepConnections = false
	h.startWith(nil, func(s *Server) { s.ct.walk = r.walk })
}

// ctDrain waits until every flush queued so far ran.
func (h *harness) ctDrain(t *testing.T) {
	t.Helper()
	done := make(chan struct{})
	h.s.ct.after(h.s.ct.seq(), func() { close(done) })
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("conntrack flush did not finish")
	}
}

// TestCtFlushMovedAndDropped: a mapping's old external endpoint is
// flushed whenever the mapping leaves it, not only on delete and expiry:
//   - a replacement MAP (new nonce, PROTOCOL.md choice (c)) that moves the
//     mapping to another external port frees the old one as a delete does
//     (tx.set: quarantined), but its flows (inbound, and the SNAT-ed
//     outbound ones) were left alone: the old port kept carrying the
//     client's connections with no lease for it (PMP-12);
//   - leases dropped at a start because the external IPv4 changed
//     (restoring.add, EPO-03) ended with no flush of their flows.
//
// Fails without the fix: no filter of the old endpoint reaches the walk.
func TestCtFlushMovedAndDropped(t *testing.T) {
	for _, c := range []struct {
		name string
		run  func(t *testing.T, h *harness, r *ctRecorder) (old netip.AddrPort)
	}{
		{"replacement MAP moves to another port", func(t *testing.T, h *harness, r *ctRecorder) netip.AddrPort {
			resp := h.do(mapReq(v4A, pcp.ProtoTCP, 80, 5000, time.Hour, 1))
			h.expect(resp, pcp.Success)
			old := netip.AddrPortFrom(resp.Map.ExternalAddr, resp.Map.ExternalPort)
			// Another client takes the port asked for next, so it must be
			// given one the replacement asks for explicitly.
			resp2 := h.do(mapReq(v4A, pcp.ProtoTCP, 80, 6000, time.Hour, 2))
			h.expect(resp2, pcp.Success)
			if resp2.Map.ExternalPort == old.Port() {
				t.Skipf("the replacement kept port %d; nothing to test", old.Port())
			}
			return old
		}},
		{"external IPv4 changed at start", func(t *testing.T, h *harness, r *ctRecorder) netip.AddrPort {
			resp := h.do(mapReq(v4A, pcp.ProtoTCP, 80, 5000, time.Hour, 1))
			h.expect(resp, pcp.Success)
			h.cfg.ExternalIPv4 = netip.MustParseAddr("203.0.113.9")
			h.startCt(t, r)
			if n := h.s.tab.len(); n != 0 {
				t.Fatalf("%d leases kept after the external IPv4 changed", n)
			}
			return netip.AddrPortFrom(resp.Map.ExternalAddr, resp.Map.ExternalPort)
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := newHarness(t)
			r := &ctRecorder{}
			h.startCt(t, r)
			old := c.run(t, h, r)
			h.ctDrain(t)
			for _, nat := range []bool{false, true} {
				if !r.has(old.Addr(), old.Port(), nat) {
					t.Errorf("no flush (nat %v) of the old endpoint %v", nat, old)
				}
			}
		})
	}
}

// TestCtFlushSkipsRemade: a flush is queued at expiry (or delete) and
// runs later, after the walks before it; the client may have made the
// same mapping again meanwhile (the same external port: MAP-22 keeps it
// for its owner), and a connection opened through the new mapping was cut
// by the old mapping's flush. The walk now leaves out, at the time it
// runs, the filters of endpoints a live lease admits again; the SNAT-ed
// flows of an endpoint a live lease holds again are left alone too.
//
// Fails without the fix: the walk is handed the re-made mapping's
// endpoint.
func TestCtFlushSkipsRemade(t *testing.T) {
	for _, c := range []struct {
		name   string
		end    func(h *harness)
		remake bool
	}{
		{"expired, made again before the walk", func(h *harness) {
			h.clock.Advance(2 * time.Minute)
			h.s.expire()
		}, true},
		{"deleted, made again before the walk", func(h *harness) {
			// The reply waits for the flush: its client sends again.
			seq := h.s.ct.seq()
			go h.do(mapReq(v4A, pcp.ProtoTCP, 80, 5000, 0, 1))
			waitFor(h.t.(*testing.T), func() bool { return h.s.ct.seq() > seq })
		}, true},
		{"expired, not made again", func(h *harness) {
			h.clock.Advance(2 * time.Minute)
			h.s.expire()
		}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			h := newHarness(t)
			r := &ctRecorder{gate: make(chan struct{})}
			h.startCt(t, r)
			// A first flush holds the flusher, as a long walk would.
			resp := h.do(mapReq(v4A, pcp.ProtoTCP, 81, 5001, time.Hour, 1))
			h.expect(resp, pcp.Success)
			go h.do(mapReq(v4A, pcp.ProtoTCP, 81, 5001, 0, 1)) // waits for the walk
			waitFor(t, func() bool { return h.s.ct.seq() > 0 })

			resp = h.do(mapReq(v4A, pcp.ProtoTCP, 80, 5000, time.Minute, 1))
			h.expect(resp, pcp.Success)
			ext := netip.AddrPortFrom(resp.Map.ExternalAddr, resp.Map.ExternalPort)
			seq := h.s.ct.seq()
			c.end(h)
			if h.s.ct.seq() == seq {
				t.Fatal("no flush queued")
			}
			if c.remake {
				resp = h.do(mapReq(v4A, pcp.ProtoTCP, 80, ext.Port(), time.Hour, 1))
				h.expect(resp, pcp.Success)
				if resp.Map.ExternalPort != ext.Port() {
					t.Fatalf("made again on port %d, want %d", resp.Map.ExternalPort, ext.Port())
				}
			}
			close(r.gate)
			h.ctDrain(t)
			for _, nat := range []bool{false, true} {
				if got := r.has(ext.Addr(), ext.Port(), nat); got == c.remake {
					t.Errorf("walk handed a filter (nat %v) of %v: %v, want %v", nat, ext, got, !c.remake)
				}
			}
		})
	}
}

// waitFor polls cond for up to 5 s (a hang bound, not a latency one).
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(5 * time.Second); time.Now().Before(end); time.Sleep(time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatal("condition not reached in 5 s")
}

// TestE2EMapDeleteKeepsPeerFlow: a PEER and a MAP of one internal
// endpoint share its external endpoint (IPv6: the endpoint itself). An
// inbound connection from the PEER's remote was flushed with the MAP's
// delete (the inbound filter is every flow to the endpoint), though the
// PEER still admits it. With the kernel's loose TCP pick-up its next
// packet may make a new entry the PEER pinhole admits, so the loss is the
// entry (its state, marks, zone, counters), seen here before any packet.
// The walk now spares the flows a live lease's pinhole admits (ctAdmits);
// the MAP's connection from another remote still ends.
func TestE2EMapDeleteKeepsPeerFlow(t *testing.T) {
	for _, c := range []struct {
		name string
	}{
		{"MAP deleted"},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := newLab(t, func(_ *Config, p *policy.Config) { p.MinLifetime = time.Second })
			const port = 9400
			conn, src, dst := l.inbound(t, "peer6", port, time.Hour)
			if resp := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, port, port, time.Hour, 1)); resp.Result != pcp.Success ||
				netip.AddrPortFrom(resp.Map.ExternalAddr, resp.Map.ExternalPort) != dst {
				t.Fatalf("MAP beside the PEER: %+v", resp)
			}
			src2 := netip.AddrPortFrom(src.Addr(), src.Port()+1) // only the MAP admits it
			conn2 := dialIn(t, l.topo.Internet, src2, dst)
			if err := echoOnce(conn2); err != nil {
				t.Fatalf("through the MAP: %v", err)
			}
			if resp := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, port, port, 0, 1)); resp.Result != pcp.Success {
				t.Fatalf("MAP delete: %+v", resp)
			}
			if len(l.srv.Leases()) != 1 {
				t.Fatalf("%d leases left, want the PEER", len(l.srv.Leases()))
			}
			// A delete's flush is done before its reply.
			flushed := l.ctFlow(t, src, dst) == nil
			err := echoOnce(conn)
			t.Logf("entry flushed: %v; connection carries data after: %v", flushed, err == nil)
			if flushed {
				t.Error("the PEER's live inbound flow was flushed with the MAP's delete")
			}
			if err != nil {
				t.Errorf("the PEER's live connection ended with the MAP's delete: %v", err)
			}
			if l.ctFlow(t, src2, dst) != nil {
				t.Error("the MAP's own inbound flow was not flushed")
			}
			if err := echoOnce(conn2); err == nil {
				t.Error("the MAP's own connection carries data after its delete")
			}
		})
	}
}
