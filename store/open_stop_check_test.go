package store

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
)

// TestOpenStopsDuringCheck (h/ops2): Open's context ending while bbolt's
// consistency check runs (which can not be cut short) ends Open there: it
// returns ErrOpenStopped while the check still runs (held by
// testHookCheckEnd until the test lets it end), keeps the directory
// locked until the check has ended and the file is closed (another Open
// meanwhile: ErrLocked), then releases it (leftChecks), and the next Open
// reads every lease, the same epoch origin, nothing recovered.
//
// Fails before (Open waited for the check: `problems = <-checked` in
// place of the select): "Open returned only after bbolt's check ended".
func TestOpenStopsDuringCheck(t *testing.T) {
	const n = 20_000
	dir, origin := seedStopDir(t, n)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	inCheck, gate := make(chan struct{}), make(chan struct{})
	var once sync.Once
	testHookCheckEnd = func() {
		once.Do(func() { close(inCheck) })
		<-gate
	}
	defer func() { testHookCheckEnd = nil }()
	shut := sync.OnceFunc(func() { close(gate) })
	defer shut()
	ret := make(chan error, 1)
	go func() {
		s, _, err := Open(dir, zap.NewNop(), WithLeasesLater(), WithContext(ctx))
		if err == nil {
			s.Close()
		}
		ret <- err
	}()
	<-inCheck
	cancel()
	var err error
	select {
	case err = <-ret:
	case <-time.After(20 * time.Second): // a hang, not a figure
		shut()
		t.Fatalf("Open returned only after bbolt's check ended (%v): it waited for the check", <-ret)
	}
	t.Logf("Open during the check: %v", err)
	if !errors.Is(err, ErrOpenStopped) || !errors.Is(err, context.Canceled) {
		t.Fatalf("Open: %v; want ErrOpenStopped", err)
	}
	if s, _, err := Open(dir, zap.NewNop(), WithLockTimeout(50*time.Millisecond), WithoutOpenSnapshot()); !errors.Is(err, ErrLocked) {
		if err == nil {
			s.Close()
		}
		t.Errorf("Open while the stopped Open's check runs: %v; want ErrLocked", err)
	}
	shut()
	leftChecks.Wait()
	wantIntact(t, dir, n, origin)
}

// TestInspectFileStops (h/ops2): inspectFile's walk of the file's pages
// (≈ 200-250 ms of the ≈ 380 ms before the first lease at 1 000 000
// leases) asks stop every stopPages pages and gives up with its error at
// once: the walk over 100 000 leases asks once, and a stop ending there
// ends inspectFile with that error, not after the walk.
//
// Fails before (inspectFile took no stop and walked to its end): no look.
func TestInspectFileStops(t *testing.T) {
	dir, _ := seedStopDir(t, 100_000)
	path := filepath.Join(dir, DBName)
	looks := 0
	if _, err := inspectFile(path, func() error { looks++; return nil }); err != nil || looks == 0 {
		t.Fatalf("full walk: %v after %d looks; want nil after at least 1", err, looks)
	}
	errStop := errors.New("stop")
	if _, err := inspectFile(path, func() error { return errStop }); err != errStop {
		t.Fatalf("walk stopped at its first look: %v; want %v", err, errStop)
	}
	t.Logf("100 000 leases: the walk looks %d times (every %d pages)", looks, stopPages)
}
