// Package fsperm checks that a file or directory pcpd trusts (its control
// socket's directory, its state directory, its config file) cannot be
// changed by another local user, as sshd checks its files: every
// directory from it up to / is owned by root or pcpd's own user and not
// writable by group or others (an ancestor may be if sticky, as /tmp:
// nobody else can rename what pcpd's user owns there).
//
// The path is walked as the kernel resolves it, one name at a time, and
// every name met is checked where it is met: the directories of the path
// as given, and of every symlink's target. A symlink must be owned by
// root or pcpd's user too: in a sticky directory its owner may replace
// it. So no user but those two can make the same path lead elsewhere
// later, and callers may go on using the path as given. (Checking only
// the resolved path, as before review h/revfsperm, missed the names that
// led there: another user's symlink in /tmp, or in their own directory,
// passed while it pointed at a trusted directory, and could be re-pointed
// the moment after.)
package fsperm

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// ErrUnsafe: the path, or a directory above it, can be changed by a user
// other than root and pcpd's own.
var ErrUnsafe = errors.New("writable by other users")

// maxLinks: as the kernel's limit on symlinks followed in one lookup.
const maxLinks = 40

// euid is pcpd's user; a variable for tests.
var euid = os.Geteuid

// Dir checks dir and every directory met on the way to it (see the
// package comment). A sticky dir that others can write is refused as
// well (they can create names in it before pcpd does) unless stickyOK.
func Dir(dir string, stickyOK bool) error {
	return walk(dir, stickyOK, false, 0, uint32(euid()))
}

// DirAs is Dir for a process other than pcpd checking pcpd's directory
// (the admin CLI, before it talks to the control socket): uid is pcpd's
// user, root's trusted beside it.
func DirAs(dir string, uid uint32, stickyOK bool) error {
	return walk(dir, stickyOK, false, 0, uid)
}

// MkdirAll is Dir, creating the directories missing on the way with mode
// perm (as os.MkdirAll), each only once the directory it is made in has
// been checked: a path refused creates nothing in a place another user
// controls.
func MkdirAll(dir string, perm os.FileMode, stickyOK bool) error {
	return walk(dir, stickyOK, false, perm|fs.ModeDir, uint32(euid()))
}

// File checks the file path, and every directory met on the way to it (a
// sticky directory is fine: the file is ours).
func File(path string) error {
	return walk(path, false, true, 0, uint32(euid()))
}

// Entries checks what dir (a directory Dir passed) holds: each entry
// owned by root or pcpd's user and not writable by group or others; a
// symlink leads to a file or directory that passes File or Dir. For a directory whose files pcpd reads as trusted (its
// state): one copied in with a loose mode would let others write it.
func Entries(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		p := filepath.Join(dir, e.Name())
		var st syscall.Stat_t
		if err := syscall.Lstat(p, &st); errors.Is(err, syscall.ENOENT) {
			continue
		} else if err != nil {
			return &fs.PathError{Op: "lstat", Path: p, Err: err}
		}
		if err := owner(p, p, st.Uid, uint32(euid())); err != nil {
			return err
		}
		if st.Mode&syscall.S_IFMT == syscall.S_IFLNK {
			// Read through: what it leads to must be trusted too
			// (review h/revfsperm2: the link's owner alone was).
			// Dangling, it must lead into trusted directories as far
			// as it goes (a file may be created through it): walk
			// checks every directory met before the missing name.
			var tst syscall.Stat_t
			dir := syscall.Stat(p, &tst) == nil && tst.Mode&syscall.S_IFMT == syscall.S_IFDIR
			if err := walk(p, false, !dir, 0, uint32(euid())); err != nil && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.ELOOP) {
				return err
			}
			continue
		}
		if st.Mode&0o022 != 0 {
			return fmt.Errorf("%s has mode %#o: %w", p, st.Mode&0o7777, ErrUnsafe)
		}
	}
	return nil
}

// walk resolves name one component at a time, checking each directory it
// passes and each symlink it follows, and then the final one (stickyOK for
// it; a regular file when file). mkdir non-zero: create what is missing.
// user is pcpd's user (trusted with root).
func walk(name string, stickyOK, file bool, mkdir os.FileMode, user uint32) error {
	rest := name
	if !filepath.IsAbs(rest) {
		// The kernel's working directory (getcwd), not os.Getwd's
		// $PWD, which may name it through other names.
		wd, err := syscall.Getwd()
		if err != nil {
			return err
		}
		rest = wd + "/" + rest
	}
	if err := check("/", name, true, false, user); err != nil {
		return err
	}
	done, links := "/", 0
	for {
		var c string
		rest = strings.TrimLeft(rest, "/")
		c, rest, _ = strings.Cut(rest, "/")
		rest = strings.TrimLeft(rest, "/")
		last := rest == ""
		switch c {
		case "", ".":
			if last {
				// The directory reached, once more as the last.
				return check(done, name, stickyOK, file, user)
			}
			continue
		case "..":
			// Every directory of done was checked on the way down.
			done = filepath.Dir(done)
			if last {
				return check(done, name, stickyOK, file, user)
			}
			continue
		}
		next := filepath.Join(done, c)
		var st syscall.Stat_t
		err := syscall.Lstat(next, &st)
		if errors.Is(err, syscall.ENOENT) && mkdir != 0 {
			// done is checked: nobody else can create c in it now.
			if err = os.Mkdir(next, mkdir.Perm()); err == nil || errors.Is(err, fs.ErrExist) {
				err = syscall.Lstat(next, &st)
			}
		}
		if err != nil {
			return &fs.PathError{Op: "lstat", Path: next, Err: err}
		}
		if st.Mode&syscall.S_IFMT == syscall.S_IFLNK {
			// Its directory, done, is checked; the link itself must
			// be ours too (in a sticky directory its owner may
			// replace it).
			if err := owner(next, name, st.Uid, user); err != nil {
				return err
			}
			if links++; links > maxLinks {
				return &fs.PathError{Op: "walk", Path: name, Err: syscall.ELOOP}
			}
			target, err := os.Readlink(next)
			if err != nil {
				return err
			}
			if filepath.IsAbs(target) {
				done = "/"
			}
			rest = target + "/" + rest
			continue
		}
		if last {
			return check(next, name, stickyOK, file, user)
		}
		if err := check(next, name, true, false, user); err != nil {
			return err
		}
		done = next
	}
}

// owner refuses d (met on the way to name) unless root or pcpd's user
// (user) owns it.
func owner(d, name string, uid, user uint32) error {
	if uid != 0 && uid != user {
		return fmt.Errorf("%s is owned by uid %d, neither root nor pcpd's user: %w", what(d, name), uid, ErrUnsafe)
	}
	return nil
}

func what(d, name string) string {
	if d != name {
		return fmt.Sprintf("%s (for %s)", d, name)
	}
	return d
}

// check looks at one resolved path d (met on the way to name): a
// directory, or a regular file when file.
func check(d, name string, stickyOK, file bool, user uint32) error {
	var st syscall.Stat_t
	if err := syscall.Lstat(d, &st); err != nil {
		return &fs.PathError{Op: "lstat", Path: d, Err: err}
	}
	mode := st.Mode & 0o7777
	switch typ := st.Mode & syscall.S_IFMT; {
	case file && typ != syscall.S_IFREG:
		return fmt.Errorf("%s: not a regular file", what(d, name))
	case !file && typ != syscall.S_IFDIR:
		return &fs.PathError{Op: "walk", Path: what(d, name), Err: syscall.ENOTDIR}
	}
	if err := owner(d, name, st.Uid, user); err != nil {
		return err
	}
	if mode&0o022 != 0 && !(stickyOK && mode&syscall.S_ISVTX != 0) {
		return fmt.Errorf("%s has mode %#o: %w", what(d, name), mode, ErrUnsafe)
	}
	return nil
}
