package pinhole

import (
	"errors"

	"golang.org/x/sys/unix"
)

// CloseHealthConn closes b's kept Healthy connection as a check that
// failed does (Healthy: the next check dials another), and returns its
// port id (0: none was open).
func CloseHealthConn(b *Backend) uint32 {
	b.healthMu.Lock()
	defer b.healthMu.Unlock()
	if b.healthConn.nl == nil {
		return 0
	}
	port, _ := portOf(b.healthConn.nl)
	b.healthConn.close()
	return port
}

// ForeignGenQueued reports whether ForeignDNAT's generation socket has a
// datagram queued (peeked, left there: the filter passed it); false
// without a socket.
func ForeignGenQueued(b *Backend) bool {
	g := &b.foreignGen
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.c == nil {
		return false
	}
	var rerr error
	buf := make([]byte, 64)
	if err := rawControl(g.c, func(fd uintptr) {
		_, _, rerr = unix.Recvfrom(int(fd), buf, unix.MSG_DONTWAIT|unix.MSG_PEEK)
	}); err != nil {
		return true
	}
	return !errors.Is(rerr, unix.EAGAIN)
}
