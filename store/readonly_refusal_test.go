package store

import (
	"errors"
	"testing"
	"time"
)

// TestReadOnlyRefusalKeepsHandle (root): a store whose state directory is
// read-only refuses every write with ErrUnavailable (issue 9: the engine
// answers NO_RESOURCES, never a SUCCESS that is not durable) without
// closing and opening again the read-only handle Open kept for
// State.Stream: before (RELIABILITY.md, h/bkstream's "Left"), every
// refused write let it go, failed the writable open and opened it again.
// The first write once the directory is writable succeeds, and is there
// after a restart.
func TestReadOnlyRefusalKeepsHandle(t *testing.T) {
	for _, tc := range []struct {
		name  string
		write func(s *Store, i int) error
		// leases: the write puts leases (State.Stream refuses after it,
		// refused or not).
		leases bool
	}{
		{"Commit", func(s *Store, i int) error { return s.Commit([]Lease{leaseN(100 + i)}, nil) }, true},
		{"CommitQuar", func(s *Store, i int) error {
			return s.CommitQuar(nil, nil, &QuarChange{Put: []Quarantine{quarN(i)}})
		}, true},
		{"ResetEpoch", func(s *Store, i int) error { return s.ResetEpoch(time.Now()) }, false},
		{"Touch", func(s *Store, i int) error { return s.Touch(time.Now()) }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img, want := laterImage(t, 0)
			dir := crashImage(t, img)
			writable := bindReadOnly(t, dir)
			s, st, _ := openLogged(t, dir)
			ro := s.ro
			if ro == nil {
				t.Fatal("no read-only handle kept after Open")
			}
			for i := range 50 {
				if err := tc.write(s, i); !errors.Is(err, ErrUnavailable) {
					t.Fatalf("write %d on a read-only directory = %v, want ErrUnavailable", i, err)
				}
				if s.ro != ro {
					t.Fatalf("refused write %d closed and opened the read-only handle again", i)
				}
			}
			if !tc.leases {
				wantLeases(t, streamOneAtATime(t, st), want) // the kept handle
			}
			writable()
			if err := s.Commit([]Lease{leaseN(70)}, nil); err != nil {
				t.Fatalf("first Commit once writable: %v", err)
			}
			if s.ro != nil {
				t.Error("read-only handle still open after a write succeeded")
			}
			_, st = reopen(t, s)
			wantLeases(t, st.Leases, append(want, leaseN(70)))
		})
	}
}
