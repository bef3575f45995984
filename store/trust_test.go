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
			mkdirMode(t, dir, tc.mode, tc.uid)
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

// TestOpenRefusesSymlinkedDir (review h/revfsperm): a state directory
// reached through another user's symlink in a sticky directory passed
// while the link pointed at a trusted directory (only the resolved path
// was checked); its owner could re-point it at their own directory between
// the check and any later open (the store opens its files by dir's name,
// all its life). And the directories missing were created before the
// check, as root, wherever the path led.
func TestOpenRefusesSymlinkedDir(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to chown")
	}
	const other = 65534
	for _, tc := range []struct {
		name    string
		setup   func(t *testing.T, b string) (dir, created string)
		trusted bool
	}{
		{"own symlink in a sticky directory", func(t *testing.T, b string) (string, string) {
			mustSymlink(t, b+"/state", b+"/tmp/pcpd", -1)
			return b + "/tmp/pcpd", b + "/state/" + DBName
		}, true},
		{"another user's symlink in a sticky directory", func(t *testing.T, b string) (string, string) {
			mustSymlink(t, b+"/state", b+"/tmp/pcpd", other)
			return b + "/tmp/pcpd", b + "/state/" + DBName
		}, false},
		{"another user's symlink to a trusted parent, state missing", func(t *testing.T, b string) (string, string) {
			mustSymlink(t, b+"/state", b+"/tmp/pcpd", other)
			return b + "/tmp/pcpd/new", b + "/state/new"
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := t.TempDir()
			mkdirMode(t, b+"/tmp", os.ModeSticky|0o777, -1)
			mkdirMode(t, b+"/state", 0o700, -1)
			dir, created := tc.setup(t, b)
			s, _, err := Open(dir, nil)
			_, serr := os.Stat(created)
			if tc.trusted {
				if err != nil || serr != nil {
					t.Fatalf("Open: %v; %v", err, serr)
				}
				s.Close()
				return
			}
			if err == nil {
				s.Close()
			}
			if !errors.Is(err, fsperm.ErrUnsafe) {
				t.Fatalf("Open: %v, want fsperm.ErrUnsafe", err)
			}
			if serr == nil {
				t.Errorf("refused Open created %s", created)
			}
		})
	}
}

// mkdirMode makes the directory p (and its parents) with mode and, uid >=
// 0, the owner uid.
func mkdirMode(t *testing.T, p string, mode os.FileMode, uid int) {
	t.Helper()
	if err := os.MkdirAll(p, 0o700); err != nil {
		t.Fatal(err)
	}
	setMode(t, p, mode, uid)
}

// setMode gives p mode and, uid >= 0, the owner uid.
func setMode(t *testing.T, p string, mode os.FileMode, uid int) {
	t.Helper()
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
	if uid >= 0 {
		if err := os.Chown(p, uid, -1); err != nil {
			t.Fatal(err)
		}
	}
}

func mustSymlink(t *testing.T, target, link string, uid int) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	if uid >= 0 {
		if err := os.Lchown(link, uid, -1); err != nil {
			t.Fatal(err)
		}
	}
}

// TestOpenRefusesUntrustedFile (review h/revfsperm): the directory may be
// trusted and a file in it still writable by others (copied in with its
// mode; pcpd makes them all 0600): it could plant leases as the directory
// could. On main Open read such a leases.db.
func TestOpenRefusesUntrustedFile(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to chown")
	}
	for _, tc := range []struct {
		name string
		file string
		mode os.FileMode
		uid  int // -1: ours
		ok   bool
	}{
		{"state file 0600", DBName, 0o600, -1, true},
		{"state file 0644", DBName, 0o644, -1, true},
		{"state file world-writable", DBName, 0o666, -1, false},
		{"state file group-writable", DBName, 0o660, -1, false},
		{"state file owned by another user", DBName, 0o600, 65534, false},
		{"backup copy world-writable", BackupName, 0o666, -1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "state")
			writeThreeLeases(t, dir)
			setMode(t, filepath.Join(dir, tc.file), tc.mode, tc.uid)
			openTrusted(t, dir, tc.ok)
		})
	}
}

// TestOpenRefusesSymlinkedFile (review h/revfsperm2): a state file may be
// a symlink (root's or pcpd's user's, in the trusted directory) and what
// it leads to still writable by others: fsperm.Entries checked the link's
// owner only, so Open read a leases.db linked to a world-writable file,
// or to one in a world-writable directory, or dangling into one (3 rows
// fail on main).
func TestOpenRefusesSymlinkedFile(t *testing.T) {
	for _, tc := range []struct {
		name    string
		dirMode os.FileMode // of the directory the link leads to
		mode    os.FileMode // of the file there
		ok      bool
	}{
		{"to a 0600 file in a 0700 directory", 0o700, 0o600, true},
		{"to a world-writable file", 0o700, 0o666, false},
		{"to a file in a world-writable directory", 0o777, 0o600, false},
		{"dangling, into a world-writable directory", 0o777, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := t.TempDir()
			dir := filepath.Join(b, "state")
			writeThreeLeases(t, dir)
			moved := filepath.Join(b, "elsewhere", DBName)
			if err := os.Mkdir(filepath.Dir(moved), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.Rename(filepath.Join(dir, DBName), moved); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(moved, filepath.Join(dir, DBName)); err != nil {
				t.Fatal(err)
			}
			if tc.mode == 0 {
				// Dangling: another user could create the file.
				if err := os.Remove(moved); err != nil {
					t.Fatal(err)
				}
			} else if err := os.Chmod(moved, tc.mode); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(filepath.Dir(moved), tc.dirMode); err != nil {
				t.Fatal(err)
			}
			openTrusted(t, dir, tc.ok)
		})
	}
}

// TestOpenDotDot (review h/revfsperm2): the directory checked is the one
// the files are read from. On main Open checked dir as the kernel
// resolves it (tmp/link/.. is link's target's parent) but read
// filepath.Join(dir, DBName), which takes ".." lexically: from tmp, a
// sticky directory where another user had planted leases.db. (pcpd's
// config cleans --state-dir; Open's other callers did not.)
func TestOpenDotDot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to chown")
	}
	b := t.TempDir()
	mkdirMode(t, b+"/tmp", os.ModeSticky|0o777, -1)
	mkdirMode(t, b+"/own/sub", 0o700, -1)
	// The planted state: 3 leases, another user's file in tmp.
	writeThreeLeases(t, b+"/src")
	if err := os.Rename(b+"/src/"+DBName, b+"/tmp/"+DBName); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(b+"/tmp/"+DBName, 65534, -1); err != nil {
		t.Fatal(err)
	}
	mustSymlink(t, b+"/own/sub", b+"/tmp/link", -1)
	s, st, err := Open(b+"/tmp/link/..", nil)
	if err == nil {
		s.Close()
		if len(st.Leases) != 0 {
			t.Fatalf("Open read the %d leases planted in %s", len(st.Leases), b+"/tmp")
		}
	} else if !errors.Is(err, fsperm.ErrUnsafe) {
		t.Fatalf("Open: %v, want fsperm.ErrUnsafe", err)
	}
}

// writeThreeLeases makes dir a state directory holding 3 leases.
func writeThreeLeases(t *testing.T, dir string) {
	t.Helper()
	s, _, err := Open(dir, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Commit(leasesN(0, 3), nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

// openTrusted opens writeThreeLeases' dir again: ok, its 3 leases are
// read; else Open refuses it as unsafe (fsperm.ErrUnsafe).
func openTrusted(t *testing.T, dir string, ok bool) {
	t.Helper()
	s, st, err := Open(dir, nil)
	if ok {
		if err != nil {
			t.Fatalf("Open: %v", err)
		}
		if len(st.Leases) != 3 {
			t.Errorf("%d leases, want 3", len(st.Leases))
		}
		s.Close()
		return
	}
	if err == nil {
		s.Close()
	}
	if !errors.Is(err, fsperm.ErrUnsafe) {
		t.Fatalf("Open: %v, want fsperm.ErrUnsafe", err)
	}
}
