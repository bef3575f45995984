package store

import (
	"errors"
	"os"
	"testing"
	"time"
)

// TestResetEpochStaleAppend (review h/revrw): an append read the pending
// epoch origin before it took the log's write lock, so a ResetEpoch that
// ran to its end in between (its record written first) was followed by
// the stale one: the last ResetEpoch did not win. In the engine: the moved
// origin the last rewrite step after a wall-clock step could not write
// (pending), housekeep's Touch reading it, a second step's rebase clearing
// the origin in between; Touch then stored the first step's origin while
// the second rewrite left the leases of two frames, and a kill -9 restored
// them with the epoch going on (server/clock.go). Here the append is a
// Touch or a Commit, held where another append can run (testHookAppend);
// the clear in between must be what a start finds. On main both rows open
// with the stale origin, not Fresh.
func TestResetEpochStaleAppend(t *testing.T) {
	origin := t0.Add(-time.Hour)
	moved := t0.Add(-2 * time.Hour)
	for _, tc := range []struct {
		name   string
		append func(s *Store) error
	}{
		{"Touch", func(s *Store) error { return s.Touch(t0) }},
		{"Commit", func(s *Store) error { return s.Commit([]Lease{leaseN(2)}, nil) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := openT(t, t.TempDir(), noCheckpoint, fixedClock(t0))
			if err := s.ResetEpoch(origin); err != nil {
				t.Fatal(err)
			}
			if err := s.Commit(leasesN(0, 2), nil); err != nil {
				t.Fatal(err)
			}
			// The moved origin cannot be written: it stays pending.
			fail := func(*os.File) error { return errSyncFault }
			syncFault.Store(&fail)
			if err := s.ResetEpoch(moved); err == nil {
				t.Fatal("ResetEpoch with its sync failing succeeded")
			}
			syncFault.Store(nil)
			cleared := false
			testHookAppend = func() {
				if cleared {
					return
				}
				cleared = true // the clear's own append runs the hook too
				if err := s.ResetEpoch(time.Time{}); err != nil {
					t.Errorf("clear: %v", err)
				}
			}
			t.Cleanup(func() { testHookAppend = nil })
			if err := tc.append(s); err != nil {
				t.Fatal(err)
			}
			testHookAppend = nil
			if !cleared {
				t.Fatal("hook not run")
			}
			_, st := openT(t, crashImage(t, s.Dir()), fixedClock(t0.Add(time.Second)))
			if !st.Fresh || !st.EpochOrigin.IsZero() {
				t.Fatalf("Fresh = %v, EpochOrigin = %v (origin %v, moved %v); want Fresh: the clear came last",
					st.Fresh, st.EpochOrigin, origin, moved)
			}
		})
	}
}

var errSyncFault = errors.New("injected fdatasync failure")
