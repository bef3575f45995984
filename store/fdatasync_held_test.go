package store

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestFdatasyncHeld: the commit's raw sync reports as fdatasync does: nil
// on an open file, the system call's error as a *os.PathError otherwise,
// and a test's syncFault first.
func TestFdatasyncHeld(t *testing.T) {
	fault := errors.New("injected")
	for _, tc := range []struct {
		name    string
		closed  bool
		fault   bool
		wantErr error
	}{
		{name: "open file", wantErr: nil},
		{name: "closed file", closed: true, wantErr: syscall.EBADF},
		{name: "sync fault", fault: true, wantErr: fault},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := os.Create(filepath.Join(t.TempDir(), "seg"))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.Write([]byte("record")); err != nil {
				t.Fatal(err)
			}
			if tc.closed {
				f.Close()
			}
			if tc.fault {
				h := func(*os.File) error { return fault }
				syncFault.Store(&h)
				defer syncFault.Store(nil)
			}
			for _, sync := range []struct {
				name string
				fn   func(*os.File) error
			}{{"fdatasync", fdatasync}, {"fdatasyncHeld", fdatasyncHeld}} {
				err := sync.fn(f)
				if !errors.Is(err, tc.wantErr) || (err == nil) != (tc.wantErr == nil) {
					t.Errorf("%s: %v, want %v", sync.name, err, tc.wantErr)
				}
				if tc.closed {
					var pe *os.PathError
					if !errors.As(err, &pe) || pe.Op != "fdatasync" && pe.Op != "sync" {
						t.Errorf("%s: %v, want a *os.PathError of fdatasync", sync.name, err)
					}
				}
			}
		})
	}
}
