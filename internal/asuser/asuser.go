// Package asuser runs a piece of a root test as another local user: the
// opens, connects and locks another user on the host could make, checked
// by the kernel against that user's rights.
package asuser

import (
	"runtime"

	"golang.org/x/sys/unix"
)

// Do runs fn on a thread of its own whose effective uid (and so file-system
// uid) is uid, and returns once fn has. It needs root. The thread is
// locked and exits with its goroutine, so it never runs anything else:
// setresuid(2) is made on this thread only (syscall.Setresuid and
// unix.Setresuid change every thread of the process). What fn opens
// stays open after it returns, with the credentials it was opened with.
func Do(uid int, fn func()) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with us
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, ^uintptr(0), uintptr(uid), ^uintptr(0)); e != 0 {
			errc <- e
			return
		}
		fn()
		errc <- nil
	}()
	return <-errc
}
