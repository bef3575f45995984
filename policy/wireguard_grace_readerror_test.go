package policy

import (
	"context"
	"syscall"
	"testing"
	"time"
)

// TestWireGuardGoneGraceReadErrorNoSpin (review of the gone grace,
// h/revgrace): wg0 is found gone and held; before the grace ends reading
// it starts failing with another error (EIO: a failed read keeps the held
// peers, so the gone mark stays). Run arms its grace timer from the gone
// mark after every refresh: once the grace's end is past, the timer is
// armed with a negative duration, fires at once, and Run re-reads wg0 in
// a loop for as long as the error lasts (one wgctrl read and one warning
// per turn, the miss interval bypassed). With a 1 h refresh and a 1 h miss
// interval, Run must make a handful of reads in 500 ms, not thousands.
func TestWireGuardGoneGraceReadErrorNoSpin(t *testing.T) {
	d := &devices{}
	d.set("wg0", peer(1, "2001:db8:a::/48"))
	const grace = 200 * time.Millisecond
	w, err := newWireGuard(d, []string{"wg0"}, time.Hour, nil, WithGoneGrace(grace), WithMissInterval(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	defer func() {
		cancel()
		<-done
	}()
	d.set("wg0")
	// Run re-reads at once (a rename of another name), finds wg0 gone
	// and holds it; misses would wait for the 1 h miss interval.
	w.InterfacesRenamed([]string{"wg9"})
	for start := time.Now(); ; time.Sleep(time.Millisecond) {
		if _, held := w.graceEnd(); held {
			break
		}
		if time.Since(start) > 5*time.Second {
			t.Fatal("wg0 never held")
		}
	}
	d.fail("wg0", syscall.EIO)
	time.Sleep(grace + 100*time.Millisecond) // the grace is over
	before := d.calls.Load()
	time.Sleep(500 * time.Millisecond)
	if n := d.calls.Load() - before; n > 5 {
		t.Errorf("%d wgctrl reads in 500 ms after the grace ended with wg0 failing to read (refresh 1 h): Run spins on its past grace end", n)
	}
}
