// Package tmpfs gives tests a small file system of their own to fill up:
// the store's and the daemon's disk-full tests (issue 9, "disk full or
// state dir read-only") need a state directory that runs out of space
// without touching the machine's real disks.
package tmpfs

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// Mount mounts a tmpfs of the given size (tmpfs's size= syntax, "4m") on
// a new temporary directory and unmounts it when the test ends. It skips
// the test when not root: mounting needs CAP_SYS_ADMIN.
func Mount(t testing.TB, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: mounts a tmpfs")
	}
	dir := t.TempDir()
	if err := syscall.Mount("pcpdt-tmpfs", dir, "tmpfs", syscall.MS_NOSUID|syscall.MS_NODEV|syscall.MS_NOEXEC, "size="+size+",mode=0700"); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(dir, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

// Fill writes the file name in dir until the file system holding it is
// full, to the last byte: 64 KiB chunks first, then smaller ones, so no
// block a later write could claim is left free.
func Fill(t testing.TB, dir, name string) {
	t.Helper()
	f, err := os.Create(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, size := range []int{64 << 10, 4 << 10, 512, 1} {
		chunk := make([]byte, size)
		for {
			if _, err := f.Write(chunk); err != nil {
				if !errors.Is(err, syscall.ENOSPC) {
					t.Fatalf("filling: %v", err)
				}
				break
			}
		}
	}
}
