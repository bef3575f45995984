package pinhole

import (
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// CapAcks reads NETLINK_CAP_ACK back (getsockopt) from the Backend's
// sockets that send transactions: "main" (Apply's), "health" (Healthy's
// kept one, its sentinels) and "flowed" (flowed6's writes); one not
// dialled yet is left out (h/capack).
func CapAcks(b *Backend) (map[string]bool, error) {
	b.mu.Lock()
	main := b.nl
	b.mu.Unlock()
	b.healthMu.Lock()
	health := b.healthConn.nl
	b.healthMu.Unlock()
	b.flowed.mu.Lock()
	flowed := b.flowed.conn.nl
	b.flowed.mu.Unlock()
	out := map[string]bool{}
	for name, nl := range map[string]*netlink.Conn{"main": main, "health": health, "flowed": flowed} {
		if nl == nil {
			continue
		}
		rc, err := nl.SyscallConn()
		if err != nil {
			return nil, err
		}
		var v int
		var gerr error
		if err := rc.Control(func(fd uintptr) {
			v, gerr = unix.GetsockoptInt(int(fd), unix.SOL_NETLINK, unix.NETLINK_CAP_ACK)
		}); err != nil {
			return nil, err
		}
		if gerr != nil {
			return nil, gerr
		}
		out[name] = v != 0
	}
	return out, nil
}
