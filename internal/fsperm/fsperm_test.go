package fsperm

import (
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

const other = 65534 // nobody: another local user

// tree builds what a row lays out under base.
type tree struct{ t *testing.T }

func (tr tree) dir(p string, mode os.FileMode, uid int) {
	tr.t.Helper()
	if err := os.MkdirAll(p, 0o700); err != nil {
		tr.t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		tr.t.Fatal(err)
	}
	tr.chown(p, uid)
}

func (tr tree) file(p string, mode os.FileMode, uid int) {
	tr.t.Helper()
	if err := os.WriteFile(p, []byte("x\n"), mode); err != nil {
		tr.t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		tr.t.Fatal(err)
	}
	tr.chown(p, uid)
}

// link makes a symlink at p to target, owned by uid (-1: ours).
func (tr tree) link(target, p string, uid int) {
	tr.t.Helper()
	if err := os.Symlink(target, p); err != nil {
		tr.t.Fatal(err)
	}
	tr.chown(p, uid)
}

func (tr tree) chown(p string, uid int) {
	tr.t.Helper()
	if uid >= 0 {
		if err := os.Lchown(p, uid, -1); err != nil {
			tr.t.Fatal(err)
		}
	}
}

// TestWalk: every name met on the way is checked where it is met, not
// only the resolved path. The rows marked "h/revfsperm" passed before
// (the resolved path alone was trusted) although another user could
// re-point the path at once.
func TestWalk(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to chown")
	}
	const (
		ok     = ""
		unsafe = "unsafe"
		absent = "absent"
	)
	for _, tc := range []struct {
		name  string
		setup func(tr tree, b string) string // returns the path to check
		file  bool                           // File, else Dir(path, false)
		want  string
	}{
		{"own directory", func(tr tree, b string) string {
			tr.dir(b+"/run", 0o700, -1)
			return b + "/run"
		}, false, ok},
		{"own symlink to an own directory", func(tr tree, b string) string {
			tr.dir(b+"/real", 0o700, -1)
			tr.link(b+"/real", b+"/link", -1)
			return b + "/link"
		}, false, ok},
		{"relative symlink with .. to an own directory", func(tr tree, b string) string {
			tr.dir(b+"/a/real", 0o700, -1)
			tr.dir(b+"/etc", 0o755, -1)
			tr.link("../a/./real", b+"/etc/link", -1)
			return b + "/etc/link/"
		}, false, ok},
		{"systemd DynamicUser layout: /var/lib/pcpd -> private/pcpd, private 0700", func(tr tree, b string) string {
			tr.dir(b+"/var/lib/private/pcpd", 0o700, -1)
			os.Chmod(b+"/var/lib/private", 0o700)
			tr.link("private/pcpd", b+"/var/lib/pcpd", -1)
			return b + "/var/lib/pcpd"
		}, false, ok},
		{"own symlink in a sticky directory", func(tr tree, b string) string {
			tr.dir(b+"/tmp", os.ModeSticky|0o777, -1)
			tr.dir(b+"/real", 0o700, -1)
			tr.link(b+"/real", b+"/tmp/link", -1)
			return b + "/tmp/link"
		}, false, ok},
		{"own directory under a sticky one", func(tr tree, b string) string {
			tr.dir(b+"/tmp/run", 0o700, -1)
			os.Chmod(b+"/tmp", os.ModeSticky|0o777)
			return b + "/tmp/run"
		}, false, ok},
		{"h/revfsperm: another user's symlink in a sticky directory, to an own directory", func(tr tree, b string) string {
			tr.dir(b+"/tmp", os.ModeSticky|0o777, -1)
			tr.dir(b+"/real", 0o700, -1)
			tr.link(b+"/real", b+"/tmp/link", other)
			return b + "/tmp/link"
		}, false, unsafe},
		{"h/revfsperm: symlink in another user's directory, to an own directory", func(tr tree, b string) string {
			tr.dir(b+"/home", 0o755, other)
			tr.dir(b+"/real", 0o700, -1)
			tr.link(b+"/real", b+"/home/link", -1)
			return b + "/home/link/"
		}, false, unsafe},
		{"h/revfsperm: own symlink in a world-writable directory, to an own directory", func(tr tree, b string) string {
			tr.dir(b+"/pub", 0o777, -1)
			tr.dir(b+"/real", 0o700, -1)
			tr.link(b+"/real", b+"/pub/link", -1)
			return b + "/pub/link"
		}, false, unsafe},
		{"h/revfsperm: own symlink whose target goes through another user's symlink", func(tr tree, b string) string {
			tr.dir(b+"/tmp", os.ModeSticky|0o777, -1)
			tr.dir(b+"/real/run", 0o700, -1)
			tr.link(b+"/real", b+"/tmp/theirs", other)
			tr.dir(b+"/etc", 0o755, -1)
			tr.link(b+"/tmp/theirs/run", b+"/etc/link", -1)
			return b + "/etc/link"
		}, false, unsafe},
		{".. out of a symlinked directory into another user's", func(tr tree, b string) string {
			tr.dir(b+"/home/run", 0o700, -1)
			tr.chown(b+"/home", other)
			tr.dir(b+"/etc", 0o755, -1)
			tr.link(b+"/home/run", b+"/etc/link", -1)
			return b + "/etc/link/../run"
		}, false, unsafe},
		{"another user's directory", func(tr tree, b string) string {
			tr.dir(b+"/run", 0o700, other)
			return b + "/run"
		}, false, unsafe},
		{"symlink to another user's directory", func(tr tree, b string) string {
			tr.dir(b+"/theirs", 0o700, other)
			tr.link(b+"/theirs", b+"/link", -1)
			return b + "/link"
		}, false, unsafe},
		{"sticky world-writable directory itself", func(tr tree, b string) string {
			tr.dir(b+"/tmp", os.ModeSticky|0o777, -1)
			return b + "/tmp"
		}, false, unsafe},
		{"group-writable ancestor", func(tr tree, b string) string {
			tr.dir(b+"/g/run", 0o700, -1)
			os.Chmod(b+"/g", 0o775)
			return b + "/g/run"
		}, false, unsafe},
		{"missing", func(tr tree, b string) string { return b + "/none" }, false, absent},
		{"symlink loop", func(tr tree, b string) string {
			tr.link(b+"/l2", b+"/l1", -1)
			tr.link(b+"/l1", b+"/l2", -1)
			return b + "/l1"
		}, false, "loop"},
		{"own file", func(tr tree, b string) string {
			tr.dir(b+"/etc", 0o755, -1)
			tr.file(b+"/etc/pcpd.toml", 0o644, -1)
			return b + "/etc/pcpd.toml"
		}, true, ok},
		{"own file through an own symlink", func(tr tree, b string) string {
			tr.dir(b+"/etc", 0o755, -1)
			tr.file(b+"/etc/site.toml", 0o644, -1)
			tr.link("site.toml", b+"/etc/pcpd.toml", -1)
			return b + "/etc/pcpd.toml"
		}, true, ok},
		{"own file in a sticky directory", func(tr tree, b string) string {
			tr.dir(b+"/tmp", os.ModeSticky|0o777, -1)
			tr.file(b+"/tmp/pcpd.toml", 0o644, -1)
			return b + "/tmp/pcpd.toml"
		}, true, ok},
		{"h/revfsperm: another user's symlink in a sticky directory, to an own file", func(tr tree, b string) string {
			tr.dir(b+"/tmp", os.ModeSticky|0o777, -1)
			tr.dir(b+"/etc", 0o755, -1)
			tr.file(b+"/etc/pcpd.toml", 0o644, -1)
			tr.link(b+"/etc/pcpd.toml", b+"/tmp/pcpd.toml", other)
			return b + "/tmp/pcpd.toml"
		}, true, unsafe},
		{"another user's file", func(tr tree, b string) string {
			tr.file(b+"/pcpd.toml", 0o644, other)
			return b + "/pcpd.toml"
		}, true, unsafe},
		{"world-writable file", func(tr tree, b string) string {
			tr.file(b+"/pcpd.toml", 0o666, -1)
			return b + "/pcpd.toml"
		}, true, unsafe},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := t.TempDir()
			path := tc.setup(tree{t}, b)
			var err error
			if tc.file {
				err = File(path)
			} else {
				err = Dir(path, false)
			}
			switch tc.want {
			case ok:
				if err != nil {
					t.Fatalf("%v, want nil", err)
				}
			case unsafe:
				if !errors.Is(err, ErrUnsafe) {
					t.Fatalf("%v, want ErrUnsafe", err)
				}
			case absent:
				if !errors.Is(err, fs.ErrNotExist) {
					t.Fatalf("%v, want ErrNotExist", err)
				}
			default:
				if err == nil || errors.Is(err, ErrUnsafe) {
					t.Fatalf("%v, want an error other than ErrUnsafe", err)
				}
			}
		})
	}
}

// TestMkdirAll: the missing directories are made only inside checked
// ones; a refused path creates nothing.
func TestMkdirAll(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to chown")
	}
	for _, tc := range []struct {
		name   string
		setup  func(tr tree, b string) (path, created string)
		unsafe bool
	}{
		{"under an own directory", func(tr tree, b string) (string, string) {
			return b + "/new/run", b + "/new/run"
		}, false},
		{"under /tmp-like sticky", func(tr tree, b string) (string, string) {
			tr.dir(b+"/tmp", os.ModeSticky|0o777, -1)
			return b + "/tmp/pcpd/run", b + "/tmp/pcpd/run"
		}, false},
		{"under another user's directory", func(tr tree, b string) (string, string) {
			tr.dir(b+"/home", 0o755, other)
			return b + "/home/new/run", b + "/home/new"
		}, true},
		{"through another user's symlink in a sticky directory", func(tr tree, b string) (string, string) {
			tr.dir(b+"/tmp", os.ModeSticky|0o777, -1)
			tr.dir(b+"/etc", 0o755, -1)
			tr.link(b+"/etc", b+"/tmp/pcpd", other)
			return b + "/tmp/pcpd/new/run", b + "/etc/new"
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := t.TempDir()
			path, created := tc.setup(tree{t}, b)
			err := MkdirAll(path, 0o700, false)
			_, serr := os.Stat(created)
			if !tc.unsafe {
				if err != nil || serr != nil {
					t.Fatalf("MkdirAll: %v; stat: %v", err, serr)
				}
				return
			}
			if !errors.Is(err, ErrUnsafe) {
				t.Fatalf("MkdirAll: %v, want ErrUnsafe", err)
			}
			if serr == nil {
				t.Errorf("refused MkdirAll created %s", created)
			}
		})
	}
}

// TestRelative: a relative name is walked from the working directory.
func TestRelative(t *testing.T) {
	b := t.TempDir()
	if err := os.MkdirAll(filepath.Join(b, "x", "run"), 0o700); err != nil {
		t.Fatal(err)
	}
	t.Chdir(filepath.Join(b, "x"))
	if err := Dir("run", false); err != nil {
		t.Errorf("Dir(run): %v", err)
	}
	if err := os.Chmod(filepath.Join(b, "x"), 0o777); err != nil {
		t.Fatal(err)
	}
	if err := Dir("run", false); !errors.Is(err, ErrUnsafe) {
		t.Errorf("Dir(run) under a world-writable working directory: %v, want ErrUnsafe", err)
	}
}

// TestRelativePWD (review h/revfsperm2): a relative name is walked from
// the working directory the kernel uses, not from $PWD, which os.Getwd
// prefers when it names the same directory through other names: here
// another user's symlink (refused on main although the kernel never
// looks at it; through a bind mount $PWD can also name trusted
// directories above the working directory that are not its own).
func TestRelativePWD(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to chown")
	}
	b := t.TempDir()
	tr := tree{t}
	tr.dir(b+"/x/run", 0o700, -1)
	tr.dir(b+"/tmp", os.ModeSticky|0o777, -1)
	tr.link(b+"/x", b+"/tmp/theirs", other)
	t.Chdir(b + "/x")
	for _, tc := range []struct {
		name string
		pwd  string
	}{
		{"PWD the directory", b + "/x"},
		{"PWD through another user's symlink", b + "/tmp/theirs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("PWD", tc.pwd)
			if err := Dir("run", false); err != nil {
				t.Errorf("Dir(run): %v", err)
			}
		})
	}
}

// TestACL: a POSIX ACL granting another user write shows in the group
// bits (the ACL mask), which the check refuses: no ACL walk needed.
func TestACL(t *testing.T) {
	if _, err := exec.LookPath("setfacl"); err != nil {
		t.Skip("setfacl not installed")
	}
	dir := filepath.Join(t.TempDir(), "run")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := Dir(dir, false); err != nil {
		t.Fatalf("before the ACL: %v", err)
	}
	if out, err := exec.Command("setfacl", "-m", "u:nobody:rwx", dir).CombinedOutput(); err != nil {
		t.Skipf("setfacl: %v: %s", err, out)
	}
	if err := Dir(dir, false); !errors.Is(err, ErrUnsafe) {
		t.Fatalf("with user:nobody:rwx: %v, want ErrUnsafe", err)
	}
}

// TestEntries: a state directory's entries, symlinks read through
// (review h/revfsperm2: only a link's owner was checked; the rows
// "link to ..." and "dangling into ..." marked unsafe passed on main).
func TestEntries(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to chown")
	}
	for _, tc := range []struct {
		name   string
		setup  func(tr tree, b string) // b/state is there, 0700
		unsafe bool
	}{
		{"own 0600 file", func(tr tree, b string) { tr.file(b+"/state/leases.db", 0o600, -1) }, false},
		{"link to an own 0600 file", func(tr tree, b string) {
			tr.dir(b+"/data", 0o700, -1)
			tr.file(b+"/data/leases.db", 0o600, -1)
			tr.link(b+"/data/leases.db", b+"/state/leases.db", -1)
		}, false},
		{"dangling into an own directory", func(tr tree, b string) {
			tr.link(b+"/none/leases.db", b+"/state/leases.db", -1)
		}, false},
		{"link loop", func(tr tree, b string) {
			tr.link("b", b+"/state/a", -1)
			tr.link("a", b+"/state/b", -1)
		}, false},
		{"world-writable file", func(tr tree, b string) { tr.file(b+"/state/leases.db", 0o666, -1) }, true},
		{"another user's link", func(tr tree, b string) {
			tr.link("/", b+"/state/leases.db", other)
		}, true},
		{"link to a world-writable file", func(tr tree, b string) {
			tr.dir(b+"/data", 0o700, -1)
			tr.file(b+"/data/leases.db", 0o666, -1)
			tr.link(b+"/data/leases.db", b+"/state/leases.db", -1)
		}, true},
		{"link to a file in another user's directory", func(tr tree, b string) {
			tr.dir(b+"/home", 0o755, other)
			tr.file(b+"/home/leases.db", 0o600, -1)
			tr.link(b+"/home/leases.db", b+"/state/leases.db", -1)
		}, true},
		{"link to a world-writable directory", func(tr tree, b string) {
			tr.dir(b+"/pub", 0o777, -1)
			tr.link(b+"/pub", b+"/state/wal", -1)
		}, true},
		{"dangling into a world-writable directory", func(tr tree, b string) {
			tr.dir(b+"/pub", 0o777, -1)
			tr.link(b+"/pub/leases.db", b+"/state/leases.db", -1)
		}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := t.TempDir()
			tr := tree{t}
			tr.dir(b+"/state", 0o700, -1)
			tc.setup(tr, b)
			err := Entries(b + "/state")
			if tc.unsafe != errors.Is(err, ErrUnsafe) || !tc.unsafe && err != nil {
				t.Fatalf("Entries: %v, want unsafe: %v", err, tc.unsafe)
			}
		})
	}
}
