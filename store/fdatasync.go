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

// fdatasyncHeld is fdatasync for a commit's record (tryAppend): the same
// system call, made without telling the Go scheduler (fdatasyncHeldOS),
// so the goroutine keeps its P through it instead of sysmon handing the P
// to another thread after 20 µs and the goroutine waiting for one again
// when the sync returns. A commit's sync is one record's page or two and
// the device flush (p50 0.15 ms on the bench's disk). The grower's and
// the checkpoint's syncs, which write megabytes, keep fdatasync.
func fdatasyncHeld(f *os.File) error {
	if h := syncFault.Load(); h != nil {
		if err := (*h)(f); err != nil {
			return err
		}
	}
	return fdatasyncHeldOS(f)
}
