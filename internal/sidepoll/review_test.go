package sidepoll

import (
	"context"
	"errors"
	"net"
	"net/http"
	"runtime"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestStaleEventWakesNextWaiter: an event the poller's goroutine has taken
// from epoll_wait but not yet handed out (it needs a processor for that,
// and both may be busy) belongs to the registration it was armed for. If
// that Wait is canceled and the fd number is Waited on again (the same
// file, or a new one under a reused number) before the goroutine runs, the
// stale event must not wake the new Wait: its fd is not readable, and a
// caller that then reads (routeWatch: NetlinkSocket.Receive) parks in Go's
// netpoller, where routeWatch.close, which waits for it to leave before
// it closes the socket, waits forever.
//
// GOMAXPROCS=1 holds the poller's goroutine off its processor between
// epoll_wait and the hand-out while this one, which does not yield, cancels
// and re-arms; each round is one try at that window.
func TestStaleEventWakesNextWaiter(t *testing.T) {
	p := newPoller(t)
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	time.Sleep(10 * time.Millisecond) // the loop is in epoll_wait
	tried := 0
	for round := 0; round < 200 && tried < 20; round++ {
		var a, b [2]int
		if err := unix.Pipe2(a[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		if err := unix.Pipe2(b[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		fd := int32(a[0])
		chA := make(chan struct{})
		if err := p.arm(fd, chA); err != nil {
			t.Fatal(err)
		}
		// The loop's thread wakes and wants the only P, which this
		// goroutine keeps: a raw write does not hand it off, as a
		// system call through the runtime would.
		one := []byte{1}
		unix.RawSyscall(unix.SYS_WRITE, uintptr(a[1]), uintptr(unsafe.Pointer(&one[0])), 1)
		for start := time.Now(); time.Since(start) < 5*time.Millisecond; {
		}
		select {
		case <-chA:
			// The loop got there first: no window this round.
		default:
			tried++
			p.cancel(fd, chA)
			// The caller closes its fd; the number is reused by a file
			// with nothing to read.
			unix.Dup3(b[0], int(fd), unix.O_CLOEXEC)
			chB := make(chan struct{})
			if err := p.arm(fd, chB); err != nil {
				t.Fatal(err)
			}
			time.Sleep(20 * time.Millisecond) // the loop runs
			var buf [1]byte
			_, rerr := unix.Read(int(fd), buf[:])
			select {
			case <-chB:
				t.Fatalf("round %d: Wait on fd %d woke with nothing to read (read: %v): a stale event from the previous registration", round, fd, rerr)
			default:
			}
			p.cancel(fd, chB)
		}
		unix.Close(a[0])
		unix.Close(a[1])
		unix.Close(b[0])
		unix.Close(b[1])
	}
	if tried == 0 {
		t.Skip("the poller always handed its event out first: window never opened")
	}
	t.Logf("%d rounds opened the window", tried)
}

// TestCloseTwice: a second Close must not touch descriptors: the eventfd
// and epoll numbers the first Close released belong to whoever opened
// next, and the second Close wrote to and closed them.
func TestCloseTwice(t *testing.T) {
	p, err := New()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	// The lowest free numbers: the ones Close just released.
	r, w := pipe(t)
	if r != p.epfd && r != p.wakefd && w != p.epfd && w != p.wakefd {
		t.Logf("pipe %d,%d did not reuse %d,%d; still checked", r, w, p.epfd, p.wakefd)
	}
	p.Close()
	for _, fd := range []int{r, w} {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil {
			t.Fatalf("fd %d, opened after the first Close, is gone after the second: %v", fd, err)
		}
	}
}

// TestAcceptAfterClose: Accept on a closed Listener says net.ErrClosed, as
// a plain listener's does (http.Server and control.Serve call Accept again
// after a connection, and Close may come in between).
func TestAcceptAfterClose(t *testing.T) {
	p := newPoller(t)
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := p.Listener(raw)
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
	if _, err := ln.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Accept after Close: %v, want net.ErrClosed", err)
	}
}

// TestHTTPServerClose: pcpd's metrics server serves a wrapped listener;
// Close and Shutdown, which close the listener Serve was given, end a
// Serve whose Accept waits on the side poller.
func TestHTTPServerClose(t *testing.T) {
	p := newPoller(t)
	for _, how := range []string{"Close", "Shutdown"} {
		t.Run(how, func(t *testing.T) {
			raw, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			ln, err := p.Listener(raw)
			if err != nil {
				t.Fatal(err)
			}
			srv := &http.Server{Handler: http.NotFoundHandler()}
			out := make(chan error, 1)
			go func() { out <- srv.Serve(ln) }()
			resp, err := http.Get("http://" + raw.Addr().String() + "/")
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			waitArmed(t, p, ln.(*listener).fd, 1)
			if how == "Close" {
				srv.Close()
			} else {
				srv.Shutdown(context.Background())
			}
			select {
			case err := <-out:
				if !errors.Is(err, http.ErrServerClosed) {
					t.Fatalf("Serve: %v", err)
				}
			case <-time.After(never):
				t.Fatal("Serve did not return")
			}
		})
	}
}

// TestWaitWhileProcessorsBusy: with every processor running goroutines
// that never block, the poller's goroutine still gets one (preemption) to
// hand out readiness.
func TestWaitWhileProcessorsBusy(t *testing.T) {
	p := newPoller(t)
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	r, w := pipe(t)
	o := waitAsync(p, nil, r)
	waitArmed(t, p, r, 1)
	stop := make(chan struct{})
	defer close(stop)
	for range 2 {
		go func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
			}
		}()
	}
	write(t, w)
	if err := result(t, o, "busy"); err != nil {
		t.Fatal(err)
	}
}

// TestCloseWhileWaiting: Close amid goroutines that keep arming, waking
// and canceling on shared fds ends every one of them with ErrClosed.
func TestCloseWhileWaiting(t *testing.T) {
	for round := range 20 {
		p, err := New()
		if err != nil {
			t.Fatal(err)
		}
		r, w := pipe(t)
		r2, _ := pipe(t)
		stop := make(chan struct{})
		out := make(chan error, 8)
		for i := range 8 {
			fd := r
			if i%2 == 1 {
				fd = r2
			}
			go func() {
				for {
					done := make(chan struct{})
					if i%3 == 0 {
						close(done)
					}
					err := p.Wait(done, fd)
					if errors.Is(err, ErrCanceled) {
						select {
						case <-p.closed:
							// A canceled Wait need not look at
							// the Poller first.
							err = ErrClosed
						default:
						}
					}
					if err != nil && !errors.Is(err, ErrCanceled) {
						out <- err
						return
					}
				}
			}()
		}
		go func() {
			for {
				select {
				case <-stop:
					return
				default:
					unix.Write(w, []byte{1})
					var b [64]byte
					unix.Read(r, b[:])
				}
			}
		}()
		time.Sleep(time.Millisecond)
		if err := p.Close(); err != nil {
			t.Fatal(err)
		}
		for range 8 {
			select {
			case err := <-out:
				if !errors.Is(err, ErrClosed) {
					t.Fatalf("round %d: %v, want ErrClosed", round, err)
				}
			case <-time.After(never):
				t.Fatalf("round %d: a Wait did not return after Close", round)
			}
		}
		close(stop)
	}
}
