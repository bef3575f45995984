//go:build unix

package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// lockRetry is how often lockState tries again (as bbolt does for its lock).
const lockRetry = 50 * time.Millisecond

// lockState takes the state directory's exclusive lock before Open looks
// at any file in it: recovery (restoring the backup copy, moving a damaged
// file aside), the log and the boot anchor are touched only by the pcpd
// holding it. Review h/revbk: bbolt's own lock on leases.db came only after
// recovery, so two pcpds started together on a damaged directory both
// recovered, and one could move the backup aside and put an empty file
// over the other's restored one.
//
// What is locked is LockName, a file of its own, 0600 (created here when
// the directory is writable; opened read-only when it is not): only root
// and pcpd's user can open it, and flock needs an open file. Until review
// h/revfsperm the directory itself was locked (no file to create, so a
// read-only directory was covered too), but a directory others may read
// (0755 passes fsperm, and is systemd's StateDirectory= default) any local
// user can open and flock: `flock -x DIR sleep inf` as nobody kept pcpd
// from starting. Not leases.db: bbolt flocks that one itself, from another
// descriptor (flock is per open file, so ours would keep bbolt's out), and
// Open has to look at it (recovery) before it is known to be good.
//
// Only where no lock file can be made or found (a read-only directory
// that never had one: written by a pcpd before the lock file, or empty)
// is the directory locked instead, as before, and then noFile says why:
// the Store writes nothing, in Open (load takes the directory as
// read-only) or later, until lockFileLater holds the lock file. So two
// pcpds never write one directory: one holding the directory's lock has
// none of the file's until it takes it (and fails if another pcpd, started
// once the directory was writable, holds it). Such a directory can still be
// held by another user, as every directory could before.
//
// The lock is held until Close (the descriptor closes; the kernel lets
// it go when pcpd dies, kill -9 included); flock is per open file, so a
// second Open in the same process waits as another process would; the
// descriptor is close-on-exec (a child must not keep it). timeout 0 waits
// for ever (bbolt's Timeout).
//
// With the lock file held, the directory is also flocked shared when it
// can be at once (shareDir; dirShared, nil if not): a pcpd built before
// the lock file (d60f2c1..108ebff) locks the directory exclusively, so
// without this it started beside a newer one and recovered, removed
// temporary files and replayed the log before bbolt's lock on leases.db
// stopped it (review h/revstatelock). Not waited for: another user's
// lock on the directory must not keep pcpd from starting, and an older
// pcpd already running is indistinguishable from it (bbolt's lock on
// leases.db is then all that keeps the two apart, as before d60f2c1).
func lockState(dir string, timeout time.Duration) (f, dirShared *os.File, noFile, err error) {
	f, noFile, err = openLockFile(dir)
	if err != nil {
		return nil, nil, nil, err
	}
	if noFile != nil {
		if f, err = os.Open(dir); err != nil {
			return nil, nil, nil, fmt.Errorf("store: state directory: %w", err)
		}
	}
	start := time.Now()
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			if noFile == nil {
				dirShared = shareDir(dir)
			}
			return f, dirShared, noFile, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) && !errors.Is(err, unix.EINTR) {
			f.Close()
			return nil, nil, nil, fmt.Errorf("store: lock state directory %s: %w", dir, err)
		}
		if timeout != 0 && time.Since(start) >= timeout {
			f.Close()
			return nil, nil, nil, fmt.Errorf("store: another pcpd holds the state directory %s (not released within %v): %w",
				dir, timeout, ErrLocked)
		}
		time.Sleep(lockRetry)
	}
}

// shareDir flocks dir shared, without waiting (lockState): the open
// directory, or nil if someone holds it exclusively (an older pcpd, or
// another user) or it can not be opened.
func shareDir(dir string) *os.File {
	d, err := os.Open(dir)
	if err != nil {
		return nil
	}
	if unix.Flock(int(d.Fd()), unix.LOCK_SH|unix.LOCK_NB) != nil {
		d.Close()
		return nil
	}
	return d
}

// openLockFile opens dir's lock file, creating it 0600 if it is missing
// and the directory writable. A lock file that does not exist and can not
// be created gives noFile (why), not an error. Never follows a symlink,
// and only a regular file will do (O_NONBLOCK: a FIFO put there does not
// hang the open). One others could open (copied in with a wider mode) is
// made 0600 when it can be.
func openLockFile(dir string) (f *os.File, noFile, err error) {
	p := filepath.Join(dir, LockName)
	const flags = unix.O_NOFOLLOW | unix.O_NONBLOCK // os adds O_CLOEXEC
	f, cerr := os.OpenFile(p, os.O_RDWR|os.O_CREATE|flags, 0o600)
	if cerr != nil {
		if !isReadOnlyErr(cerr) && !errors.Is(cerr, unix.ENOSPC) && !errors.Is(cerr, unix.EDQUOT) {
			return nil, nil, fmt.Errorf("store: lock file: %w", cerr)
		}
		// flock does not care how the file was opened.
		var err error
		if f, err = os.OpenFile(p, os.O_RDONLY|flags, 0); errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("lock file %s can not be created: %w", LockName, cerr), nil
		} else if err != nil {
			return nil, nil, fmt.Errorf("store: lock file: %w", err)
		}
	}
	fi, err := f.Stat()
	if err == nil && !fi.Mode().IsRegular() {
		err = fmt.Errorf("%s is not a regular file (%v)", p, fi.Mode().Type())
	}
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("store: lock file: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		// Whoever opened it meanwhile keeps their descriptor; a file
		// pcpd creates is never so.
		_ = f.Chmod(0o600)
	}
	return f, nil, nil
}

// lockFileLater: a Store that holds only the directory's lock (lockState's
// fallback: no lock file could be made at Open) takes the lock file before
// it writes anything, without waiting: another pcpd holding it gives
// ErrLocked; a directory still read-only, its noFile error. Once held, the
// directory's lock goes. Under s.mu (reopen).
func (s *Store) lockFileLater() error {
	if s.noLockFile == nil {
		return nil
	}
	f, noFile, err := openLockFile(s.dir)
	if err != nil {
		return err
	}
	if noFile != nil {
		return noFile
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return fmt.Errorf("store: another pcpd holds the state directory %s (its lock file): %w", s.dir, ErrLocked)
		}
		return fmt.Errorf("store: lock %s: %w", LockName, err)
	}
	// The directory's exclusive lock becomes shared (lockState's
	// dirShared): an older pcpd still finds it held.
	if d := s.dirLock; d != nil {
		if unix.Flock(int(d.Fd()), unix.LOCK_SH|unix.LOCK_NB) == nil {
			s.dirShared = d
		} else {
			_ = d.Close()
		}
	}
	s.dirLock, s.noLockFile = f, nil
	s.log.Info("state directory's lock file taken", zap.String("dir", s.dir))
	return nil
}
