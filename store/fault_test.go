package store

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/tmpfs"
)

// bindReadOnly makes dir read-only by bind-mounting it onto itself; the
// returned function makes it writable again. (As root, chmod would not
// stop anything.)
func bindReadOnly(t testing.TB, dir string) (writable func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: bind-mounts the state directory read-only")
	}
	if err := syscall.Mount(dir, dir, "", syscall.MS_BIND, ""); err != nil {
		t.Fatalf("bind mount: %v", err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	if err := syscall.Mount("", dir, "", syscall.MS_REMOUNT|syscall.MS_BIND|syscall.MS_RDONLY, ""); err != nil {
		t.Fatalf("remount read-only: %v", err)
	}
	if err := os.WriteFile(filepath.Join(dir, "probe"), nil, 0o600); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("directory still writable: %v", err)
	}
	return func() {
		if err := syscall.Mount("", dir, "", syscall.MS_REMOUNT|syscall.MS_BIND, ""); err != nil {
			t.Fatalf("remount writable: %v", err)
		}
	}
}

// TestDiskFull: with the file system full, commits fail with
// ErrUnavailable (the engine answers NO_RESOURCES, choice (g)), each caller
// of a failed group gets the error, nothing of a failed transaction is
// applied, and commits work again once space returns (issue 9 "disk full").
func TestDiskFull(t *testing.T) {
	dir := tmpfs.Mount(t, "4m")
	s, st := openT(t, dir)
	if !st.Fresh {
		t.Fatal("new tmpfs directory not Fresh")
	}
	if err := s.ResetEpoch(time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(leasesN(0, 100), nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Snapshot(); err != nil {
		t.Fatal(err)
	}
	// To the last octet: the log claims space a few KiB at a time, and a
	// commit that fits in what is left is durable, not a failure.
	tmpfs.Fill(t, dir, "fill")
	fill := filepath.Join(dir, "fill")

	// A batch that needs new pages fails...
	err := s.Commit(leasesN(100, 3100), nil)
	if !errors.Is(err, ErrUnavailable) || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("Commit on a full disk = %v, want ErrUnavailable wrapping ENOSPC", err)
	}
	// ...and so does every caller of a group that does.
	c := s.NewCommitter()
	var wg sync.WaitGroup
	errs := make([]error, 20)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = c.Commit(leasesN(10000+i*200, 10000+(i+1)*200), nil)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if !errors.Is(err, ErrUnavailable) {
			t.Fatalf("caller %d on a full disk: %v", i, err)
		}
	}
	t.Logf("full disk: %d callers failed in %d transactions", len(errs), c.Stats().Transactions)

	// Space returns: the same Store works again without a restart.
	if err := os.Remove(fill); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit([]Lease{leaseN(50000)}, []Key{leaseN(0).Key}); err != nil {
		t.Fatalf("Commit after space returned: %v", err)
	}
	if got := s.Stats(); got.Failures == 0 {
		t.Fatalf("failures not counted: %+v", got)
	}
	_, st = reopen(t, s)
	if st.Fresh || st.Recovered != "" {
		t.Fatalf("after disk full: Fresh = %v, Recovered = %q", st.Fresh, st.Recovered)
	}
	wantLeases(t, st.Leases, append(leasesN(1, 100), leaseN(50000)))
}

// TestReadOnlyStateDir: a read-only state directory still yields its leases
// and epoch at start (pinholes are restored, the epoch continues), every
// change is refused with ErrUnavailable, and the first change after the
// directory is writable again succeeds and carries a reset the engine asked
// for meanwhile (issue 9 "state dir read-only").
func TestReadOnlyStateDir(t *testing.T) {
	t.Run("existing state", func(t *testing.T) {
		dir := t.TempDir()
		s, _ := openT(t, dir)
		origin := time.Now().Add(-time.Hour).Truncate(time.Second)
		if err := s.ResetEpoch(origin); err != nil {
			t.Fatal(err)
		}
		if err := s.Commit(leasesN(0, 10), nil); err != nil {
			t.Fatal(err)
		}
		s.Close()
		writable := bindReadOnly(t, dir)

		s, st := openT(t, dir)
		if st.Fresh || !st.EpochOrigin.Equal(origin) || !strings.Contains(st.Recovered, "read-only") {
			t.Fatalf("read-only open: Fresh = %v, EpochOrigin = %v, Recovered = %q", st.Fresh, st.EpochOrigin, st.Recovered)
		}
		wantLeases(t, st.Leases, leasesN(0, 10))
		err := s.Commit([]Lease{leaseN(10)}, nil)
		if !errors.Is(err, ErrUnavailable) || !errors.Is(err, syscall.EROFS) {
			t.Fatalf("Commit on read-only dir = %v, want ErrUnavailable wrapping EROFS", err)
		}
		newOrigin := origin.Add(time.Minute)
		if err := s.ResetEpoch(newOrigin); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("ResetEpoch on read-only dir = %v", err)
		}
		writable()
		if err := s.Commit([]Lease{leaseN(10)}, nil); err != nil {
			t.Fatalf("Commit once writable: %v", err)
		}
		_, st = reopen(t, s)
		if st.Fresh || !st.EpochOrigin.Equal(newOrigin) {
			t.Fatalf("pending reset not written: Fresh = %v, EpochOrigin = %v", st.Fresh, st.EpochOrigin)
		}
		wantLeases(t, st.Leases, leasesN(0, 11))
	})
	t.Run("new directory", func(t *testing.T) {
		dir := t.TempDir()
		writable := bindReadOnly(t, dir)
		s, st := openT(t, dir)
		if !st.Fresh || !strings.Contains(st.Recovered, "not writable") {
			t.Fatalf("Fresh = %v, Recovered = %q", st.Fresh, st.Recovered)
		}
		if err := s.Commit([]Lease{leaseN(1)}, nil); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("Commit = %v", err)
		}
		writable()
		if err := s.Commit([]Lease{leaseN(1)}, nil); err != nil {
			t.Fatalf("Commit once writable: %v", err)
		}
		_, st = reopen(t, s)
		if !st.Fresh { // ResetEpoch was never called
			t.Fatal("epoch origin appeared from nowhere")
		}
		wantLeases(t, st.Leases, leasesN(1, 2))
	})
}
