package server

import (
	"testing"
	"time"

	"github.com/pcpd/pcpd/policy"
)

// TestOwnerGateClockStepBack: the owner gate (early.go) keeps the times of
// the two latest owners' requests and calls an owner contended while
// another owner sent one within ownerContendWindow (5 s). The readers
// used to hand it the wall clock (listen.go) and the per-source bucket the
// running clock, which the engine's rebase moves with a step (clock.go):
// after a step back, the other owner's time was in the future, so every
// request of the latest owner counted as contended (its owner bucket
// enforced with the engine idle) until the clock had caught up with the
// step, an hour for an hour. The readers' clock (listener.clock) is now
// the steady one, which neither the step nor the rebase moves.
func TestOwnerGateClockStepBack(t *testing.T) {
	a, b := policy.OwnerKey{Hi: 1}, policy.OwnerKey{Hi: 2}
	for _, tc := range []struct {
		name string
		step time.Duration
	}{
		{"no step", 0},
		{"step back 1 h", -time.Hour},
		{"step back 10 s", -10 * time.Second},
		{"step forward 1 h", time.Hour},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &stepClocks{}
			c.wall.Store(time.Date(2026, 12, 4, 20, 0, 0, 0, time.UTC).UnixNano())
			h := runClockHarness(t, c)
			clock := h.s.lis.clock // what the readers pass to early
			var g ownerGate
			g.contended(a, clock(), 0, 1024)
			c.advance(time.Millisecond)
			g.contended(b, clock(), 0, 1024)
			c.step(tc.step)
			h.s.checkClock() // the engine rebases
			// a is silent from now on; b goes on alone, 10 s later (real
			// time), well past the 5 s window.
			c.advance(10 * time.Second)
			if g.contended(b, clock(), 0, 1024) {
				t.Errorf("owner b alone for 10 s (clock stepped %v): still contended", tc.step)
			}
			// The gate still works: a comes back a second later, and
			// both are contended.
			c.advance(time.Second)
			if !g.contended(a, clock(), 0, 1024) || !g.contended(b, clock(), 0, 1024) {
				t.Errorf("owners a and b within a second (clock stepped %v): not contended", tc.step)
			}
		})
	}
}
