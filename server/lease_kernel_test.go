package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
)

// TestLIFE04ClockBehindRestart: after a restart with the clock two days
// behind, a 120 s lease is restored with at most its 120 s (not two days)
// in the kernel, and the doubtful clock resets the epoch (EPO-04).
func TestLIFE04ClockBehindRestart(t *testing.T) {
	h := newHarness(t)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 443, 120*time.Second, 1)), pcp.Success)
	h.clock.Advance(10 * time.Second)
	h.start() // a normal restart: the epoch continues
	if !h.s.Status().Restarted {
		t.Fatal("EPO-04: a restart with a sound clock reset the epoch")
	}
	h.clock.Advance(-48 * time.Hour)
	h.start()
	p := hole(6, addrA, 443, addrA, 443)
	if got := h.fw.Holes()[p]; got == 0 || got > 120*time.Second {
		t.Errorf("LIFE-04: kernel timeout after the clock went back 48 h: %v, want ≤ 120s", got)
	}
	if l := h.s.Leases(); len(l) != 1 || l[0].Expires.Sub(h.clock.Now()) > 120*time.Second {
		t.Errorf("LIFE-04: lease after restart: %+v", l)
	}
	if st := h.s.Status(); st.Restarted || st.Epoch != 0 {
		t.Errorf("EPO-04: doubtful clock, epoch %d restarted %v, want a reset", st.Epoch, st.Restarted)
	}
	h.clock.Advance(121 * time.Second)
	h.s.expire()
	if len(h.fw.Holes()) != 0 || len(h.s.Leases()) != 0 {
		t.Errorf("LIFE-04: after expiry: holes %v leases %v", h.fw.Holes(), h.s.Leases())
	}
}

// TestLIFE04ExpiryDeletesKernelElement: when the engine expires a lease,
// its kernel element goes too, even if the kernel's timeout is longer.
func TestLIFE04ExpiryDeletesKernelElement(t *testing.T) {
	h := newHarness(t)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 443, 120*time.Second, 1)), pcp.Success)
	p := hole(6, addrA, 443, addrA, 443)
	// The kernel holds the element longer than the lease (as a restore
	// with an inflated timeout left it).
	if err := h.fw.Apply([]pinhole.Op{{Kind: pinhole.Refresh, Pinhole: p, Timeout: time.Hour}}); err != nil {
		t.Fatal(err)
	}
	h.clock.Advance(120 * time.Second)
	h.s.expire()
	if len(h.s.Leases()) != 0 {
		t.Fatalf("lease not expired: %v", h.s.Leases())
	}
	if d, ok := h.fw.Holes()[p]; ok {
		t.Errorf("LIFE-04: kernel element outlives its expired lease by %v", d)
	}
}

// TestPinholeSharedByPeerAndMap: a PEER to R:p and its owner's MAP with
// FILTER R/128:p share one kernel element; it stays while either lease
// lives, with the later expiry, and goes with the last one.
func TestPinholeSharedByPeerAndMap(t *testing.T) {
	filtered := func(lifetime time.Duration) *pcp.Request {
		r := mapReq(addrA, pcp.ProtoTCP, 443, 443, lifetime, 2)
		r.Options.Filters = append(r.Options.Filters, pcp.Filter{Remote: netip.PrefixFrom(remote.Addr(), 128), RemotePort: remote.Port()})
		return r
	}
	peer := func(lifetime time.Duration) *pcp.Request {
		return peerReq(addrA, pcp.ProtoTCP, 443, remote, lifetime, 1)
	}
	deleteMap := mapReq(addrA, pcp.ProtoTCP, 443, 0, 0, 2)
	one := func(h *harness) (pinhole.Pinhole, time.Duration) {
		t.Helper()
		holes := h.fw.Holes()
		if len(holes) != 1 {
			t.Fatalf("want one shared element, have %v (leases %v)", holes, h.s.Leases())
		}
		for p, d := range holes {
			return p, d
		}
		panic("unreachable")
	}
	t.Run("MAP deleted, PEER lives", func(t *testing.T) {
		h := newHarness(t)
		h.expect(h.do(peer(120*time.Second)), pcp.Success)
		h.expect(h.do(filtered(time.Hour)), pcp.Success)
		if _, d := one(h); d != time.Hour {
			t.Errorf("both leases: kernel timeout %v, want the later 1h", d)
		}
		h.expect(h.do(deleteMap), pcp.Success)
		if _, d := one(h); d != 120*time.Second {
			t.Errorf("MAP deleted: kernel timeout %v, want the PEER's 120s", d)
		}
		h.clock.Advance(120 * time.Second)
		h.s.expire()
		if len(h.fw.Holes()) != 0 || len(h.s.Leases()) != 0 {
			t.Errorf("after the last lease: holes %v leases %v", h.fw.Holes(), h.s.Leases())
		}
	})
	t.Run("PEER expires, MAP lives", func(t *testing.T) {
		h := newHarness(t)
		h.expect(h.do(filtered(time.Hour)), pcp.Success)
		h.expect(h.do(peer(120*time.Second)), pcp.Success)
		if _, d := one(h); d != time.Hour {
			t.Errorf("a 120 s PEER joined: kernel timeout %v, want the MAP's 1h", d)
		}
		h.clock.Advance(120 * time.Second)
		h.s.expire()
		if len(h.s.Leases()) != 1 {
			t.Fatalf("leases: %v", h.s.Leases())
		}
		if _, d := one(h); d != 58*time.Minute {
			t.Errorf("PEER expired: kernel timeout %v, want the MAP's 58m", d)
		}
		h.expect(h.do(deleteMap), pcp.Success)
		if len(h.fw.Holes()) != 0 || len(h.s.Leases()) != 0 {
			t.Errorf("after the last lease: holes %v leases %v", h.fw.Holes(), h.s.Leases())
		}
	})
}
