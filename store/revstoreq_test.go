package store

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// openFDs counts this process's open descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("cannot count descriptors: %v", err)
	}
	return len(ents)
}

// TestReadOnlyProbeKeepsLockNoLeak (review h/revstoreq, root): the probe
// a refused write makes on a read-only directory (reopen: the state
// file's O_RDWR open) leaks no descriptor over many refusals, leaves the
// kept handle's shared flock in place (flock is per open file: closing
// the probe's descriptor must not drop it; an fcntl lock would be), and
// still notices the state file removed or replaced by name through
// another, writable view of the directory: Stream refuses, it never
// hands out the other file's leases (or none, as if the store were
// empty). Sound on main as merged (343ac14); kept as a regression test.
func TestReadOnlyProbeKeepsLockNoLeak(t *testing.T) {
	for _, c := range []struct {
		name string
		// change, through the writable view, after the first refusals
		change func(t *testing.T, view string)
	}{
		{"unchanged", nil},
		{"replaced by rename", func(t *testing.T, view string) {
			other := otherStateFile(t)
			data, err := os.ReadFile(other)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(view, "new"), data, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(filepath.Join(view, "new"), filepath.Join(view, DBName)); err != nil {
				t.Fatal(err)
			}
		}},
		{"removed", func(t *testing.T, view string) {
			if err := os.Remove(filepath.Join(view, DBName)); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			if os.Geteuid() != 0 {
				t.Skip("needs root: bind mounts")
			}
			img, want := laterImage(t, 0)
			dir := crashImage(t, img)
			view := t.TempDir()
			if err := syscall.Mount(dir, view, "", syscall.MS_BIND, ""); err != nil {
				t.Fatalf("bind mount: %v", err)
			}
			t.Cleanup(func() { _ = syscall.Unmount(view, syscall.MNT_DETACH) })
			writable := bindReadOnly(t, dir)
			s, st, _ := openLogged(t, dir)
			if s.ro == nil {
				t.Fatal("no read-only handle kept after Open")
			}
			refuse := func(n int) {
				t.Helper()
				for i := range n {
					if err := s.Touch(time.Now()); !errors.Is(err, ErrUnavailable) {
						t.Fatalf("Touch %d on a read-only directory = %v, want ErrUnavailable", i, err)
					}
				}
			}
			refuse(1)
			fds := openFDs(t)
			refuse(500)
			if n := openFDs(t); n != fds {
				t.Errorf("%d descriptors open after 500 more refused writes, %d before", n, fds)
			}
			if c.change == nil {
				// The kept handle's shared lock: an exclusive one on
				// another open file description must be refused.
				f, err := os.Open(filepath.Join(view, DBName))
				if err != nil {
					t.Fatal(err)
				}
				err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
				f.Close()
				if !errors.Is(err, syscall.EWOULDBLOCK) {
					t.Errorf("exclusive flock on the state file after refused writes = %v, want EWOULDBLOCK (the kept handle's shared lock dropped)", err)
				}
				wantLeases(t, streamOneAtATime(t, st), want)
			} else {
				c.change(t, view)
				refuse(50)
				got := 0
				if err := st.Stream(func(*Lease) error { got++; return nil }); err == nil {
					t.Fatalf("Stream after the state file was %s while read-only: nil error, %d leases handed out (Open checked %d)", c.name, got, len(want))
				}
			}
			writable()
			if err := s.Touch(time.Now()); err != nil {
				t.Fatalf("Touch once writable: %v", err)
			}
			if s.ro != nil {
				t.Error("read-only handle still open after a write succeeded")
			}
		})
	}
}
