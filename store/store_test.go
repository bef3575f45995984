package store

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestCommitPutDelete(t *testing.T) {
	s, _ := openT(t, t.TempDir())
	a, b, c := leaseN(1), leaseN(2), leaseN(3)
	if err := s.Commit([]Lease{a, b, c}, nil); err != nil {
		t.Fatal(err)
	}
	a2 := a
	a2.Expires = a.Expires.Add(time.Hour) // renewal replaces (LIFE-03)
	a2.Nonce[0] ^= 0xff                   // new nonce from the owner (choice (c))
	// b deleted; c deleted and put in the same call: put wins; absent key
	// deleted: not an error (MAP-18 on the store level).
	if err := s.Commit([]Lease{a2, c}, []Key{b.Key, c.Key, leaseN(99).Key}); err != nil {
		t.Fatal(err)
	}
	s, st := reopen(t, s)
	wantLeases(t, st.Leases, []Lease{a2, c})
	if got := s.Stats().Commits; got != 0 {
		t.Errorf("fresh handle counts %d commits", got)
	}
}

func TestCommitInvalidChangesNothing(t *testing.T) {
	s, _ := openT(t, t.TempDir())
	good := leaseN(1)
	bad := leaseN(2)
	bad.Owner = strings.Repeat("x", MaxOwner+1)
	if err := s.Commit([]Lease{good, bad}, nil); !errors.Is(err, ErrInvalidLease) {
		t.Fatalf("Commit = %v, want ErrInvalidLease", err)
	}
	if got := s.Stats(); got.Commits != 0 {
		t.Fatalf("a transaction ran for an invalid batch: %+v", got)
	}
	_, st := reopen(t, s)
	wantLeases(t, st.Leases, nil)
}

// TestEPO04Epoch: the epoch survives a restart with state intact and a sane
// clock, and Open asks for a reset (Fresh) whenever either is in doubt.
func TestEPO04Epoch(t *testing.T) {
	origin := t0.Add(-time.Hour)
	setup := func(t *testing.T) *Store {
		s, st := openT(t, t.TempDir(), fixedClock(t0))
		if !st.Fresh || !st.EpochOrigin.IsZero() || st.Recovered != "" {
			t.Fatalf("new directory: %+v, want Fresh, no origin, nothing recovered", st)
		}
		if err := s.ResetEpoch(origin); err != nil {
			t.Fatal(err)
		}
		if err := s.Commit([]Lease{leaseN(1)}, nil); err != nil { // heartbeat = t0
			t.Fatal(err)
		}
		return s
	}
	tests := []struct {
		name      string
		now       time.Time
		prep      func(t *testing.T, s *Store)
		fresh     bool
		recovered string
	}{
		{name: "restart 30 s later continues", now: t0.Add(30 * time.Second)},
		{name: "restart a day later continues", now: t0.Add(24 * time.Hour)},
		{name: "clock back within slack continues", now: t0.Add(-ClockSlack + time.Second)},
		{name: "clock back behind last heartbeat", now: t0.Add(-time.Minute), fresh: true, recovered: "clock doubtful"},
		{name: "origin in the future", now: origin.Add(-time.Minute), fresh: true, recovered: "clock doubtful"},
		{name: "Touch moves the heartbeat", now: t0.Add(time.Minute),
			prep: func(t *testing.T, s *Store) {
				if err := s.Touch(t0.Add(2 * time.Minute)); err != nil {
					t.Fatal(err)
				}
			}, fresh: true, recovered: "last alive"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := setup(t)
			if tt.prep != nil {
				tt.prep(t, s)
			}
			s, st := reopen(t, s, fixedClock(tt.now))
			if st.Fresh != tt.fresh || !strings.Contains(st.Recovered, tt.recovered) {
				t.Fatalf("Fresh = %v, Recovered = %q; want %v, %q", st.Fresh, st.Recovered, tt.fresh, tt.recovered)
			}
			wantLeases(t, st.Leases, []Lease{leaseN(1)})
			if !tt.fresh {
				if !st.EpochOrigin.Equal(origin) {
					t.Fatalf("EpochOrigin = %v, want %v", st.EpochOrigin, origin)
				}
				return
			}
			if !st.EpochOrigin.IsZero() {
				t.Fatalf("Fresh with an origin %v", st.EpochOrigin)
			}
			// Fresh sticks until the engine resets, even once the clock
			// looks fine again...
			s, st = reopen(t, s, fixedClock(t0.Add(time.Hour)))
			if !st.Fresh || !strings.Contains(st.Recovered, "pending") {
				t.Fatalf("after a doubtful start without ResetEpoch: %+v, want Fresh, pending", st)
			}
			// ...and ResetEpoch ends it.
			if err := s.ResetEpoch(t0.Add(time.Hour)); err != nil {
				t.Fatal(err)
			}
			_, st = reopen(t, s, fixedClock(t0.Add(time.Hour+time.Second)))
			if st.Fresh || !st.EpochOrigin.Equal(t0.Add(time.Hour)) {
				t.Fatalf("after ResetEpoch: %+v", st)
			}
		})
	}
}

// TestLockedByOtherProcess: a second pcpd on the same directory gets a
// clear error, and the first one's state is untouched.
func TestLockedByOtherProcess(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir)
	if err := s.Commit([]Lease{leaseN(1)}, nil); err != nil {
		t.Fatal(err)
	}
	_, _, err := Open(dir, testLog(t), WithLockTimeout(100*time.Millisecond))
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("second Open = %v, want ErrLocked", err)
	}
	_, st := reopen(t, s)
	wantLeases(t, st.Leases, []Lease{leaseN(1)})
}

func TestOpenWritesBackup(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir)
	if err := s.Commit(leasesN(0, 10), nil); err != nil {
		t.Fatal(err)
	}
	s, _ = reopen(t, s)
	s.Close() // waits for the open-time backup
	_, st := openT(t, copyDir(t, dir, BackupName, DBName))
	wantLeases(t, st.Leases, leasesN(0, 10))
}

// copyDir makes a new directory whose file `to` is a copy of dir/from.
func copyDir(t *testing.T, dir, from, to string) string {
	t.Helper()
	nd := t.TempDir()
	b, err := os.ReadFile(filepath.Join(dir, from))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(nd, to), b, 0o600); err != nil {
		t.Fatal(err)
	}
	return nd
}

func TestCommitter(t *testing.T) {
	s, _ := openT(t, t.TempDir())
	c := s.NewCommitter()
	const n = 200
	errs := make([]error, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			errs[i] = c.Commit([]Lease{leaseN(i)}, nil)
		}()
	}
	// Hold the log writer while the callers arrive, as a slow fdatasync
	// would: with a fast disk and a loaded machine, callers could
	// otherwise trickle in one per write and the test would measure the
	// scheduler. Everyone who arrives meanwhile must share one record.
	s.wmu.Lock()
	close(start)
	for deadline := time.Now().Add(10 * time.Second); ; {
		c.mu.Lock()
		q := len(c.queue)
		c.mu.Unlock()
		if q >= n-1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	s.wmu.Unlock()
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("caller %d: %v", i, err)
		}
	}
	cs, ss := c.Stats(), s.Stats()
	t.Logf("%d callers → %d transactions (store counted %d)", n, cs.Transactions, ss.Commits)
	if cs.Requests != n || cs.Transactions != ss.Commits {
		t.Fatalf("committer %+v, store %+v", cs, ss)
	}
	if cs.Transactions > 3 {
		t.Fatalf("%d callers took %d transactions, want far fewer", n, cs.Transactions)
	}
	_, st := reopen(t, s)
	wantLeases(t, st.Leases, leasesN(0, n))
}

// An invalid lease fails its own caller before the group forms; the rest
// of the group commits.
func TestCommitterInvalidFailsOnlyItsCaller(t *testing.T) {
	s, _ := openT(t, t.TempDir())
	c := s.NewCommitter()
	bad := leaseN(5)
	bad.Kind = 0
	var wg sync.WaitGroup
	errs := make([]error, 10)
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l := leaseN(i)
			if i == 5 {
				l = bad
			}
			errs[i] = c.Commit([]Lease{l}, nil)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if (i == 5) != errors.Is(err, ErrInvalidLease) || (i != 5 && err != nil) {
			t.Fatalf("caller %d: %v", i, err)
		}
	}
	_, st := reopen(t, s)
	wantLeases(t, st.Leases, append(leasesN(0, 5), leasesN(6, 10)...))
}

func TestClosed(t *testing.T) {
	s, _ := openT(t, t.TempDir())
	s.Close()
	if err := s.Commit([]Lease{leaseN(1)}, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("Commit after Close = %v", err)
	}
	if err := s.Snapshot(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Snapshot after Close = %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close = %v", err)
	}
}

// TestSnapshot: Snapshot is the copy Open falls back to; a crash while
// writing it (a leftover temporary file) harms nothing.
func TestSnapshot(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir, WithoutOpenSnapshot())
	if err := s.Commit(leasesN(0, 10), nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Snapshot(); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(leasesN(10, 20), nil); err != nil {
		t.Fatal(err)
	}
	s.Close()
	writeFile(t, filepath.Join(dir, BackupName+tmpSuffix), []byte("half a snapshot"))
	writeFile(t, filepath.Join(dir, DBName+tmpSuffix), []byte("half a new file"))
	s, st := openT(t, dir, WithoutOpenSnapshot())
	if st.Recovered != "" && !strings.Contains(st.Recovered, "pending") {
		t.Fatalf("leftover temporary files disturbed Open: %q", st.Recovered)
	}
	wantLeases(t, st.Leases, leasesN(0, 20))
	for _, n := range []string{BackupName + tmpSuffix, DBName + tmpSuffix} {
		if _, err := os.Stat(filepath.Join(dir, n)); !os.IsNotExist(err) {
			t.Errorf("%s left behind: %v", n, err)
		}
	}
	s.Close()
	writeFile(t, filepath.Join(dir, DBName), garbage(8192, 9))
	_, st = openT(t, dir)
	if !st.Fresh || !strings.Contains(st.Recovered, "restored 10 leases") {
		t.Fatalf("Fresh = %v, Recovered = %q", st.Fresh, st.Recovered)
	}
	wantLeases(t, st.Leases, leasesN(0, 10))
}
