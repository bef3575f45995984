package pinhole

import (
	"errors"
	"slices"
	"sync/atomic"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
)

// WatchFailNext makes the watcher's next receive fail, as an overflow
// (ENOBUFS) would, once.
func WatchFailNext() (restore func()) {
	old := receiveHook
	var once atomic.Bool
	receiveHook = func(c *netlink.Conn) ([]netlink.Message, error) {
		if once.CompareAndSwap(false, true) {
			return nil, errWatchForced
		}
		return old(c)
	}
	return func() { receiveHook = old }
}

// SetWatchBuffer sets the watcher's receive buffer for sockets opened
// from now on.
func SetWatchBuffer(n int) (restore func()) {
	old := watchBuffer
	watchBuffer = n
	return func() { watchBuffer = old }
}

// errWatchForced is the error WatchFailNext's receive returns.
var errWatchForced = errors.New("forced receive error (test)")

// DialSideSockets dials n sockets of the Backend's own as a Healthy
// beside another does (dialSide, noted), and closes them.
func (b *Backend) DialSideSockets(n int) error {
	for range n {
		c, nl, err := dialSide(b.netns)
		if err != nil {
			return err
		}
		b.ports.note(nl)
		_ = c.CloseLasting()
	}
	return nil
}

// WatchersOpen is how many of the Backend's watchers have a socket open.
func (b *Backend) WatchersOpen() int {
	b.ports.mu.Lock()
	ws := slices.Clone(b.ports.watchers)
	b.ports.mu.Unlock()
	n := 0
	for _, w := range ws {
		w.mu.Lock()
		if w.conn != nil {
			n++
		}
		w.mu.Unlock()
	}
	return n
}

// UseCallersConn makes b write on conn, not on a lasting socket of its
// own, as when New could not dial one.
func UseCallersConn(b *Backend, conn *nftables.Conn) {
	b.mu.Lock()
	_ = b.conn.CloseLasting()
	b.conn, b.ownConn, b.nl = conn, false, nil
	b.mu.Unlock()
}

// CountWatchReceives counts the skbs the watchers' sockets read (each
// one passed the socket filter: a wakeup of the watcher).
func CountWatchReceives() (n *atomic.Int64, restore func()) {
	old := receiveHook
	n = new(atomic.Int64)
	receiveHook = func(c *netlink.Conn) ([]netlink.Message, error) {
		msgs, err := old(c)
		if err == nil {
			n.Add(1)
		}
		return msgs, err
	}
	return n, func() { receiveHook = old }
}
