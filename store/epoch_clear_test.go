package store

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// TestResetEpochClear: ResetEpoch of the zero time clears the stored epoch
// origin (an epochClear log record; the fold deletes it), so a later Open
// sees Fresh until an origin is set again; a clear that cannot be written
// goes with the next commit that succeeds, in its record. The engine
// clears it while the rewrite after a wall-clock step leaves the stored
// leases of two frames (server/clock.go, TestBootClockKillDuringRewrite).
// On main ResetEpoch(time.Time{}) wrote nothing: every "cleared" row
// opened with the old origin, not Fresh.
func TestResetEpochClear(t *testing.T) {
	origin := t0.Add(-time.Hour)
	later := t0.Add(time.Minute)
	tests := []struct {
		name   string
		change func(t *testing.T, s *Store) *Store // returns the store to image
		origin time.Time                           // zero: Fresh, reset pending
	}{
		{"cleared, replayed after a kill", func(t *testing.T, s *Store) *Store {
			if err := s.ResetEpoch(time.Time{}); err != nil {
				t.Fatal(err)
			}
			if err := s.Commit([]Lease{leaseN(2)}, nil); err != nil {
				t.Fatal(err)
			}
			return s
		}, time.Time{}},
		{"cleared, folded", func(t *testing.T, s *Store) *Store {
			if err := s.ResetEpoch(time.Time{}); err != nil {
				t.Fatal(err)
			}
			if err := s.Commit([]Lease{leaseN(2)}, nil); err != nil {
				t.Fatal(err)
			}
			if err := s.Checkpoint(); err != nil {
				t.Fatal(err)
			}
			return s
		}, time.Time{}},
		{"cleared, then set", func(t *testing.T, s *Store) *Store {
			if err := s.ResetEpoch(time.Time{}); err != nil {
				t.Fatal(err)
			}
			if err := s.Commit([]Lease{leaseN(2)}, nil); err != nil {
				t.Fatal(err)
			}
			if err := s.ResetEpoch(later); err != nil {
				t.Fatal(err)
			}
			return s
		}, later},
		{"clear refused, written with the next commit", func(t *testing.T, s *Store) *Store {
			dir := s.Dir()
			s.Close()
			writable := bindReadOnly(t, dir)
			s, st := openT(t, dir, noCheckpoint, fixedClock(t0), WithoutOpenSnapshot())
			if st.Fresh || !st.EpochOrigin.Equal(origin) {
				t.Fatalf("read-only open: Fresh = %v, EpochOrigin = %v", st.Fresh, st.EpochOrigin)
			}
			if err := s.ResetEpoch(time.Time{}); !errors.Is(err, ErrUnavailable) {
				t.Fatalf("ResetEpoch on a read-only directory = %v, want ErrUnavailable", err)
			}
			writable()
			if err := s.Commit([]Lease{leaseN(2)}, nil); err != nil {
				t.Fatalf("Commit once writable: %v", err)
			}
			return s
		}, time.Time{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, _ := openT(t, t.TempDir(), noCheckpoint, fixedClock(t0), WithoutOpenSnapshot())
			if err := s.ResetEpoch(origin); err != nil {
				t.Fatal(err)
			}
			if err := s.Commit(leasesN(0, 2), nil); err != nil {
				t.Fatal(err)
			}
			s = tt.change(t, s)
			// What a kill -9 now leaves.
			_, st := openT(t, crashImage(t, s.Dir()), fixedClock(later.Add(time.Second)))
			wantLeases(t, st.Leases, leasesN(0, 3))
			if tt.origin.IsZero() {
				if !st.Fresh || !st.EpochOrigin.IsZero() || !strings.Contains(st.Recovered, "epoch reset still pending") {
					t.Fatalf("Fresh = %v, EpochOrigin = %v, Recovered = %q; want Fresh, no origin, reset pending",
						st.Fresh, st.EpochOrigin, st.Recovered)
				}
				return
			}
			if st.Fresh || !st.EpochOrigin.Equal(tt.origin) {
				t.Fatalf("Fresh = %v, EpochOrigin = %v, Recovered = %q; want origin %v",
					st.Fresh, st.EpochOrigin, st.Recovered, tt.origin)
			}
		})
	}
}
