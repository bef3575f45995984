package store

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pcpd/pcpd/internal/tmpfs"
)

// streamAll collects what st.Stream hands out (copies: the lease it hands
// is a scratch one).
func streamAll(t *testing.T, st State) []Lease {
	t.Helper()
	if st.Stream == nil {
		t.Fatal("State.Stream is nil")
	}
	var got []Lease
	if err := st.Stream(func(l *Lease) error {
		c := *l
		c.Filters = slices.Clone(l.Filters)
		got = append(got, c)
		return nil
	}); err != nil {
		t.Fatalf("Stream: %v", err)
	}
	return got
}

// laterImage is a crash image of a state with 50 leases and a full one in
// the file, and a replacement, a delete and a new lease only in the log;
// want is what it holds.
// more: that many leases more in the log (from lease 100 on).
func laterImage(t *testing.T, more int) (img string, want []Lease) {
	t.Helper()
	dir := t.TempDir()
	s, _ := openT(t, dir, noCheckpoint, WithoutOpenSnapshot())
	if err := s.ResetEpoch(time.Now()); err != nil {
		t.Fatal(err)
	}
	full := fullLease()
	if err := s.Commit(append(leasesN(0, 50), full), nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	r := leaseN(1)
	r.Expires = r.Expires.Add(time.Hour)
	if err := s.Commit([]Lease{r, leaseN(60)}, []Key{leaseN(2).Key}); err != nil {
		t.Fatal(err)
	}
	want = append(append(append(leasesN(0, 1), r), leasesN(3, 50)...), full, leaseN(60))
	if more > 0 {
		if err := s.Commit(leasesN(100, 100+more), nil); err != nil {
			t.Fatal(err)
		}
		want = append(want, leasesN(100, 100+more)...)
	}
	return crashImage(t, dir), want
}

// TestWithLeasesLater: Open keeps no lease (State.Leases nil) and
// State.Stream hands out exactly the stored leases, the log's changes
// applied (what Open without the option collects), as often as asked,
// until the first commit; the callback's error comes back as it is. So
// does a state Open restored from the backup.
func TestWithLeasesLater(t *testing.T) {
	img, want := laterImage(t, 0)

	s, st := openT(t, crashImage(t, img), WithLeasesLater(), WithoutOpenSnapshot())
	if st.Leases != nil || st.Fresh {
		t.Fatalf("State.Leases has %d, Fresh = %v", len(st.Leases), st.Fresh)
	}
	wantLeases(t, streamAll(t, st), want)
	wantLeases(t, streamAll(t, st), want) // again: the restore reads twice

	boom := errors.New("boom")
	n := 0
	if err := st.Stream(func(*Lease) error { n++; return boom }); !errors.Is(err, boom) || n != 1 {
		t.Fatalf("Stream with a failing callback = %v after %d leases, want boom after 1", err, n)
	}
	if err := s.Commit([]Lease{leaseN(70)}, nil); err != nil {
		t.Fatal(err)
	}
	if err := st.Stream(func(*Lease) error { return nil }); err == nil || !strings.Contains(err.Error(), "after a commit") {
		t.Fatalf("Stream after a commit = %v, want a refusal", err)
	}
	s.Close()
	if err := st.Stream(func(*Lease) error { return nil }); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Stream after Close = %v, want ErrUnavailable", err)
	}

	t.Run("damaged file replaced by the backup", func(t *testing.T) {
		nd := crashImage(t, img)
		s, _ := openT(t, nd, WithoutOpenSnapshot())
		if err := s.Snapshot(); err != nil {
			t.Fatal(err)
		}
		s.Close()
		writeFile(t, filepath.Join(nd, DBName), []byte("not a bbolt file, long enough to be looked at"))
		_, st := openT(t, nd, WithLeasesLater(), WithoutOpenSnapshot())
		if !st.Fresh || !strings.Contains(st.Recovered, "restored") {
			t.Fatalf("Fresh = %v, Recovered = %q", st.Fresh, st.Recovered)
		}
		wantLeases(t, streamOneAtATime(t, st), want) // as a clean open's (TestLeasesLaterFromBackup)
	})
}

// TestWithLeasesLaterLogNotFolded: with the disk full, Open can not fold
// the log into the state file; State.Stream must then apply the log on
// top of the file as Open did, or it would hand out the file's older
// leases (lease 1 with its old expiry, lease 2 deleted since) and miss
// lease 60 and the 3000 after 100.
func TestWithLeasesLaterLogNotFolded(t *testing.T) {
	// 3000 leases in the log: folding them needs pages the file has not.
	img, want := laterImage(t, 3000)
	dir := tmpfs.Mount(t, "8m")
	for _, f := range []string{DBName, segName(0), segName(1)} {
		if _, err := os.Stat(filepath.Join(img, f)); err != nil {
			continue
		}
		if err := copyFile(filepath.Join(img, f), filepath.Join(dir, f)); err != nil {
			t.Fatal(err)
		}
	}
	tmpfs.Fill(t, dir, "fill")
	s, st := openT(t, dir, WithLeasesLater(), WithoutOpenSnapshot())
	if s.walReady.Load() {
		t.Skip("the log was folded even with the disk full: nothing to test")
	}
	wantLeases(t, streamAll(t, st), want)
}

// TestWithLeasesLaterRecoveryLogCounts: the "state recovery" line Open
// logs names how many stored leases it kept. WithLeasesLater keeps them
// for State.Stream, not in State.Leases, so counting State.Leases logged
// "leases": 0 for a state whose 50 leases were all kept (here: the epoch
// reset still pending), which reads as a start with every lease lost
// (review h/revpeak).
func TestWithLeasesLaterRecoveryLogCounts(t *testing.T) {
	for _, later := range []bool{false, true} {
		dir := t.TempDir()
		s, _ := openT(t, dir, WithoutOpenSnapshot())
		if err := s.Commit(leasesN(0, 50), nil); err != nil { // no ResetEpoch: reset pending
			t.Fatal(err)
		}
		s.Close()
		opts := []Option{WithoutOpenSnapshot()}
		if later {
			opts = append(opts, WithLeasesLater())
		}
		core, logs := observer.New(zap.InfoLevel)
		s, st, err := Open(dir, zap.New(core), opts...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		if !strings.Contains(st.Recovered, "epoch reset still pending") {
			t.Fatalf("later %v: recovered %q, want the pending reset", later, st.Recovered)
		}
		lines := logs.FilterMessage("state recovery").All()
		if len(lines) != 1 {
			t.Fatalf("later %v: %d \"state recovery\" lines, want 1", later, len(lines))
		}
		if got := lines[0].ContextMap()["leases"]; got != int64(50) {
			t.Errorf("later %v: \"state recovery\" logs leases=%v, want 50 (all kept)", later, got)
		}
	}
}

// TestStreamRefusesCommitDuring: a commit made while State.Stream reads
// (it checked for commits only before) fails the read: what it handed out
// may miss the commit, so it is not what the store holds. Before, the
// read ended without error, lease 900 stored but never handed out.
func TestStreamRefusesCommitDuring(t *testing.T) {
	img, _ := laterImage(t, 0)
	s, st := openT(t, crashImage(t, img), WithLeasesLater(), WithoutOpenSnapshot())
	committed := false
	err := st.Stream(func(*Lease) error {
		if !committed {
			committed = true
			if err := s.Commit([]Lease{leaseN(900)}, nil); err != nil {
				t.Errorf("Commit during Stream: %v", err)
			}
		}
		return nil
	})
	if err == nil || !strings.Contains(err.Error(), "commit") {
		t.Fatalf("Stream with a commit made during it = %v, want a refusal", err)
	}
}

// TestStreamCallbackPanicIsNotDamage: a panic of the caller's fn is the
// caller's bug, not bbolt faulting on a damaged file: it goes on up as it
// is. Before, Stream's recover turned it into "bbolt panicked ...:
// corrupt state", sending an operator after a state file that is fine,
// the panic's stack lost.
func TestStreamCallbackPanicIsNotDamage(t *testing.T) {
	img, _ := laterImage(t, 0)
	_, st := openT(t, crashImage(t, img), WithLeasesLater(), WithoutOpenSnapshot())
	var err error
	got := func() (r any) {
		defer func() { r = recover() }()
		err = st.Stream(func(*Lease) error { panic("engine bug") })
		return nil
	}()
	if got != "engine bug" {
		t.Fatalf("Stream with a panicking fn: panic %v, error %v; want the panic \"engine bug\" to reach the caller", got, err)
	}
}

// TestStreamFindsLaterDamage: damage that reaches the state file after
// Open checked it is found by State.Stream (ErrCorrupt, never a short
// read taken for the state), and the next Open moves the file aside and
// restores the backup Open wrote, with the epoch reset: never an empty
// start that claims continuity.
func TestStreamFindsLaterDamage(t *testing.T) {
	img, want := laterImage(t, 0)
	dir := crashImage(t, img)
	s, st := openT(t, dir, WithLeasesLater())
	if err := s.Checkpoint(); err != nil { // and wait for Open's backup
		t.Fatal(err)
	}
	s.bg.Wait()
	path := filepath.Join(dir, DBName)
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	at := strings.Index(string(data), "nextcloud")
	if at < 0 {
		t.Fatal("the full lease's description is not in the state file")
	}
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("N"), int64(at)); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := st.Stream(func(*Lease) error { return nil }); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Stream over a file damaged since Open = %v, want ErrCorrupt", err)
	}
	s.Close()
	_, st = openT(t, dir, WithLeasesLater())
	if !st.Fresh || !strings.Contains(st.Recovered, "restored") {
		t.Fatalf("reopened: Fresh %v, Recovered %q; want the backup restored, epoch reset", st.Fresh, st.Recovered)
	}
	wantLeases(t, streamOneAtATime(t, st), want)
}
