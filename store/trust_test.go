package store

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/pcpd/pcpd/internal/fsperm"
)

// TestOpenRefusesUntrustedDir (review h/revctl): a state directory another
// user can write is refused before anything in it is read. Restored
// leases are checked against the rules only, not ownership (server:
// Policy.Rules), so a user who can plant leases.db there has pcpd open
// pinholes to anyone's hosts at its next start; one who owns it can also
// hold its lock.
func TestOpenRefusesUntrustedDir(t *testing.T) {
	root := os.Geteuid() == 0
	for _, tc := range []struct {
		name      string
		mode      os.FileMode
		uid       int // -1: ours
		needsRoot bool
		ok        bool
	}{
		{"own 0700", 0o700, -1, false, true},
		{"own 0755", 0o755, -1, false, true},
		{"world-writable", 0o777, -1, false, false},
		{"group-writable", 0o770, -1, false, false},
		{"sticky world-writable", os.ModeSticky | 0o777, -1, false, false},
		{"owned by another user", 0o700, 65534, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.needsRoot && !root {
				t.Skip("needs root to chown")
			}
			dir := filepath.Join(t.TempDir(), "state")
			if err := os.Mkdir(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(dir, tc.mode); err != nil {
				t.Fatal(err)
			}
			if tc.uid >= 0 {
				if err := os.Chown(dir, tc.uid, -1); err != nil {
					t.Fatal(err)
				}
			}
			s, _, err := Open(dir, nil)
			if tc.ok {
				if err != nil {
					t.Fatalf("Open: %v", err)
				}
				s.Close()
				return
			}
			if err == nil {
				s.Close()
				t.Fatal("Open of an untrusted state directory succeeded")
			}
			if !errors.Is(err, fsperm.ErrUnsafe) {
				t.Fatalf("Open: %v, want fsperm.ErrUnsafe", err)
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Errorf("refused Open left %d entries in the directory (first %s)", len(ents), ents[0].Name())
			}
		})
	}
}
