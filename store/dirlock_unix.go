//go:build unix

package store

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"
)

// lockRetry is how often lockDir tries again (as bbolt does for its lock).
const lockRetry = 50 * time.Millisecond

// lockDir takes an exclusive flock on the state directory itself, before
// Open looks at any file in it: recovery (restoring the backup copy,
// moving a damaged file aside), the log and the boot anchor are touched
// only by the pcpd holding it. Review h/revbk: bbolt's own lock on
// leases.db came only after recovery, so two pcpds started together on a
// damaged directory both recovered, and one could move the backup aside
// and put an empty file over the other's restored one. The directory's
// own descriptor needs no file created, so a read-only directory (pcpd
// still starts, read-only) is locked too and keeps a second pcpd out.
// The lock is held until Close (the descriptor closes); flock is per open
// file, so a second Open in the same process waits as another process
// would. timeout 0 waits for ever (bbolt's Timeout).
func lockDir(dir string, timeout time.Duration) (*os.File, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("store: state directory: %w", err)
	}
	start := time.Now()
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return f, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("store: lock state directory %s: %w", dir, err)
		}
		if timeout != 0 && time.Since(start) >= timeout {
			f.Close()
			return nil, fmt.Errorf("store: another pcpd holds the state directory %s (not released within %v): %w",
				dir, timeout, ErrLocked)
		}
		time.Sleep(lockRetry)
	}
}
