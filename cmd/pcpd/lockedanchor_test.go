package main

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/bootclock"
	"github.com/pcpd/pcpd/store"
)

// TestLockedAnchor (review h/revstatelock): the boot anchor is a file in
// the state directory, written by the server, not the store. A pcpd
// started on a read-only directory without a lock file holds only the
// directory and writes nothing there; once the directory is writable, a
// second pcpd may start and hold the lock file. The first one's anchor
// Save (retried every tick since its start failed) must then not replace
// the second one's anchor; alone, it takes the lock file and writes.
//
// Fails with Boot: boot (the Keeper unwrapped, as before; here
// lockedAnchor.Save calling a.Keeper.Save directly): "second pcpd
// started" gets nil from the first one's Save and the anchor is its.
func TestLockedAnchor(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: bind-mounts the state directory read-only")
	}
	for _, second := range []bool{false, true} {
		t.Run(map[bool]string{false: "alone", true: "second pcpd started"}[second], func(t *testing.T) {
			dir := t.TempDir()
			s, _, err := store.Open(dir, nil)
			if err != nil {
				t.Fatal(err)
			}
			s.Close()
			if err := os.Remove(filepath.Join(dir, store.LockName)); err != nil {
				t.Fatal(err)
			}
			// Read-only, as a pcpd without the lock file found it.
			if err := syscall.Mount(dir, dir, "", syscall.MS_BIND, ""); err != nil {
				t.Fatalf("bind mount: %v", err)
			}
			t.Cleanup(func() { _ = syscall.Unmount(dir, syscall.MNT_DETACH) })
			if err := syscall.Mount("", dir, "", syscall.MS_REMOUNT|syscall.MS_BIND|syscall.MS_RDONLY, ""); err != nil {
				t.Fatalf("remount read-only: %v", err)
			}
			opts := []store.Option{store.WithLockTimeout(100 * time.Millisecond), store.WithoutOpenSnapshot()}
			a, _, err := store.Open(dir, nil, opts...)
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			anchorA := lockedAnchor{bootclock.New(dir, bootclock.System()), a}
			origin := time.Unix(1_700_000_000, 0)
			runA := func() time.Time { return time.Unix(1_800_000_000, 0) }
			if err := anchorA.Save(runA, origin); err == nil {
				t.Fatal("anchor saved in a read-only directory")
			}
			if err := syscall.Mount("", dir, "", syscall.MS_REMOUNT|syscall.MS_BIND, ""); err != nil {
				t.Fatalf("remount writable: %v", err)
			}
			keeper := bootclock.New(dir, bootclock.System())
			if !second {
				if err := anchorA.Save(runA, origin); err != nil {
					t.Fatalf("first pcpd's Save once writable: %v", err)
				}
				if _, _, err := store.Open(dir, nil, opts...); !errors.Is(err, store.ErrLocked) {
					t.Fatalf("Open after the anchor was written: %v, want ErrLocked (lock file held)", err)
				}
				if got, err := keeper.Load(); err != nil || !got.Run.Equal(runA()) {
					t.Fatalf("anchor %+v, %v: want the first pcpd's", got, err)
				}
				return
			}
			b, _, err := store.Open(dir, nil, opts...)
			if err != nil {
				t.Fatalf("second pcpd's Open once writable: %v", err)
			}
			defer b.Close()
			runB := func() time.Time { return time.Unix(1_900_000_000, 0) }
			if err := (lockedAnchor{bootclock.New(dir, bootclock.System()), b}).Save(runB, origin); err != nil {
				t.Fatalf("second pcpd's Save: %v", err)
			}
			err = anchorA.Save(runA, origin)
			if !errors.Is(err, bootclock.ErrStale) || !errors.Is(err, store.ErrLocked) {
				t.Errorf("first pcpd's Save beside the second: %v, want ErrStale and ErrLocked", err)
			}
			if got, err := keeper.Load(); err != nil || !got.Run.Equal(runB()) {
				t.Fatalf("anchor run %v, %v: want the second pcpd's %v", got.Run, err, runB())
			}
		})
	}
}
