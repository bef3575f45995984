package server

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// TestRestartRevokeKeepsNoBuffers: Start revoked the restored leases the
// rules refuse in one transaction (restore_policy.go), and a finished tx
// is kept for reuse with its buffers (Server.spare): the undo log holds a
// copy of every revoked lease, ended another, and the kernel ops and their
// inverses two per pinhole. After a restart that revokes many leases
// (--deny-ports naming a port most clients use), the daemon then kept,
// for as long as it ran, buffers sized for all of them: at 1 000 000
// refused leases 1.5 GB of heap stayed with no lease left
// (BenchmarkStartRefused: afterheapMB 1527, peak 3.5 GB, 32.5 s to start
// against 6.2-6.8 s with none refused).
//
// Refused leases now go as moved ones do: never installed (the kernel sees
// no install of them at the restart), out of the store. And a released tx
// keeps no buffer over maxKeptTx entries (here the ownership sweep
// revoking all 20 000 leases in one tx, their owner gone): 4096, far above a request batch's
// (Config.MaxBatch, 256 requests).
func TestRestartRevokeKeepsNoBuffers(t *testing.T) {
	const n = 20_000
	h := newHarness(t)
	ls := ownerALeases(h.clock.Now(), n)
	if err := h.st.Commit(ls, nil); err != nil {
		t.Fatal(err)
	}
	h.start()
	if got := h.s.tab.len(); got != n {
		t.Fatalf("%d leases restored, want %d", got, n)
	}
	checkSpare := func(when string) {
		t.Helper()
		sp := h.s.spare
		if sp == nil {
			return
		}
		const limit = 4096
		for _, b := range []struct {
			name string
			cap  int
		}{
			{"undo", cap(sp.undo)}, {"ended", cap(sp.ended)}, {"ops", cap(sp.ops)}, {"inv", cap(sp.inv)},
			{"put", cap(sp.put)}, {"del", cap(sp.del)}, {"qund", cap(sp.qund)}, {"seen", len(sp.seen)},
		} {
			if b.cap > limit {
				t.Errorf("%s, the spare tx keeps a %s buffer of %d entries (limit %d)", when, b.name, b.cap, limit)
			}
		}
	}

	// A restart under --deny-ports 22: none of them installed, all gone.
	installs := 0
	h.fw.FailApply = func(ops []pinhole.Op) error {
		for _, op := range ops {
			if op.Kind == pinhole.Install && op.Pinhole.InternalPort == 22 {
				installs++
			}
		}
		return nil
	}
	h.pcfg.DenyPorts = []policy.PortRange{{First: 22, Last: 22}}
	h.start()
	h.fw.FailApply = nil
	if got := h.s.tab.len(); got != 0 {
		t.Fatalf("%d leases left after a restart with --deny-ports 22, want 0", got)
	}
	if installs != 0 {
		t.Errorf("the restart with --deny-ports 22 installed %d pinholes of port 22 (to revoke them after)", installs)
	}
	if got := len(h.fw.Holes()); got != 0 {
		t.Errorf("%d pinholes left after the restart with --deny-ports 22", got)
	}
	if got := len(h.st.Leases()); got != 0 {
		t.Errorf("%d refused leases left in the store", got)
	}
	checkSpare(fmt.Sprintf("after revoking %d leases at start", n))

	// A large tx: all of them revoked at once, their owner gone.
	if err := h.st.Commit(ls, nil); err != nil {
		t.Fatal(err)
	}
	h.pcfg.DenyPorts = nil
	h.start()
	if got := h.s.tab.len(); got != n {
		t.Fatalf("%d leases restored, want %d", got, n)
	}
	own, err := policy.NewStatic(map[string][]netip.Prefix{"b": {netip.MustParsePrefix("2001:db8:b::/48")}})
	if err != nil {
		t.Fatal(err)
	}
	// Lost once started (a start revokes what is unowned already).
	lo := &lossOwnership{before: h.own, after: own}
	h.own = lo
	h.start()
	lo.lost.Store(true)
	h.s.sweepOwnership()
	if got := h.s.tab.len(); got != 0 {
		t.Fatalf("%d leases left after the ownership sweep, want 0", got)
	}
	if h.s.spare == nil {
		t.Fatal("no spare tx after the ownership sweep")
	}
	checkSpare(fmt.Sprintf("after the ownership sweep revoked %d leases", n))
}
