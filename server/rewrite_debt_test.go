package server

import (
	"slices"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/store"
)

// TestBootClockRewriteStoreDebt (review h/revrw): the rewrite after a
// wall-clock step skips the leases in the store's debt (payStoreDebt
// writes the table's state for them), and its last step stored the moved
// origin even while that debt was unpaid: the store held the owed lease's
// older state, of the old frame, under the new frame's origin. A kill -9
// before housekeep's next payStoreDebt (or the next request's commit)
// restored it by the wall clock with the epoch going on: a forward step
// of 1 h dropped it, nobody told to re-map. Now the last step pays the
// debt before it stores the origin. The debt here is a lease whose
// commit failed to be undone (the store holds its state of the map, the
// table the same: the debt is what marks the key). On main the forward
// row keeps 1 lease of 2 with the epoch going on, the back row keeps it
// with 1 h too much (clamped to its whole lifetime: 600 s).
func TestBootClockRewriteStoreDebt(t *testing.T) {
	const lifetime = 600 * time.Second
	const right = lifetime - 110*time.Second
	for _, tc := range []struct {
		name string
		step time.Duration
	}{
		{"forward", time.Hour},
		{"back", -time.Hour},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newCrashRun(t, "8d1c2a4e-0000-4000-8000-000000000005", lifetime, tc.step)
			c, h, before := r.rig.c, r.h, r.before
			ls := h.s.Leases()
			h.s.mu.Lock()
			for _, l := range ls {
				if l.ExternalPort == 8081 {
					h.s.storeDebt[l.Key] = struct{}{}
				}
			}
			if len(h.s.storeDebt) != 1 {
				t.Fatalf("debt %d keys, want 1", len(h.s.storeDebt))
			}
			d, ok := h.s.clk.stepped()
			if !ok {
				t.Fatal("no step measured")
			}
			h.s.rebase(d)
			for h.s.rewriteAt != 0 {
				if !h.s.rewriteStep(rewriteChunk) {
					t.Fatal("rewrite failed")
				}
			}
			h.s.mu.Unlock()
			r.restart(t)

			if left, want := leasesLeft(h, c.Now()), []time.Duration{right, right}; !slices.Equal(left, want) {
				t.Errorf("leases left %v, want %v", left, want)
			}
			if status := h.s.Status(); !status.Restarted || status.Epoch != before+10 {
				t.Errorf("epoch %d after %d (restarted %v), want %d", status.Epoch, before, status.Restarted, before+10)
			}
		})
	}
}

// TestBootClockRewriteExpiredUnrecorded (review h/revrw): a lease that
// expired while the store refused commits stayed in the store (the
// engine "drops it at the next start"), where the rewrite after a later
// wall-clock step never reaches it (it is not in the table), and the
// moved origin was stored over it. After a step back of 1 h its old-frame
// expiry lay 1 h in the future: the next start restored the expired lease
// and re-opened its pinhole (clamped to its whole lifetime), on a clean
// restart too (here: finishRebase, a clean stop). Now the failed expiry leaves the keys owed (storeDebt):
// housekeep's payStoreDebt deletes them, and the rewrite's last step
// before it stores the origin. On main: the 120 s lease is back with its whole 120 s.
func TestBootClockRewriteExpiredUnrecorded(t *testing.T) {
	rig := newBootRig(t, "8d1c2a4e-0000-4000-8000-000000000006")
	c, k := rig.c, rig.k
	open := func() (*errStore, store.State) {
		st, state := rig.open(t, store.WithoutOpenSnapshot())
		return &errStore{Store: st}, state
	}
	h := newHarness(t)
	st, state := open()
	defer func() { st.Close() }()
	rig.startOn(h, k, st, state)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 8080, 0, 600*time.Second, 1)), pcp.Success)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 8081, 0, 120*time.Second, 1)), pcp.Success)
	c.advance(130 * time.Second)
	st.set(errInjected)
	h.s.expire() // 8081's end not recorded
	st.set(nil)
	if n := len(h.s.Leases()); n != 1 {
		t.Fatalf("%d leases after the expiry, want 1", n)
	}
	c.step(-time.Hour)
	h.s.finishRebase() // rebase, the whole rewrite (a clean stop's)
	st.Close()
	c.advance(10 * time.Second)
	st, state = open()
	rig.startOn(h, k, st, state)
	for _, l := range h.s.Leases() {
		if l.ExternalPort == 8081 {
			t.Errorf("the expired lease is back with %v left", l.Expires.Sub(c.Now()))
		}
	}
	if !h.s.Status().Restarted {
		t.Errorf("epoch reset (restarted false), want it to go on")
	}
}
