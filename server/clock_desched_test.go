package server

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// Where a pausingClocks' goroutine is descheduled.
const (
	pauseNone  int32 = iota
	pauseWall        // once, right after the next wall reading
	pauseMono        // once, right after the next monotonic reading
	pauseEvery       // after every reading of either clock
)

// pausingClocks is stepClocks whose reader is descheduled for pause (both
// clocks run on meanwhile) after a reading chosen by at: what a loaded
// box, a pause of the VM's thread or a GC does between two clock reads.
type pausingClocks struct {
	stepClocks
	pause time.Duration
	at    atomic.Int32
	// undo, if not 0, is undone (stepped back) after revert more readings
	// of either clock: a step undone between two measurements.
	undo   time.Duration
	revert atomic.Int32
}

func (c *pausingClocks) after(kind int32) {
	if c.undo != 0 && c.revert.Add(-1) == 0 {
		c.step(-c.undo)
	}
	at := c.at.Load()
	if at == pauseEvery || at != pauseNone && at == kind && c.at.CompareAndSwap(kind, pauseNone) {
		c.advance(c.pause)
	}
}

func (c *pausingClocks) Now() time.Time {
	t := c.stepClocks.Now()
	c.after(pauseWall)
	return t
}

func (c *pausingClocks) Mono() time.Duration {
	m := c.stepClocks.Mono()
	c.after(pauseMono)
	return m
}

func (c *pausingClocks) deps(d *Deps) { d.Now, d.Mono = c.Now, c.Mono }

// TestCheckClockDescheduled: a sweep tick's checkClock whose goroutine is
// descheduled for 2 s between its clock readings, with no wall-clock step,
// does not rebase: no "wall clock stepped", no pcpd_clock_steps_total, no
// rewrite of the leases, the running clock unmoved. A real step is still
// rebased, by the step exactly, a pause or not, and its lease rewritten.
// checkClock used to decide on one wall-minus-monotonic reading (wall,
// then monotonic: a pause between them read as a 2 s step back) and
// rebase by a second: the "pause after the wall reading" and "paused at
// every reading" rows rebased (by 0 and by −2 s) and rewrote the lease.
// The last row, a step undone between the decision and the rebase's own
// measurement, writes nothing either (rewriteStep at rewriteAt 0 begins a
// rewrite).
func TestCheckClockDescheduled(t *testing.T) {
	for _, tc := range []struct {
		name   string
		step   time.Duration // the wall clock's, before the tick
		at     int32
		revert int32 // undo the step after this many readings (0: never)
	}{
		{"no pause", 0, pauseNone, 0},
		{"pause after the wall reading", 0, pauseWall, 0},
		{"pause after a monotonic reading", 0, pauseMono, 0},
		{"paused at every reading", 0, pauseEvery, 0},
		{"step forward", 20 * time.Minute, pauseNone, 0},
		{"step forward, pause after the wall reading", 20 * time.Minute, pauseWall, 0},
		{"step back, pause after a monotonic reading", -3 * time.Hour, pauseMono, 0},
		{"step undone before the second measurement", 20 * time.Minute, pauseNone, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &pausingClocks{pause: 2 * time.Second}
			c.wall.Store(time.Date(2026, 12, 5, 3, 0, 0, 0, time.UTC).UnixNano())
			h := newHarness(t)
			h.startWith(c.deps, nil)
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 443, time.Hour, 1)), pcp.Success)
			c.advance(10 * time.Second)
			c.step(tc.step)
			want := tc.step != 0 && tc.revert == 0
			wantShift := tc.step
			if !want {
				wantShift = 0
			}
			steps := counterValue(t, h.s.m.clockSteps)
			commits := h.st.Commits
			c.undo = tc.step
			c.revert.Store(tc.revert)
			c.at.Store(tc.at)
			h.s.checkClock()
			c.at.Store(pauseNone)
			c.undo = 0
			rebased := counterValue(t, h.s.m.clockSteps) - steps
			wrote := h.st.Commits - commits
			if (rebased != 0) != want || h.s.shifted() != wantShift || (wrote != 0) != want {
				t.Errorf("wall step %v, paused %v: rebased %v times, shifted %v, %d store commits; want rebased %v, shifted %v, store commits iff rebased",
					tc.step, c.pause, rebased, h.s.shifted(), wrote, want, wantShift)
			}
			if d := h.s.clk.skew(); d != 0 {
				t.Errorf("running clock %v off the wall clock after the tick", d)
			}
			for range 3 { // later ticks: nothing more
				h.s.checkClock()
			}
			if got := counterValue(t, h.s.m.clockSteps) - steps; got != rebased || h.s.rewriteAt != 0 {
				t.Errorf("after 3 more ticks: %v rebases (want %v), rewrite in progress %v", got, rebased, h.s.rewriteAt != 0)
			}
		})
	}
}

// TestRunClockAnchorDescheduled: the running clock starts on the wall
// clock even if its goroutine is descheduled between the two readings of
// its anchor (newRunClock); it used to start behind it by the pause.
func TestRunClockAnchorDescheduled(t *testing.T) {
	for at, name := range []string{"no pause", "pause after the wall reading", "pause after a monotonic reading"} {
		c := &pausingClocks{pause: 2 * time.Second}
		c.wall.Store(time.Date(2026, 12, 5, 3, 0, 0, 0, time.UTC).UnixNano())
		c.at.Store(int32(at))
		rc := newRunClock(c.Now, c.Mono)
		c.at.Store(pauseNone)
		if d := rc.skew(); d != 0 {
			t.Errorf("%s: running clock %v off the wall clock at the start", name, d)
		}
	}
}
