package server

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// inNS runs fn on an OS thread switched into ns, so that sockets fn creates
// belong to ns (a socket keeps the namespace it was created in). With ns
// closed or unset fn runs in the caller's namespace. The thread is only
// returned to the scheduler if switching back succeeded; otherwise it dies
// with the goroutine, so no other goroutine ever runs in the wrong namespace.
func inNS(ns netns.NsHandle, fn func() error) error {
	if !nsSet(ns) {
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("server: get current netns: %w", err)
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("server: enter netns: %w", err)
			runtime.UnlockOSThread()
			return
		}
		errc <- fn()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
	}()
	return <-errc
}

// nsSet reports whether ns names a namespace to enter. The zero value (fd
// 0, stdin) and netns.None() (-1) both mean "this process's namespace", so
// a Config literal without NetNS serves where the process runs.
func nsSet(ns netns.NsHandle) bool { return ns > 0 }
