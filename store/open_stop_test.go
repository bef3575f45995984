package store

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
)

// countdown is a context that ends at its limit-th look (Err), as if
// SIGTERM came while Open read the state: Done is never closed, Open
// looks at Err only.
type countdown struct {
	context.Context
	looks, limit atomic.Int64
}

func (c *countdown) Err() error {
	if c.looks.Add(1) >= c.limit.Load() {
		return context.Canceled
	}
	return nil
}

// TestOpenStops (h/opsleft): Open given a context (WithContext) that ends
// before or while it reads a large state gives up with ErrOpenStopped,
// the directory's lock released (another Open waits 100 ms at most), and
// leaves the state as it was: the next Open reads every lease, the same
// epoch origin, not Fresh, nothing recovered, no temporary or corrupt
// file. Rows (at 100 000 leases): ended at its 1st look (before the
// lock), 2nd (2048 pages into inspectFile's walk, since h/ops2), 4th
// (after bbolt's check), 6th (8192 leases read): Open looks at it a few
// times, not once per lease. PCPD_OPEN_STOP=N sets the
// leases (default 100 000; 1 000 000 for the figure: the full Open's time
// against the stopped one's).
//
// Fails before (no WithContext: Open read to its end): "Open: <nil>;
// want ErrOpenStopped" in every row.
func TestOpenStops(t *testing.T) {
	n := 100_000
	if v, _ := strconv.Atoi(os.Getenv("PCPD_OPEN_STOP")); v > 0 {
		n = v
	}
	dir, origin := seedStopDir(t, n)
	t0 := time.Now()
	s, st, err := Open(dir, zap.NewNop(), WithLeasesLater(), WithoutOpenSnapshot())
	if err != nil {
		t.Fatal(err)
	}
	full := time.Since(t0)
	s.Close()
	if st.Fresh || !st.EpochOrigin.Equal(origin) {
		t.Fatalf("setup: fresh %v, origin %v", st.Fresh, st.EpochOrigin)
	}
	for _, limit := range []int64{1, 2, 4, 6} {
		t.Run(strconv.Itoa(int(limit)), func(t *testing.T) {
			ctx := &countdown{Context: context.Background()}
			ctx.limit.Store(limit)
			t0 := time.Now()
			s, _, err := Open(dir, zap.NewNop(), WithLeasesLater(), WithContext(ctx))
			took := time.Since(t0)
			t.Logf("Open: %v after %v and %d looks (full Open of %d leases: %v)", err, took, ctx.looks.Load(), n, full)
			if err == nil {
				s.Close()
			}
			if !errors.Is(err, ErrOpenStopped) || !errors.Is(err, context.Canceled) {
				t.Fatalf("Open: %v; want ErrOpenStopped", err)
			}
			if looks := ctx.looks.Load(); looks > 10 {
				t.Errorf("Open looked at its context %d times", looks)
			}
			wantIntact(t, dir, n, origin)
		})
	}
}

// seedStopDir makes a closed state directory holding n leases (leasesN)
// and an epoch origin an hour old, which it returns.
func seedStopDir(t *testing.T, n int) (string, time.Time) {
	t.Helper()
	dir := t.TempDir()
	s, _, err := Open(dir, zap.NewNop(), WithoutOpenSnapshot())
	if err != nil {
		t.Fatal(err)
	}
	origin := time.Now().Add(-time.Hour).Truncate(time.Second)
	if err := s.ResetEpoch(origin); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i += 1 << 14 {
		if err := s.Commit(leasesN(i, min(i+1<<14, n)), nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return dir, origin
}

// wantIntact: after a stopped Open, the next one (100 ms lock wait) reads
// the n leases and the epoch origin as they were, not Fresh, nothing
// recovered, and no temporary or corrupt file is in dir.
func wantIntact(t *testing.T, dir string, n int, origin time.Time) {
	t.Helper()
	s, st, err := Open(dir, zap.NewNop(), WithLockTimeout(100*time.Millisecond), WithLeasesLater(), WithoutOpenSnapshot())
	if err != nil {
		t.Fatalf("Open after the stop: %v", err)
	}
	defer s.Close()
	if st.Fresh || st.Recovered != "" || !st.EpochOrigin.Equal(origin) {
		t.Errorf("after the stop: fresh %v, recovered %q, origin %v (want %v)", st.Fresh, st.Recovered, st.EpochOrigin, origin)
	}
	k := 0
	if err := st.Stream(func(*Lease) error { k++; return nil }); err != nil || k != n {
		t.Errorf("after the stop: %d leases (%v), want %d", k, err, n)
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), tmpSuffix) || strings.Contains(e.Name(), ".corrupt-") {
			t.Errorf("left behind: %s", filepath.Join(dir, e.Name()))
		}
	}
}
