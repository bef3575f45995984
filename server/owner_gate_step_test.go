package server

import (
	"testing"
	"time"

	"github.com/pcpd/pcpd/policy"
)

// TestOwnerGateClockStepBack: the owner gate (early.go) keeps the Unix
// times of the two latest owners' requests and calls an owner contended
// while another owner sent one within ownerContendWindow (5 s). The
// readers hand it their clock, which a wall-clock step moves (the wall
// clock itself, listen.go; the engine's running clock would move too, at
// its rebase: clock.go). After a step back, the other owner's time is in
// the future, so every request of the latest owner counts as contended
// (its owner bucket enforced with the engine idle) until the clock has
// caught up with the step: an hour for an hour. The policy rate limiter
// resyncs when its clock goes back (policy/ratelimit.go); the gate does
// not.
func TestOwnerGateClockStepBack(t *testing.T) {
	a, b := policy.OwnerKey{Hi: 1}, policy.OwnerKey{Hi: 2}
	t0 := time.Date(2026, 12, 4, 20, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name string
		step time.Duration
	}{
		{"no step", 0},
		{"step back 1 h", -time.Hour},
		{"step back 10 s", -10 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var g ownerGate
			g.contended(a, t0, 0, 1024)
			g.contended(b, t0.Add(time.Millisecond), 0, 1024)
			// a is silent from now on; b goes on alone, 10 s after the
			// step (real time), well past the 5 s window.
			now := t0.Add(tc.step).Add(10 * time.Second)
			if g.contended(b, now, 0, 1024) {
				t.Errorf("owner b alone for 10 s (clock stepped %v): still contended", tc.step)
			}
		})
	}
}
