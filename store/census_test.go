package store

import (
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
}
