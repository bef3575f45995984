package store

import (
	"os"
	"sync/atomic"
)

// syncFault, when set (tests only), runs before every fdatasync of the
// store and fails it with the error it returns: how the tests make a sync
// fail after its write succeeded, which a full or read-only file system
// can not do (the write fails first there).
var syncFault atomic.Pointer[func(*os.File) error]

// fdatasync syncs f's data (fdatasyncOS), unless a test's syncFault fails
// it first.
func fdatasync(f *os.File) error {
	if h := syncFault.Load(); h != nil {
		if err := (*h)(f); err != nil {
			return err
		}
	}
	return fdatasyncOS(f)
}
