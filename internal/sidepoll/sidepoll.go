// Package sidepoll waits for file descriptors that are idle nearly all the
// time on a private epoll instance, read by one goroutine blocked in
// epoll_wait, instead of in Go's network poller.
//
// Why: while any goroutine waits in Go's netpoller, every thread of the
// runtime that runs out of work polls it (a non-blocking epoll_pwait)
// before it sleeps, and the last one sleeps in epoll_pwait. A server whose
// hot sockets keep both processors busy pays those polls on every idle
// moment between batches. pcpd always had some such waiters — the control
// socket's accept, its netlink subscriptions, the sockets of served
// addresses that see no traffic — and removing them cut the error path's
// epoll_pwait calls from 0.43–0.45 to 0.32–0.33 a request and its CPU by
// 1.2–2.4 µs a request (BENCHMARKS.md items 29 and 31). A goroutine waiting
// here is blocked on a channel, which the runtime's idle path never polls.
//
// The price is one thread parked in epoll_wait for the life of the process
// and a hand-off (the poller's goroutine wakes and closes a channel) on
// every readiness, so it is for the cold path only: hot sockets stay in
// Go's netpoller, which hands a ready goroutine straight to a processor.
package sidepoll

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrClosed is returned by Wait once the Poller is closed.
var ErrClosed = errors.New("sidepoll: poller closed")

// ErrCanceled is returned by Wait when its done channel closed first.
var ErrCanceled = errors.New("sidepoll: wait canceled")

// Poller is a private epoll instance and the goroutine that waits on it.
type Poller struct {
	epfd   int
	wakefd int // an eventfd: written by Close to end the wait loop
	closed chan struct{}
	ended  chan struct{} // the loop has returned

	mu sync.Mutex
	// fds holds the descriptors with a registration armed in epfd and the
	// waiters to wake when it fires. A registration is one-shot: the
	// entry is deleted when it fires or when its last waiter gives up.
	fds map[int32][]chan struct{}
	// gens holds the generation each fd in fds was last armed with; it
	// travels in the event's data, so that an event epoll_wait returned
	// for an earlier registration (the loop had not handed it out when
	// its Wait was canceled and the number armed again, perhaps for
	// another file) wakes nobody. Every arm takes a new one: a MOD
	// re-queues a level-triggered fd that is still readable.
	gens map[int32]uint32
	gen  uint32
	shut bool

	closeOnce sync.Once
	closeErr  error
}

// New starts a Poller.
func New() (*Poller, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("sidepoll: epoll_create1: %w", err)
	}
	wakefd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("sidepoll: eventfd: %w", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wakefd)}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wakefd, &ev); err != nil {
		unix.Close(wakefd)
		unix.Close(epfd)
		return nil, fmt.Errorf("sidepoll: epoll_ctl eventfd: %w", err)
	}
	p := &Poller{
		epfd:   epfd,
		wakefd: wakefd,
		closed: make(chan struct{}),
		ended:  make(chan struct{}),
		fds:    map[int32][]chan struct{}{},
		gens:   map[int32]uint32{},
	}
	go p.loop()
	return p, nil
}

var std = sync.OnceValues(New)

// Default is the process's Poller, started on first use and never closed.
func Default() (*Poller, error) { return std() }

// Wait blocks until fd is readable (or has an error or hang-up pending,
// which the caller's next read reports), done is closed (ErrCanceled) or
// the Poller is closed (ErrClosed). Readiness is level-triggered: if data
// is already queued, Wait returns at once. Several goroutines may wait on
// one fd; all of them wake.
//
// The caller owns fd. It must not close fd while a Wait on it is in
// progress (closing an fd removes it from epoll without any event, so the
// Wait would never return): close done first, then fd.
func (p *Poller) Wait(done <-chan struct{}, fd int) error {
	select {
	case <-done:
		// Do not arm an fd whose owner may have closed it already.
		return ErrCanceled
	default:
	}
	ch := make(chan struct{})
	if err := p.arm(int32(fd), ch); err != nil {
		return err
	}
	select {
	case <-ch:
		return nil
	case <-done:
		p.cancel(int32(fd), ch)
		return ErrCanceled
	case <-p.closed:
		p.cancel(int32(fd), ch)
		return ErrClosed
	}
}

func (p *Poller) arm(fd int32, ch chan struct{}) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.shut {
		return ErrClosed
	}
	// EPOLLONESHOT: the thread reports the fd once and it stays disarmed
	// until the next Wait, so a socket whose reader is busy draining it
	// never makes this thread spin. The registration of a fired fd stays
	// in the kernel (disarmed) until the fd is closed, hence MOD after
	// EEXIST; a closed and reused fd number was removed by the kernel,
	// hence ADD first. Arming on every Wait, even with waiters already
	// there, also covers an entry left by a caller that closed its fd
	// while its canceled Wait was still leaving: the kernel forgot that
	// registration, the map had not yet.
	p.gen++
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLONESHOT, Fd: fd, Pad: int32(p.gen)}
	err := unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, int(fd), &ev)
	if errors.Is(err, unix.EEXIST) {
		err = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_MOD, int(fd), &ev)
	}
	if err != nil {
		return fmt.Errorf("sidepoll: epoll_ctl fd %d: %w", fd, err)
	}
	p.fds[fd] = append(p.fds[fd], ch)
	p.gens[fd] = p.gen
	return nil
}

// cancel takes ch off fd's waiters; the last one to leave disarms fd, so
// that a caller may close it.
func (p *Poller) cancel(fd int32, ch chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ws, ok := p.fds[fd]
	if !ok {
		return // fired meanwhile
	}
	ws = slices.DeleteFunc(ws, func(c chan struct{}) bool { return c == ch })
	if len(ws) > 0 {
		p.fds[fd] = ws
		return
	}
	delete(p.fds, fd)
	delete(p.gens, fd)
	if p.shut {
		return // epfd is closed, or about to be, and its number reusable
	}
	// Best effort: the fd may already be closed by a caller that broke the
	// contract, and then the kernel has removed it.
	_ = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_DEL, int(fd), nil)
}

func (p *Poller) loop() {
	defer close(p.ended)
	events := make([]unix.EpollEvent, 64)
	for {
		// A blocking system call: the runtime hands this goroutine's
		// processor to other goroutines while the thread sleeps here.
		n, err := unix.EpollWait(p.epfd, events, -1)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			// Only a bad epfd fails here, which is a bug; wake everyone
			// rather than leave them waiting forever.
			p.shutdown()
			return
		}
		stop := false
		p.mu.Lock()
		for _, ev := range events[:n] {
			if int(ev.Fd) == p.wakefd {
				stop = true
				continue
			}
			if g, ok := p.gens[ev.Fd]; !ok || g != uint32(ev.Pad) {
				continue // an earlier registration's: stale
			}
			for _, ch := range p.fds[ev.Fd] {
				close(ch)
			}
			delete(p.fds, ev.Fd)
			delete(p.gens, ev.Fd)
		}
		p.mu.Unlock()
		if stop {
			return
		}
	}
}

func (p *Poller) shutdown() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.shut {
		p.shut = true
		close(p.closed)
	}
}

// Close stops the Poller: waiting and later Waits return ErrClosed. It
// does not close the waited-on descriptors. Later Closes return the
// first one's result and touch no descriptor.
func (p *Poller) Close() error {
	p.closeOnce.Do(func() {
		p.shutdown()
		var one = [8]byte{1}
		if _, err := unix.Write(p.wakefd, one[:]); err != nil && !errors.Is(err, unix.EAGAIN) {
			// The loop is still in epoll_wait: leave its descriptors.
			p.closeErr = fmt.Errorf("sidepoll: wake: %w", err)
			return
		}
		<-p.ended
		unix.Close(p.wakefd)
		p.closeErr = unix.Close(p.epfd)
	})
	return p.closeErr
}

// Listener returns ln with Accept waiting for a connection on p instead of
// in Go's netpoller. ln must be a syscall.Conn (every listener of package
// net is). Close closes ln.
func (p *Poller) Listener(ln net.Listener) (net.Listener, error) {
	sc, ok := ln.(syscall.Conn)
	if !ok {
		return nil, fmt.Errorf("sidepoll: %T has no file descriptor", ln)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("sidepoll: listener: %w", err)
	}
	fd := -1
	if err := rc.Control(func(f uintptr) { fd = int(f) }); err != nil {
		return nil, fmt.Errorf("sidepoll: listener: %w", err)
	}
	return &listener{Listener: ln, p: p, fd: fd, done: make(chan struct{})}, nil
}

type listener struct {
	net.Listener
	p    *Poller
	fd   int
	once sync.Once
	done chan struct{}
}

// Accept waits on the side poller, then takes the connection with ln's own
// Accept, which finds it queued and does not wait. (A connection reset in
// between would leave that Accept waiting in Go's netpoller for the next
// one: rare, and no worse than a plain listener.)
func (l *listener) Accept() (net.Conn, error) {
	// Whatever Wait says, ln's own Accept answers: after Close (done
	// closed; or closed while Wait was arming, which then fails with
	// EBADF) it returns net.ErrClosed; if the poller is closed or refuses
	// the fd, it waits in Go's netpoller as a plain listener does.
	l.p.Wait(l.done, l.fd)
	return l.Listener.Accept()
}

// Close stops a waiting Accept before the descriptor goes away (Wait's
// contract), then closes ln.
func (l *listener) Close() error {
	l.once.Do(func() { close(l.done) })
	return l.Listener.Close()
}

// WrapListener is Default's Listener(ln), or ln itself when the side poller
// cannot be had (its Accept then waits in Go's netpoller as usual).
func WrapListener(ln net.Listener) net.Listener {
	p, err := Default()
	if err != nil {
		return ln
	}
	sl, err := p.Listener(ln)
	if err != nil {
		return ln
	}
	return sl
}
