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

// TestRewriteReset checks when TestKill9UnderLoadEPO04 takes an epoch
// reset after a restart for the one pcpd makes by design (rewriteReset):
// the killed run stepped (seen running, or at its start by the boot
// anchor), the start names the unfinished rewrite, and the epoch is a
// reset's. Any of them missing is a reset the test must fail.
func TestRewriteReset(t *testing.T) {
	const (
		stepped  = `{"level":"warn","msg":"wall clock stepped: lease times moved with it, pinholes unchanged","step":"12.3s","leases":14000}`
		anchored = `{"level":"warn","msg":"wall clock stepped since the last run's clock check (boot anchor): stored times follow it","step":"12.3s"}`
		plain    = `{"level":"info","msg":"state restored; epoch continues","leases":14000}`
		reason   = `{"level":"warn","msg":"store recovered","detail":"epoch reset still pending from an earlier run: it did not finish an epoch reset, or the rewrite of the stored leases after a wall-clock step (their times may be of two clock frames)"}` + "\n" +
			`{"level":"warn","msg":"mapping state lost or doubtful: epoch reset to 0","why":"fresh or recovered state","leases":14000}`
		otherReset = `{"level":"warn","msg":"store recovered","detail":"log damaged (bad record): changes logged after the damage are lost"}` + "\n" +
			`{"level":"warn","msg":"mapping state lost or doubtful: epoch reset to 0","why":"fresh or recovered state","leases":14000}`
	)
	for _, tc := range []struct {
		name            string
		after           pcp.Epoch
		since           time.Duration
		killed, started string
		ok              bool
	}{
		{"step seen running, rewrite unfinished", 0, 300 * time.Millisecond, stepped, reason, true},
		{"step seen at the killed run's start", 1, 900 * time.Millisecond, anchored, reason, true},
		{"no step in the killed run", 0, 300 * time.Millisecond, plain, reason, false},
		{"reset for another reason", 0, 300 * time.Millisecond, stepped, otherReset, false},
		{"no reset logged", 0, 300 * time.Millisecond, stepped, plain, false},
		{"epoch not a reset's", 3621, 300 * time.Millisecond, stepped, reason, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if ok := rewriteReset(tc.after, tc.since, tc.killed, tc.started); ok != tc.ok {
				t.Errorf("rewriteReset(%d, %v) = %v, want %v", tc.after, tc.since, ok, tc.ok)
			}
		})
	}
}
