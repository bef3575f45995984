package store

import (
	"context"
	"os"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
)

// TestOpenStopLatency (figure; PCPD_OPEN_STOP_LATENCY=N leases, skipped
// without): Open of N leases with its context cancelled D after it began,
// for D from 0 to past the full Open's time: how long after the cancel
// Open returned, and the longest. Every stopped Open is followed by one
// that must read the state intact (wantIntact).
func TestOpenStopLatency(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("PCPD_OPEN_STOP_LATENCY"))
	if n <= 0 {
		t.Skip("PCPD_OPEN_STOP_LATENCY=N (leases) not set")
	}
	dir, origin := seedStopDir(t, n)
	t0 := time.Now()
	s, _, err := Open(dir, zap.NewNop(), WithLeasesLater(), WithoutOpenSnapshot())
	if err != nil {
		t.Fatal(err)
	}
	full := time.Since(t0)
	s.Close()
	t.Logf("full Open of %d leases: %v", n, full)
	var waits []time.Duration
	for d := time.Duration(0); d < full+full/4; d += full / 24 {
		ctx, cancel := context.WithCancel(context.Background())
		var at time.Time
		var mu sync.Mutex
		tm := time.AfterFunc(d, func() {
			mu.Lock()
			at = time.Now()
			mu.Unlock()
			cancel()
		})
		s, _, err := Open(dir, zap.NewNop(), WithLeasesLater(), WithoutOpenSnapshot(), WithContext(ctx))
		back := time.Now()
		tm.Stop()
		cancel()
		if err == nil {
			s.Close()
		}
		mu.Lock()
		c := at
		mu.Unlock()
		if c.IsZero() || err == nil {
			t.Logf("cancel at %v: Open returned %v before the cancel or after its last look", d.Round(time.Millisecond), err)
			continue
		}
		w := back.Sub(c)
		waits = append(waits, w)
		t.Logf("cancel at %v: Open returned %v later: %v", d.Round(time.Millisecond), w.Round(10*time.Microsecond), err)
		leftChecks.Wait()
		wantIntact(t, dir, n, origin)
	}
	if len(waits) > 0 {
		t.Logf("%d stopped Opens of %d leases: longest wait from cancel to return %v (full Open %v)",
			len(waits), n, slices.Max(waits).Round(10*time.Microsecond), full.Round(time.Millisecond))
	}
}
