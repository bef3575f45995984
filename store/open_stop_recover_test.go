package store

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"
)

// TestOpenStopsRecovering (h/ops2): Open's context ending while it
// recovers an unusable or missing state file (after moving it aside,
// while it reads the backup copy) returns ErrOpenStopped that keeps the
// recovery's cause: errors.Is finds ErrOpenStopped, the context's error
// and the cause (ErrCorrupt, fs.ErrNotExist), and the message names where
// the state file went. The next Open restores the copy and its report
// (State.Recovered) names the moved-aside file, newer than the copy, as
// the state file a stopped start found unusable; a file that was only
// missing gets no such note.
//
// Fails before (recover returned the stop as it was): "store: open stopped
// before the state was read: context canceled" is not the cause (ErrCorrupt /
// fs.ErrNotExist) in each row, and the next report only says "state file
// ... missing".
func TestOpenStopsRecovering(t *testing.T) {
	for _, c := range []struct {
		name   string
		damage func(t *testing.T, path string)
		cause  error
		aside  bool // the state file was moved aside (a .corrupt- file)
	}{
		{"state file garbled", func(t *testing.T, p string) {
			writeFile(t, p, []byte("not a bbolt file, long enough to be looked at"))
		}, ErrCorrupt, true},
		{"state file empty", func(t *testing.T, p string) { writeFile(t, p, nil) }, ErrCorrupt, true},
		{"state file missing", func(t *testing.T, p string) {
			if err := os.Remove(p); err != nil {
				t.Fatal(err)
			}
		}, fs.ErrNotExist, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir, want := backupImage(t)
			c.damage(t, filepath.Join(dir, DBName))
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			testHookRecover = cancel
			s, _, err := Open(dir, zap.NewNop(), WithLeasesLater(), WithContext(ctx))
			testHookRecover = nil
			if err == nil {
				s.Close()
			}
			leftChecks.Wait()
			t.Logf("stopped: %v", err)
			for _, w := range []error{ErrOpenStopped, context.Canceled, c.cause} {
				if !errors.Is(err, w) {
					t.Errorf("Open stopped while recovering: %v; want errors.Is %v", err, w)
				}
			}
			aside, _ := filepath.Glob(filepath.Join(dir, DBName+".corrupt-*"))
			if c.aside != (len(aside) == 1) {
				t.Fatalf("moved-aside files %v, want one: %v", aside, c.aside)
			}
			if c.aside && (err == nil || !strings.Contains(err.Error(), "moved to "+filepath.Base(aside[0]))) {
				t.Errorf("error does not say where the state file went (%s): %v", filepath.Base(aside[0]), err)
			}
			_, st, _ := openLogged(t, dir)
			t.Logf("next Open: %s", st.Recovered)
			if !st.Fresh || !strings.Contains(st.Recovered, fmt.Sprintf("restored %d leases from backup", len(want))) {
				t.Errorf("next Open: fresh %v, recovered %q; want the backup's %d leases restored", st.Fresh, st.Recovered, len(want))
			}
			if named := strings.Contains(st.Recovered, "stopped before it restored the copy"); named != c.aside ||
				(c.aside && !strings.Contains(st.Recovered, filepath.Base(aside[0]))) {
				t.Errorf("next Open's report %q: names the moved-aside file %v, want %v", st.Recovered, named, c.aside)
			}
		})
	}
}
