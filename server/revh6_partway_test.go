package server

import (
	"net/netip"
	"testing"

	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/server/servertest"
	"github.com/pcpd/pcpd/store"
)

// TestRevokeKernelFailsPartway (review h/revh6, evidence: passes on
// h/hunt6's main): a revoking transaction larger than one kernel batch
// (pinhole.MaxBatch ops) whose second batch fails, the store taking writes
// or refusing them, the undo of the first batch succeeding or failing too.
// Whatever fails, no pinhole is left in the kernel without its lease in
// the table (the revocation is undone as a whole, or its kernel deletes
// stand with the leases gone); the next sweep with the kernel back ends
// them all, and the store follows once it takes writes.
func TestRevokeKernelFailsPartway(t *testing.T) {
	const n = 300
	for _, tc := range []struct {
		name      string
		storeDown bool
		undoFails bool
	}{
		{"store takes writes", false, false},
		{"store refuses", true, false},
		{"store refuses, undo fails", true, true},
		{"store takes writes, undo fails", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			own := unownedLeases(h, n)
			own.mu.Lock()
			delete(own.owners, ownerA)
			own.mu.Unlock()
			if tc.storeDown {
				h.st.FailCommit = func([]store.Lease, []store.Key) error { return servertest.ErrInjected }
			}
			calls := 0
			h.fw.FailApply = func([]pinhole.Op) error {
				calls++
				if calls == 2 || tc.undoFails && calls > 2 {
					return servertest.ErrInjected
				}
				return nil
			}
			h.s.sweepStep()
			if calls < 2 {
				t.Fatalf("the revocation went in %d kernel batches, want 2 or more", calls)
			}
			orphans := func(when string) {
				t.Helper()
				in := map[netip.Addr]bool{}
				for _, l := range h.s.Leases() {
					in[l.InternalAddr] = true
				}
				for p := range h.fw.Holes() {
					if !in[p.InternalAddr] {
						t.Errorf("%s: the kernel holds %v with no lease in the table", when, p)
					}
				}
			}
			orphans("after the failed revocation")
			h.fw.FailApply = nil
			h.s.sweepStep()
			orphans("after the next sweep")
			if got, holes := h.s.tab.len(), len(h.fw.Holes()); got != 0 || holes != 0 {
				t.Errorf("after the next sweep: %d leases, %d pinholes, want none", got, holes)
			}
			h.st.FailCommit = nil
			h.s.payStoreDebt()
			if got := len(h.st.Leases()); got != 0 {
				t.Errorf("the store holds %d revoked leases once it takes writes, want 0", got)
			}
		})
	}
}
