// Package fsperm checks that a file or directory pcpd trusts (its control
// socket's directory, its state directory, its config file) cannot be
// changed by another local user, as sshd checks its files: every
// directory from it up to / is owned by root or pcpd's own user and not
// writable by group or others (an ancestor may be if sticky, as /tmp:
// nobody else can rename what pcpd's user owns there).
package fsperm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// ErrUnsafe: the path, or a directory above it, can be changed by a user
// other than root and pcpd's own.
var ErrUnsafe = errors.New("writable by other users")

// Dir checks dir (symlinks resolved) and every directory above it. A
// sticky dir that others can write is refused as well (they can create
// names in it before pcpd does) unless stickyOK.
func Dir(dir string, stickyOK bool) error {
	real, err := filepath.EvalSymlinks(dir)
	if err == nil {
		real, err = filepath.Abs(real)
	}
	if err != nil {
		return err
	}
	for d, first := real, true; ; d, first = filepath.Dir(d), false {
		if err := check(d, dir, !first || stickyOK); err != nil {
			return err
		}
		if d == filepath.Dir(d) {
			return nil
		}
	}
}

// File checks the file path (symlinks resolved), then its directory and
// every one above it (a sticky directory is fine: the file is ours).
func File(path string) error {
	real, err := filepath.EvalSymlinks(path)
	if err == nil {
		real, err = filepath.Abs(real)
	}
	if err != nil {
		return err
	}
	if err := check(real, path, false); err != nil {
		return err
	}
	return Dir(filepath.Dir(real), true)
}

// check looks at one resolved path d (of the name the caller gave).
func check(d, name string, stickyOK bool) error {
	var st syscall.Stat_t
	if err := syscall.Lstat(d, &st); err != nil {
		return fmt.Errorf("%s: %w", d, err)
	}
	mode := st.Mode & 0o7777
	what := d
	if d != name {
		what = fmt.Sprintf("%s (for %s)", d, name)
	}
	switch {
	case st.Uid != 0 && st.Uid != uint32(os.Geteuid()):
		return fmt.Errorf("%s is owned by uid %d, neither root nor pcpd's user: %w", what, st.Uid, ErrUnsafe)
	case mode&0o022 != 0 && !(stickyOK && mode&syscall.S_ISVTX != 0):
		return fmt.Errorf("%s has mode %#o: %w", what, mode, ErrUnsafe)
	}
	return nil
}
