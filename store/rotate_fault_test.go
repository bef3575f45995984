package store

import (
	"errors"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// failSyncs makes the next n fdatasyncs of the log segment file named
// name fail with EIO (after their write succeeded, as a failing disk
// does); it returns how many it failed so far. Reset when the test ends.
func failSyncs(t *testing.T, name string, n int) (failed func() int) {
	t.Helper()
	var mu sync.Mutex
	count := 0
	h := func(f *os.File) error {
		if filepath.Base(f.Name()) != name {
			return nil
		}
		mu.Lock()
		defer mu.Unlock()
		if count >= n {
			return nil
		}
		count++
		return &os.PathError{Op: "fdatasync", Path: f.Name(), Err: syscall.EIO}
	}
	syncFault.Store(&h)
	t.Cleanup(func() { syncFault.Store(nil) })
	return func() int {
		mu.Lock()
		defer mu.Unlock()
		return count
	}
}

// TestFailedRotationLeavesLogConsistent: a rotation whose header write
// succeeds and whose sync fails (review S1) leaves on disk a log that
// replays as written: the header it wrote over is put back, so the spare
// does not name a generation that starts at a record the active segment
// then goes on to hold. Before, the next Open found the two segments not
// following each other and reset the epoch (State.Fresh, "log segments do
// not follow each other") although nothing was lost. When putting the
// header back fails too, commits fail (ErrUnavailable) until it succeeds.
func TestFailedRotationLeavesLogConsistent(t *testing.T) {
	const ckpt = 1 << 20
	for _, tc := range []struct {
		name    string
		switch_ bool // the commit path's early switch to the spare, not a checkpoint's rotation
		fails   int  // syncs of the spare's file that fail in a row
		// commits that fail after the rotation: they find the header
		// not put back yet and fail themselves putting it back
		failedCommits int
	}{
		{name: "checkpoint rotation", fails: 1},
		{name: "checkpoint rotation, header not put back at once", fails: 2},
		{name: "checkpoint rotation, header not put back for a commit", fails: 3, failedCommits: 1},
		{name: "early switch", switch_: true, fails: 1},
		{name: "early switch, header not put back at once", switch_: true, fails: 2},
		{name: "early switch, header not put back for a commit", switch_: true, fails: 3, failedCommits: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s, _ := openT(t, dir, WithCheckpoint(ckpt, time.Hour), WithoutOpenSnapshot())
			if err := s.ResetEpoch(t0); err != nil {
				t.Fatal(err)
			}
			want := leasesN(0, 8)
			if err := s.Commit(want, nil); err != nil {
				t.Fatal(err)
			}
			waitSpare(t, s)
			s.wmu.Lock()
			spare := segName(1 - s.wal.active)
			s.wmu.Unlock()
			failed := failSyncs(t, spare, tc.fails)
			failedCommits := tc.failedCommits
			n := 8
			if tc.switch_ {
				// Fill the active segment until a commit finds it out of
				// room with the spare ready: its switch fails, and the
				// record goes into the active segment.
				for failed() == 0 {
					err := s.Commit(leasesN(n, n+8), nil)
					switch {
					case err == nil:
						want = append(want, leasesN(n, n+8)...)
					case failed() > 0 && errors.Is(err, ErrUnavailable):
						// the switching commit itself could not put the header back
						failedCommits--
					default:
						t.Fatalf("commit %d: %v", n, err)
					}
					n += 8
					if n > 100_000 {
						t.Fatal("no switch to the spare")
					}
				}
				if sw := s.switches.Load(); sw != 0 {
					t.Fatalf("%d switches, want the failed one only", sw)
				}
			} else if err := s.Checkpoint(); err == nil {
				t.Fatal("checkpoint succeeded with its rotation's sync failing")
			}
			for range failedCommits {
				if err := s.Commit(leasesN(n, n+8), nil); !errors.Is(err, ErrUnavailable) {
					t.Fatalf("commit with the header not put back: %v, want ErrUnavailable", err)
				}
				n += 8
			}
			if got := failed(); got != tc.fails {
				t.Fatalf("%d syncs failed, want %d", got, tc.fails)
			}
			// The log goes on in the segment that was active, past the
			// seq the failed rotation's header named.
			for range 3 {
				if err := s.Commit(leasesN(n, n+8), nil); err != nil {
					t.Fatal(err)
				}
				want = append(want, leasesN(n, n+8)...)
				n += 8
			}
			// kill -9
			img := crashImage(t, dir)
			s2, st, err := Open(img, testLog(t), WithoutOpenSnapshot())
			if err != nil {
				t.Fatal(err)
			}
			defer s2.Close()
			if st.Fresh || st.Recovered != "" {
				t.Errorf("after the failed rotation: Fresh=%v, Recovered=%q; want neither", st.Fresh, st.Recovered)
			}
			wantLeases(t, st.Leases, want)
			// And the store that saw the failure rotates fine later.
			if err := s.Checkpoint(); err != nil {
				t.Fatal(err)
			}
			s3, st3 := reopen(t, s, WithoutOpenSnapshot())
			_ = s3
			if st3.Fresh || st3.Recovered != "" {
				t.Errorf("after a later checkpoint and Close: Fresh=%v, Recovered=%q", st3.Fresh, st3.Recovered)
			}
			wantLeases(t, st3.Leases, want)
		})
	}
}

// TestSpareGrowsAfterFold: once a checkpoint has folded the segment the
// log left, that segment (the spare now) is filled ahead without waiting
// for another commit to start the grower (review S2: a wake-up was
// missed until the next commit came).
func TestSpareGrowsAfterFold(t *testing.T) {
	const ckpt = 1 << 20
	s, _ := openT(t, t.TempDir(), WithCheckpoint(ckpt, time.Hour), WithoutOpenSnapshot())
	if err := s.Commit(leasesN(0, 2), nil); err != nil {
		t.Fatal(err)
	}
	waitSpare(t, s)
	// The log moves to the full spare; the small segment it leaves is
	// folded and becomes the spare, not yet full.
	if err := s.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	s.wmu.Lock()
	small := s.wal.seg[1-s.wal.active].alloc
	s.wmu.Unlock()
	if small >= s.segFull() {
		t.Fatalf("the new spare is full already (%d octets): the test proves nothing", small)
	}
	waitSpare(t, s) // no commit from here on
}

// TestStatfsOncePerSpare: the grower asks the file system for room once
// per spare, not for every 64 KiB chunk, and commits never do (review S3:
// statfs ran under the log lock on every commit and every chunk).
func TestStatfsOncePerSpare(t *testing.T) {
	const ckpt = 1 << 20
	var calls atomic.Int64
	statfsFree = func(dir string) (int64, bool) {
		calls.Add(1)
		return freeSpace(dir)
	}
	t.Cleanup(func() { statfsFree = freeSpace }) // after Close (registered later, runs first)
	s, _ := openT(t, t.TempDir(), WithCheckpoint(ckpt, time.Hour), WithoutOpenSnapshot())
	n := 0
	for range 3 {
		for range 10 {
			if err := s.Commit(leasesN(n, n+8), nil); err != nil {
				t.Fatal(err)
			}
			n += 8
		}
		waitSpare(t, s)
		// The log moves to the full spare; the segment it leaves is
		// folded and grown as the next spare, from 20 KiB.
		if err := s.Checkpoint(); err != nil {
			t.Fatal(err)
		}
	}
	waitSpare(t, s)
	s.wmu.Lock()
	stuck := s.spareStuck
	s.wmu.Unlock()
	if stuck {
		t.Skip("file system too full for the spare")
	}
	// One spare at Open, one after each of the 3 rotations; each grows
	// by 1 MiB, 16 chunks.
	if got := calls.Load(); got < 1 || got > 4 {
		t.Errorf("%d statfs calls for 4 spares and %d commits, want 1 to 4", got, n/8)
	}
}
