package store

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"go.uber.org/zap"
)

// censusOpen opens dir with WithLeasesLater and WithCensus and returns
// the state, the leases the census had after its last start-over (nil)
// and how many it was handed before that.
func censusOpen(t *testing.T, dir string) (st State, counted []Lease, before int) {
	t.Helper()
	starts := 0
	s, st, err := Open(dir, zap.NewNop(), WithLeasesLater(), WithoutOpenSnapshot(), WithCensus(func(l *Lease) {
		if l == nil {
			starts++
			before += len(counted)
			counted = nil
			return
		}
		c := *l
		c.Filters = slices.Clone(l.Filters)
		counted = append(counted, c)
	}))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	if starts == 0 {
		t.Fatal("the census was never told a check starts (nil)")
	}
	return st, counted, before
}

// TestWithCensus: WithCensus hands the census every live lease Open's check
// of the state finds (the log applied on top), exactly those State.Stream
// then hands out (the server sizes its restore from them instead of a pass
// of its own: BENCHMARKS.md item 62). When the check of the state file
// finds a damaged record after counting some and Open restores the backup
// copy, the census starts over (nil) and ends with the copy's leases only.
func TestWithCensus(t *testing.T) {
	t.Run("clean", func(t *testing.T) {
		img, want := laterImage(t, 3)
		st, counted, _ := censusOpen(t, crashImage(t, img))
		wantLeases(t, counted, want)
		wantLeases(t, streamOneAtATime(t, st), want)
	})
	t.Run("backup restored", func(t *testing.T) {
		dir, want := backupImage(t)
		// The state file's last record damaged: its check counts the
		// others first.
		flipIn(t, filepath.Join(dir, DBName), "nextcloud")
		st, counted, before := censusOpen(t, dir)
		if !strings.Contains(st.Recovered, "restored") {
			t.Fatalf("Recovered = %q: want the backup restored", st.Recovered)
		}
		if before == 0 {
			t.Fatal("the damaged file's check counted nothing before the damage: the start-over is not shown")
		}
		wantLeases(t, counted, want)
		wantLeases(t, streamOneAtATime(t, st), want)
	})
	// Review h/revs1m (a guard): a read-only directory's state, read
	// through the read-only handle after the writable open failed, with
	// the log applied on top: the census has exactly what Stream hands
	// out.
	t.Run("read-only", func(t *testing.T) {
		img, want := laterImage(t, 2)
		dir := crashImage(t, img)
		bindReadOnly(t, dir)
		st, counted, _ := censusOpen(t, dir)
		if !strings.Contains(st.Recovered, "read-only") {
			t.Fatalf("Recovered = %q: want the read-only directory's state", st.Recovered)
		}
		wantLeases(t, counted, want)
		wantLeases(t, streamOneAtATime(t, st), want)
	})
}

// TestCensusPanicIsNotDamage: a panic of the WithCensus callback (the
// server's counting code, server.Census.Add, run for every stored lease
// inside Open's check) is the caller's bug, not bbolt faulting on a
// damaged file: it goes on up as it is, and the state file and its backup
// stay where they are, as a panic of State.Stream's fn does
// (TestStreamCallbackPanicIsNotDamage, review h/revpeak). Before (review
// h/revs1m), readState's recover took it for damage: the state file was
// moved aside as corrupt, the backup restored, found "corrupt" the same
// way and moved aside too, and Open started with no leases (epoch reset):
// a census bug cost every stored lease.
// WithStream's fn likewise.
func TestCensusPanicIsNotDamage(t *testing.T) {
	for _, c := range []struct {
		name string
		opt  Option
	}{
		{"census", WithCensus(func(l *Lease) {
			if l != nil {
				panic("caller bug")
			}
		})},
		{"stream", WithStream(func(*Lease) error { panic("caller bug") })},
	} {
		t.Run(c.name, func(t *testing.T) { callerPanicKeepsFiles(t, c.opt) })
	}
}

func callerPanicKeepsFiles(t *testing.T, opt Option) {
	dir, _ := backupImage(t)
	var (
		st  State
		err error
	)
	got := func() (r any) {
		defer func() { r = recover() }()
		var s *Store
		s, st, err = Open(dir, zap.NewNop(), WithLeasesLater(), WithoutOpenSnapshot(), opt)
		if err == nil {
			s.Close()
		}
		return nil
	}()
	if got != "caller bug" {
		t.Errorf("Open with a panicking callback: panic %v, error %v, Recovered %q; want the panic \"caller bug\" to reach the caller",
			got, err, st.Recovered)
	}
	aside, _ := filepath.Glob(filepath.Join(dir, "*.corrupt-*"))
	if len(aside) > 0 {
		t.Errorf("files moved aside as corrupt: %v; want none (nothing is damaged)", aside)
	}
	for _, f := range []string{DBName, BackupName} {
		if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
			t.Errorf("%s: %v; want it in place", f, err)
		}
	}
}
