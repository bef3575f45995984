package server

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/pcpd/pcpd/store"
)

// TestRunClockIgnoresWallSteps: the running clock advances with the
// monotonic clock only; a step of the wall clock shows as skew (what
// checkClock rebases on), and moving the clock by the skew puts it on the
// wall clock again.
func TestRunClockIgnoresWallSteps(t *testing.T) {
	wall := time.Unix(1_800_000_000, 0)
	var mono time.Duration
	c := newRunClock(func() time.Time { return wall }, func() time.Duration { return mono })
	start := c.now()
	if !start.Equal(wall) || c.skew() != 0 {
		t.Fatalf("at start: now %v skew %v, want %v and 0", start, c.skew(), wall)
	}
	for _, step := range []time.Duration{20 * time.Minute, -3 * time.Hour, 1500 * time.Millisecond} {
		mono += 10 * time.Second
		wall = wall.Add(10 * time.Second).Add(step)
		before := c.now()
		if got := c.skew(); got != step {
			t.Errorf("step %v: skew %v", step, got)
		}
		c.off.Add(int64(c.skew()))
		if !c.now().Equal(wall) || !c.now().Equal(before.Add(step)) {
			t.Errorf("step %v: after the move now %v, want the wall %v", step, c.now(), wall)
		}
	}
}

// TestTableShift: shifting the table's times by a step moves every
// lease's expiry and creation by it and keeps the expiry heap consistent
// (checkTable) and in order: the leases due at x+d after the shift are
// those due at x before, in the same order.
func TestTableShift(t *testing.T) {
	for _, d := range []time.Duration{20 * time.Minute, -3 * time.Hour} {
		tab := newTable()
		want := map[store.Key]store.Lease{}
		for i := range 300 {
			in := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(i % 7)})
			l := lease("o", in, 6, uint16(1000+i), in, uint16(1000+i), time.Duration(i*37%300)*time.Second)
			tab.put(l)
			want[l.Key] = l
		}
		for k := range want { // free some slots
			if k.InternalPort%5 == 0 {
				tab.del(k)
				delete(want, k)
			}
		}
		dueBefore := tab.expired(tNow.Add(150 * time.Second))
		next, _ := tab.next()
		tab.shift(int64(d))
		checkTable(t, tab)
		for k, l := range want {
			got, ok := tab.get(k)
			if !ok || !got.Expires.Equal(l.Expires.Add(d)) || !got.Created.Equal(l.Created.Add(d)) {
				t.Fatalf("shift %v: lease %v: %+v, want expiry %v", d, k, got, l.Expires.Add(d))
			}
		}
		if n, _ := tab.next(); !n.Equal(next.Add(d)) {
			t.Errorf("shift %v: next expiry %v, want %v", d, n, next.Add(d))
		}
		if len(tab.expired(tNow.Add(d))) != 0 {
			t.Errorf("shift %v: leases due at the shifted now", d)
		}
		if dueAfter := tab.expired(tNow.Add(150*time.Second + d)); !slices.Equal(dueAfter, dueBefore) || len(dueBefore) == 0 {
			t.Errorf("shift %v: %d due after, %d before (or none)", d, len(dueAfter), len(dueBefore))
		}
	}
}

// BenchmarkNow: the engine's clock, read once a batch, and the readers'
// steady clock, against time.Now, which they replaced.
func BenchmarkNow(b *testing.B) {
	c := newRunClock(nil, nil)
	b.Run("running", func(b *testing.B) {
		for range b.N {
			_ = c.now()
		}
	})
	b.Run("steady", func(b *testing.B) { // the readers', once a batch
		for range b.N {
			_ = c.steady()
		}
	})
	b.Run("time.Now", func(b *testing.B) {
		for range b.N {
			_ = time.Now()
		}
	})
}
