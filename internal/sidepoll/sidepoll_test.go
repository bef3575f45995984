package sidepoll

import (
	"errors"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// never is long enough that a Wait that should return but does not is a
// hang, not a slow machine; it is a deadline for the test, not a timing
// assertion.
const never = 10 * time.Second

func newPoller(t *testing.T) *Poller {
	t.Helper()
	p, err := New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// pipe returns a non-blocking pipe, closed with the test.
func pipe(t *testing.T) (r, w int) {
	t.Helper()
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fds[0]); unix.Close(fds[1]) })
	return fds[0], fds[1]
}

func waitAsync(p *Poller, done <-chan struct{}, fd int) <-chan error {
	out := make(chan error, 1)
	go func() { out <- p.Wait(done, fd) }()
	return out
}

func write(t *testing.T, fd int) {
	t.Helper()
	if _, err := unix.Write(fd, []byte{1}); err != nil {
		t.Fatal(err)
	}
}

func drain(t *testing.T, fd int) {
	t.Helper()
	var b [64]byte
	if _, err := unix.Read(fd, b[:]); err != nil {
		t.Fatal(err)
	}
}

// pending fails the test if ch has a value now.
func pending(t *testing.T, ch <-chan error, what string) {
	t.Helper()
	runtime.Gosched()
	select {
	case err := <-ch:
		t.Fatalf("%s: Wait returned %v before its fd was readable", what, err)
	default:
	}
}

func result(t *testing.T, ch <-chan error, what string) error {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(never):
		t.Fatalf("%s: Wait did not return", what)
		return nil
	}
}

func TestWait(t *testing.T) {
	p := newPoller(t)
	for _, tc := range []struct {
		name    string
		waiters int
		before  bool // data queued before the Wait
	}{
		{"one waiter", 1, false},
		{"already readable", 1, true},
		{"three waiters on one fd", 3, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, w := pipe(t)
			if tc.before {
				write(t, w)
			}
			var outs []<-chan error
			for range tc.waiters {
				outs = append(outs, waitAsync(p, nil, r))
			}
			if !tc.before {
				// Every waiter must be armed and blocked before the
				// write, or the test would not show that the write
				// is what wakes them.
				waitArmed(t, p, r, tc.waiters)
				for _, o := range outs {
					pending(t, o, tc.name)
				}
				write(t, w)
			}
			for i, o := range outs {
				if err := result(t, o, tc.name); err != nil {
					t.Fatalf("waiter %d: %v", i, err)
				}
			}
			drain(t, r)
			// Re-armed by the next Wait: one-shot per Wait, not per fd.
			o := waitAsync(p, nil, r)
			waitArmed(t, p, r, 1)
			pending(t, o, tc.name+", second round")
			write(t, w)
			if err := result(t, o, tc.name+", second round"); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// waitArmed waits until n waiters are registered on fd.
func waitArmed(t *testing.T, p *Poller, fd, n int) {
	t.Helper()
	deadline := time.Now().Add(never)
	for {
		p.mu.Lock()
		got := len(p.fds[int32(fd)])
		p.mu.Unlock()
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d waiters armed on fd %d, want %d", got, fd, n)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestWaitCanceled(t *testing.T) {
	p := newPoller(t)
	r, w := pipe(t)
	done := make(chan struct{})
	stay := waitAsync(p, nil, r)
	leave := waitAsync(p, done, r)
	waitArmed(t, p, r, 2)
	close(done)
	if err := result(t, leave, "canceled"); !errors.Is(err, ErrCanceled) {
		t.Fatalf("canceled Wait: %v, want ErrCanceled", err)
	}
	// The other waiter is still armed and still wakes.
	waitArmed(t, p, r, 1)
	pending(t, stay, "remaining waiter")
	write(t, w)
	if err := result(t, stay, "remaining waiter"); err != nil {
		t.Fatal(err)
	}
}

// TestWaitFdReused: a caller that cancels, closes its fd and opens another
// one under the same number is served normally (the registration of the
// old file is gone with it; a stale entry must not swallow the new Wait).
func TestWaitFdReused(t *testing.T) {
	p := newPoller(t)
	for round := range 3 {
		var fds [2]int
		if err := unix.Pipe2(fds[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		r, w := fds[0], fds[1]
		done := make(chan struct{})
		o := waitAsync(p, done, r)
		waitArmed(t, p, r, 1)
		if round%2 == 1 {
			// Close without waiting for the canceled Wait to leave: the
			// race Listener.Close has.
			close(done)
			unix.Close(r)
			unix.Close(w)
			if err := result(t, o, "canceled"); !errors.Is(err, ErrCanceled) {
				t.Fatalf("canceled: %v", err)
			}
		} else {
			write(t, w)
			if err := result(t, o, "first"); err != nil {
				t.Fatal(err)
			}
			unix.Close(r)
			unix.Close(w)
		}

		var again [2]int
		if err := unix.Pipe2(again[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
			t.Fatal(err)
		}
		if again[0] != r {
			t.Logf("round %d: fd %d not reused (got %d); still checked", round, r, again[0])
		}
		o2 := waitAsync(p, nil, again[0])
		waitArmed(t, p, again[0], 1)
		pending(t, o2, "reused fd")
		write(t, again[1])
		if err := result(t, o2, "reused fd"); err != nil {
			t.Fatal(err)
		}
		unix.Close(again[0])
		unix.Close(again[1])
	}
}

func TestClose(t *testing.T) {
	p, err := New()
	if err != nil {
		t.Fatal(err)
	}
	r, _ := pipe(t)
	o := waitAsync(p, nil, r)
	waitArmed(t, p, r, 1)
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := result(t, o, "closed"); !errors.Is(err, ErrClosed) {
		t.Fatalf("Wait across Close: %v, want ErrClosed", err)
	}
	if err := p.Wait(nil, r); !errors.Is(err, ErrClosed) {
		t.Fatalf("Wait after Close: %v, want ErrClosed", err)
	}
}

// ioWaiters lists the goroutines parked in Go's netpoller ("IO wait")
// whose stacks pass through this package or the function named.
func ioWaiters(match string) []string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		head, _, _ := strings.Cut(g, "\n")
		if strings.Contains(head, "[IO wait") && strings.Contains(g, match) {
			out = append(out, g)
		}
	}
	return out
}

// TestNotANetpollWaiter is the point of the package: a goroutine waiting
// for a socket here is not parked in Go's netpoller, where the same
// goroutine reading the socket would be.
func TestNotANetpollWaiter(t *testing.T) {
	p := newPoller(t)
	conn, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rc, err := conn.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var fd int
	rc.Control(func(f uintptr) { fd = int(f) })

	// Control: the plain read is an IO waiter; the helper proves the
	// check can see one.
	other, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	go func() {
		var b [16]byte
		other.ReadFromUDP(b[:])
	}()
	deadline := time.Now().Add(never)
	for len(ioWaiters("TestNotANetpollWaiter")) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("control: a plain ReadFromUDP never showed as IO wait")
		}
		time.Sleep(time.Millisecond)
	}
	other.Close()
	for len(ioWaiters("TestNotANetpollWaiter")) != 0 {
		if time.Now().After(deadline) {
			t.Fatal("control reader did not leave")
		}
		time.Sleep(time.Millisecond)
	}

	o := waitAsync(p, nil, fd)
	waitArmed(t, p, fd, 1)
	if ws := ioWaiters("sidepoll"); len(ws) != 0 {
		t.Fatalf("goroutines in Go's netpoller while waiting on the side poller:\n%s", strings.Join(ws, "\n\n"))
	}
	pending(t, o, "udp")
	snd, err := net.DialUDP("udp", nil, conn.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	defer snd.Close()
	if _, err := snd.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := result(t, o, "udp"); err != nil {
		t.Fatal(err)
	}
}

func TestListener(t *testing.T) {
	p := newPoller(t)
	for _, network := range []string{"tcp", "unix"} {
		t.Run(network, func(t *testing.T) {
			addr := "127.0.0.1:0"
			if network == "unix" {
				addr = t.TempDir() + "/s"
			}
			raw, err := net.Listen(network, addr)
			if err != nil {
				t.Fatal(err)
			}
			ln, err := p.Listener(raw)
			if err != nil {
				t.Fatal(err)
			}
			type res struct {
				c   net.Conn
				err error
			}
			accept := func() <-chan res {
				out := make(chan res, 1)
				go func() {
					c, err := ln.Accept()
					out <- res{c, err}
				}()
				return out
			}
			for i := range 3 {
				a := accept()
				fd := ln.(*listener).fd
				waitArmed(t, p, fd, 1)
				if ws := ioWaiters("sidepoll"); len(ws) != 0 {
					t.Fatalf("Accept parked in Go's netpoller:\n%s", strings.Join(ws, "\n\n"))
				}
				c, err := net.Dial(network, raw.Addr().String())
				if err != nil {
					t.Fatal(err)
				}
				select {
				case r := <-a:
					if r.err != nil {
						t.Fatalf("accept %d: %v", i, r.err)
					}
					r.c.Close()
				case <-time.After(never):
					t.Fatalf("accept %d did not return", i)
				}
				c.Close()
			}
			// Close wakes a waiting Accept with net.ErrClosed, as a plain
			// listener's would.
			a := accept()
			waitArmed(t, p, ln.(*listener).fd, 1)
			if err := ln.Close(); err != nil {
				t.Fatal(err)
			}
			select {
			case r := <-a:
				if !errors.Is(r.err, net.ErrClosed) {
					t.Fatalf("Accept across Close: %v, want net.ErrClosed", r.err)
				}
			case <-time.After(never):
				t.Fatal("Accept did not return after Close")
			}
		})
	}
}
