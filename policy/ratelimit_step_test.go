package policy

import (
	"testing"
	"time"
)

// TestRateLimiterEvictionAfterStepBack: a full set of the limiter evicts
// the entry with the oldest last use. The server's clock goes back with a
// wall-clock step (server/clock.go: its running clock follows the step at
// the rebase), so afterwards every entry made before the step looks newer
// than any made since: the idle pre-step sources are never evicted (for as
// long as the step), and the new sources evict each other, each coming
// back with a fresh burst. Two sources taking turns then get a burst each
// turn; with no step the second evicts an idle source and the first stays
// limited.
func TestRateLimiterEvictionAfterStepBack(t *testing.T) {
	t0 := time.Unix(1_800_000_000, 0)
	for _, step := range []time.Duration{0, -time.Hour} {
		l := NewRateLimiter(1e-6, 1, 4) // one set of 4; a token, no refill to speak of
		for i, s := range []string{"2001:db8:1::1", "2001:db8:2::1", "2001:db8:3::1", "2001:db8:4::1"} {
			l.Allow(addr(s), t0.Add(time.Duration(i)*time.Millisecond)) // idle from now on
		}
		e, f := addr("2001:db8:e::1"), addr("2001:db8:f::1")
		now := t0.Add(step).Add(time.Second)
		allowed := 0
		for i := range 10 {
			now = now.Add(time.Millisecond)
			src := e
			if i%2 == 1 {
				src = f
			}
			if l.Allow(src, now) {
				allowed++
			}
		}
		if allowed != 2 {
			t.Errorf("clock stepped %v: two sources taking turns 10 times at a burst of 1: %d allowed, want 2", step, allowed)
		}
	}
}
