package policy

import (
	"context"
	"testing"
	"time"
)

// TestWireGuardKeepFreshDecision (h/fresh): Run's keeping read, decided
// from when the last request that opens a pinhole came (Stale) and when
// the view's read began: none while idle (no request within
// KeepFreshWindow) or with a bound of 0; a timer while the view is
// younger than half the bound; a read now once it is older.
func TestWireGuardKeepFreshDecision(t *testing.T) {
	const bound = time.Second
	for _, tc := range []struct {
		name          string
		bound         time.Duration
		demandAgo     time.Duration
		viewAge       time.Duration
		read, armed   bool
		keepingAfter  bool
		keepingBefore bool
	}{
		{"idle", bound, 2 * KeepFreshWindow, 700 * time.Millisecond, false, false, false, true},
		{"busy, view younger than half the bound", bound, 0, 100 * time.Millisecond, false, true, true, true},
		{"busy, view past half the bound", bound, 0, 600 * time.Millisecond, true, false, true, true},
		{"busy, view past the bound", bound, 0, 1500 * time.Millisecond, true, false, true, true},
		{"bound 0", 0, 0, 100 * time.Millisecond, false, false, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := &devices{}
			d.set("wg0", peer(1, "2001:db8:1::/48"))
			w, err := newWireGuard(d, []string{"wg0"}, time.Hour, nil, WithFreshBound(tc.bound))
			if err != nil {
				t.Fatal(err)
			}
			now := mono()
			w.demand.Store(now - int64(tc.demandAgo))
			w.readAt.Store(now - int64(tc.viewAge))
			w.keeping.Store(tc.keepingBefore)
			var k keepTimer
			defer k.stop()
			if got := w.keepFresh(&k); got != tc.read {
				t.Errorf("read now: %v, want %v", got, tc.read)
			}
			if (k.c != nil) != tc.armed {
				t.Errorf("timer armed: %v, want %v", k.c != nil, tc.armed)
			}
			if got := w.keeping.Load(); got != tc.keepingAfter {
				t.Errorf("keeping: %v, want %v", got, tc.keepingAfter)
			}
		})
	}
}

// TestWireGuardKeepFreshRun (h/fresh): Run reads nothing more while no
// request comes (idle costs no reads: the periodic refresh, an hour
// here, aside); while requests that open a pinhole come (Stale, which
// never reads itself) it reads the view again, so that they find it
// within the bound without waiting; once they stop, it stops reading
// after KeepFreshWindow. Counts only: no duration or rate is asserted.
func TestWireGuardKeepFreshRun(t *testing.T) {
	const bound = 100 * time.Millisecond
	d := &devices{}
	d.set("wg0", peer(1, "2001:db8:1::/48"))
	w, err := newWireGuard(d, []string{"wg0"}, time.Hour, nil, WithFreshBound(bound))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	defer func() { cancel(); <-done }()

	base := d.calls.Load()
	time.Sleep(3 * bound)
	if n := d.calls.Load() - base; n != 0 {
		t.Fatalf("idle: %d reads, want 0", n)
	}
	base = d.calls.Load()
	for end := time.Now().Add(10 * bound); time.Now().Before(end); time.Sleep(bound / 20) {
		w.Stale()
	}
	if n := d.calls.Load() - base; n == 0 {
		t.Fatal("requests came for 10 fresh bounds: no keeping read")
	}
	if !w.keeping.Load() {
		t.Fatal("keeping false while requests come")
	}
	time.Sleep(KeepFreshWindow + 3*bound)
	base = d.calls.Load()
	time.Sleep(3 * bound)
	if n := d.calls.Load() - base; n != 0 {
		t.Fatalf("idle again past KeepFreshWindow: %d reads, want 0", n)
	}
	if w.keeping.Load() {
		t.Fatal("keeping still true past KeepFreshWindow")
	}
}
