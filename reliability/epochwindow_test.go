package reliability

import (
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// TestEpochWindow checks TestKill9UnderLoadEPO04's judgement of the epoch
// after a restart (epochWindow), with the numbers of the failure seen once:
// 3607 before, 3621 after, 1.4 s later on the monotonic clock. Without a
// wall-clock step that is a jump and fails; with the box's wall clock
// stepped 12 s meanwhile (a VM pause the monotonic clock does not count)
// it is the epoch of the stored wall-clock origin and passes; a reset or a
// jump other than the step still fails.
func TestEpochWindow(t *testing.T) {
	const before = pcp.Epoch(3607)
	s := func(least, most float64) span {
		return span{time.Duration(least * float64(time.Second)), time.Duration(most * float64(time.Second))}
	}
	for _, tc := range []struct {
		name       string
		mono, wall span
		after      pcp.Epoch
		ok         bool
		step       time.Duration
	}{
		{"continued", s(1.4, 1.6), s(1.4, 1.6), 3608, true, 0},
		{"continued, late answer", s(1.4, 4.0), s(1.4, 4.0), 3613, true, 0}, // read up to 4 s ago
		{"reset", s(1.4, 1.6), s(1.4, 1.6), 1, false, 0},
		{"12 s ahead, clocks agree", s(1.4, 1.6), s(1.4, 1.6), 3621, false, 0},
		{"12 s ahead, wall stepped 12 s", s(1.4, 1.6), s(13.4, 13.6), 3621, true, 12 * time.Second},
		{"continued on monotonic, wall stepped 12 s", s(1.4, 1.6), s(13.4, 13.6), 3608, true, 12 * time.Second},
		{"6 s ahead, wall stepped 12 s", s(1.4, 1.6), s(13.4, 13.6), 3615, false, 12 * time.Second},
		{"reset, wall stepped back 1 h", s(1.4, 1.6), s(-3598.6, -3598.4), 1, false, -time.Hour},
		{"wall 0.5 s off: no step", s(1.4, 1.6), s(1.9, 2.1), 3611, false, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lo, hi, step, wlo, whi := epochWindow(before, tc.mono, tc.wall)
			e := float64(tc.after)
			ok := e >= lo && e <= hi || e >= wlo && e <= whi
			if ok != tc.ok || step != tc.step {
				t.Errorf("after %d: accepted %v (%.1f–%.1f, wall %.1f–%.1f), step %v; want accepted %v, step %v",
					tc.after, ok, lo, hi, wlo, whi, step, tc.ok, tc.step)
			}
		})
	}
}
