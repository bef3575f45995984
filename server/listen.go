package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/zap"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
)

// Port is the PCP and NAT-PMP server port (RFC 6887 §19.1, RFC 6886 §3).
const Port = 5351

// clientPort is where PCP and NAT-PMP clients listen for multicast
// announcements (RFC 6887 §14.1.3, RFC 6886 §3.2.1).
const clientPort = 5350

// readSize is larger than the 1100-octet PCP maximum so that an oversized
// request is seen as oversized (PKT-04) instead of silently truncated.
const readSize = 2048

// rcvBuf is the serving sockets' receive buffer: room for bursts, small
// enough that a flood queued in it does not delay others for long.
const rcvBuf = 1 << 20

// readBatch is how many datagrams one recvmmsg takes.
const readBatch = 64

// packet is one datagram received on a serving socket.
type packet struct {
	conn *udpConn
	src  netip.AddrPort
	b    []byte
	at   time.Time
}

// udpConn is one serving socket: one local address on one serving
// interface. Replies go out of the socket the request came in on, so they
// leave from exactly the address and port the client sent to (HDR-02).
type udpConn struct {
	iface string
	index int // the interface's index when bound: a re-created interface is a new one
	local netip.AddrPort
	pc    *net.UDPConn
}

// reply is one datagram to send.
type reply struct {
	b  []byte
	to netip.AddrPort
}

// batchWriter sends many datagrams per system call (sendmmsg).
type batchWriter interface {
	WriteBatch(ms []ipv4.Message, flags int) (int, error)
}

// sendBatch sends rs with as few sendmmsg calls as it takes (one sendto
// per reply was half of pcpd's CPU on the error path). It returns the
// first error; the replies after a failed one are still tried.
func (c *udpConn) sendBatch(rs []reply) error {
	if len(rs) == 1 {
		return c.send(rs[0].b, rs[0].to)
	}
	var bw batchWriter
	v4 := c.local.Addr().Is4()
	if v4 {
		bw = ipv4.NewPacketConn(c.pc)
	} else {
		bw = ipv6.NewPacketConn(c.pc)
	}
	ms := make([]ipv4.Message, len(rs))
	for i, r := range rs {
		to := r.to
		if v4 {
			to = netip.AddrPortFrom(to.Addr().Unmap(), to.Port())
		}
		ms[i] = ipv4.Message{Buffers: [][]byte{r.b}, Addr: net.UDPAddrFromAddrPort(to)}
	}
	var first error
	for len(ms) > 0 {
		n, err := bw.WriteBatch(ms, 0)
		if err != nil {
			if first == nil {
				first = err
			}
			// The datagram at n failed: skip it, go on with the rest.
			n++
		}
		ms = ms[min(n, len(ms)):]
	}
	return first
}

func (c *udpConn) send(b []byte, to netip.AddrPort) error {
	if c.local.Addr().Is4() {
		to = netip.AddrPortFrom(to.Addr().Unmap(), to.Port())
	}
	_, err := c.pc.WriteToUDPAddrPort(b, to)
	return err
}

// listener keeps one socket per address of each serving interface, bound to
// that interface with SO_BINDTODEVICE, so packets that arrive on any other
// interface never reach pcpd (SEC-01), even when addressed to a served
// address. It follows address and link changes through netlink: an
// interface that disappears stops being served, and serving resumes when it
// comes back.
type listener struct {
	log      *zap.Logger
	ifaces   []string
	explicit []netip.AddrPort
	port     uint16
	ns       netns.NsHandle
	out      chan<- packet
	onDrop   func(reason string)
	// admit decides, before a packet is queued, whether it is worth the
	// engine's time ("" = yes).
	admit func(b []byte, src netip.AddrPort) string
	// early, if set, answers requests that need no engine (Server.early):
	// handled means the reader sends reply (nil: nothing) itself.
	early func(b []byte, src netip.AddrPort, now time.Time) (reply []byte, handled bool)

	mu    sync.Mutex
	conns map[netip.AddrPort]*udpConn
	wg    sync.WaitGroup
}

// addrs lists the serving addresses currently open.
func (l *listener) addrs() []netip.AddrPort {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]netip.AddrPort, 0, len(l.conns))
	for ap := range l.conns {
		out = append(out, ap)
	}
	slices.SortFunc(out, func(a, b netip.AddrPort) int { return a.Compare(b) })
	return out
}

// sockets returns the open sockets, for unsolicited messages.
func (l *listener) sockets() []*udpConn {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]*udpConn, 0, len(l.conns))
	for _, c := range l.conns {
		out = append(out, c)
	}
	slices.SortFunc(out, func(a, b *udpConn) int { return a.local.Compare(b.local) })
	return out
}

// run follows the interfaces until ctx ends, then closes every socket.
func (l *listener) run(ctx context.Context) error {
	var h *netlink.Handle
	var err error
	if nsSet(l.ns) {
		h, err = netlink.NewHandleAt(l.ns)
	} else {
		h, err = netlink.NewHandle()
	}
	if err != nil {
		return fmt.Errorf("server: netlink handle: %w", err)
	}
	defer h.Close()
	defer l.closeAll()

	events := make(chan struct{}, 1)
	poke := func() {
		select {
		case events <- struct{}{}:
		default:
		}
	}
	subscribe := func(done chan struct{}) {
		var nsp *netns.NsHandle
		if nsSet(l.ns) {
			nsp = &l.ns
		}
		ach := make(chan netlink.AddrUpdate, 64)
		lch := make(chan netlink.LinkUpdate, 64)
		onErr := func(err error) { l.log.Debug("netlink subscription", zap.Error(err)) }
		if err := netlink.AddrSubscribeWithOptions(ach, done, netlink.AddrSubscribeOptions{Namespace: nsp, ErrorCallback: onErr}); err != nil {
			l.log.Warn("cannot follow address changes; polling only", zap.Error(err))
		} else {
			go func() {
				for range ach {
					poke()
				}
			}()
		}
		if err := netlink.LinkSubscribeWithOptions(lch, done, netlink.LinkSubscribeOptions{Namespace: nsp, ErrorCallback: onErr}); err != nil {
			l.log.Warn("cannot follow link changes; polling only", zap.Error(err))
		} else {
			go func() {
				for range lch {
					poke()
				}
			}()
		}
	}
	done := make(chan struct{})
	defer func() { close(done) }()
	subscribe(done)

	// Netlink notifications can be lost (buffer overrun); a slow poll is the
	// safety net, the notifications make the common case prompt.
	tick := time.NewTicker(2 * time.Second)
	defer tick.Stop()
	l.resync(h)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-events:
			l.resync(h)
		case <-tick.C:
			l.resync(h)
		}
	}
}

// link names a serving interface as the kernel knows it now.
type link struct {
	name  string
	index int
}

// want computes the serving addresses from the interfaces' current state.
func (l *listener) want(h *netlink.Handle) map[netip.AddrPort]link {
	want := map[netip.AddrPort]link{}
	for _, name := range l.ifaces {
		lnk, err := h.LinkByName(name)
		if err != nil || lnk.Attrs().Flags&net.FlagUp == 0 {
			continue
		}
		addrs, err := h.AddrList(lnk, netlink.FAMILY_ALL)
		if err != nil {
			continue
		}
		for _, a := range addrs {
			ip, ok := netip.AddrFromSlice(a.IP)
			if !ok {
				continue
			}
			ip = ip.Unmap()
			if a.Flags&unix.IFA_F_DADFAILED != 0 {
				continue
			}
			if ip.Is6() && ip.IsLinkLocalUnicast() {
				ip = ip.WithZone(name)
			}
			port := l.port
			if len(l.explicit) > 0 {
				i := slices.IndexFunc(l.explicit, func(e netip.AddrPort) bool { return e.Addr().WithZone("") == ip.WithZone("") })
				if i < 0 {
					continue
				}
				if p := l.explicit[i].Port(); p != 0 {
					port = p
				}
			}
			want[netip.AddrPortFrom(ip, port)] = link{name: name, index: lnk.Attrs().Index}
		}
	}
	return want
}

func (l *listener) resync(h *netlink.Handle) {
	want := l.want(h)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.conns == nil {
		l.conns = map[netip.AddrPort]*udpConn{}
	}
	for ap, c := range l.conns {
		// SO_BINDTODEVICE holds the interface index: an interface deleted
		// and re-created under the same name needs a new socket.
		if w, ok := want[ap]; !ok || w.name != c.iface || w.index != c.index {
			c.pc.Close()
			delete(l.conns, ap)
			l.log.Info("stopped serving", zap.String("interface", c.iface), zap.Stringer("address", ap))
		}
	}
	for ap, w := range want {
		if _, ok := l.conns[ap]; ok {
			continue
		}
		pc, err := l.open(w.name, ap)
		if err != nil {
			l.log.Warn("cannot serve address", zap.String("interface", w.name), zap.Stringer("address", ap), zap.Error(err))
			continue
		}
		c := &udpConn{iface: w.name, index: w.index, local: ap, pc: pc}
		l.conns[ap] = c
		// One reader per core: the readers answer malformed and refused
		// requests themselves (Server.early), and one goroutine reading,
		// answering and sending kept a single core busy while the other
		// idled. Datagrams of one socket may then reach the engine out of
		// arrival order, which UDP never promised anyway.
		for range readers() {
			l.wg.Add(1)
			go l.read(c)
		}
		l.log.Info("serving", zap.String("interface", w.name), zap.Stringer("address", ap))
	}
}

func (l *listener) open(ifc string, ap netip.AddrPort) (*net.UDPConn, error) {
	network := "udp6"
	if ap.Addr().Is4() {
		network = "udp4"
	}
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if serr = unix.SetsockoptString(int(fd), unix.SOL_SOCKET, unix.SO_BINDTODEVICE, ifc); serr != nil {
				serr = fmt.Errorf("SO_BINDTODEVICE %s: %w", ifc, serr)
				return
			}
			// A large receive buffer absorbs bursts while the reader sheds
			// a flooding source (FORCE passes rmem_max; needs CAP_NET_ADMIN,
			// which pcpd has anyway).
			if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, rcvBuf) != nil {
				_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, rcvBuf)
			}
			// A fresh IPv6 address is tentative until DAD ends; FREEBIND lets
			// us bind it at once instead of waiting for the next poll.
			if network == "udp6" {
				_ = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_FREEBIND, 1)
			} else {
				_ = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_FREEBIND, 1)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	var pc net.PacketConn
	err := inNS(l.ns, func() error {
		var err error
		pc, err = lc.ListenPacket(context.Background(), network, ap.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("server: listen %s on %s: %w", ap, ifc, err)
	}
	return pc.(*net.UDPConn), nil
}

// batchReader reads many datagrams per system call (recvmmsg).
type batchReader interface {
	ReadBatch(ms []ipv4.Message, flags int) (int, error)
}

func (l *listener) read(c *udpConn) {
	defer l.wg.Done()
	var br batchReader
	if c.local.Addr().Is4() {
		br = ipv4.NewPacketConn(c.pc)
	} else {
		br = ipv6.NewPacketConn(c.pc)
	}
	// Draining the socket in batches keeps up with a flooding source, so
	// other clients' packets wait less behind the ones admit drops.
	msgs := make([]ipv4.Message, readBatch)
	for i := range msgs {
		msgs[i].Buffers = [][]byte{make([]byte, readSize)}
	}
	var replies []reply
	for {
		if len(replies) > 0 {
			c.sendBatch(replies)
			replies = replies[:0]
		}
		n, err := br.ReadBatch(msgs, 0)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		now := time.Now()
		for _, m := range msgs[:n] {
			ua, ok := m.Addr.(*net.UDPAddr)
			if !ok {
				continue
			}
			src := ua.AddrPort()
			src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
			b := m.Buffers[0][:m.N]
			if l.admit != nil {
				if reason := l.admit(b, src); reason != "" {
					if l.onDrop != nil {
						l.onDrop(reason)
					}
					continue
				}
			}
			if l.early != nil {
				if r, ok := l.early(b, src, now); ok {
					if r != nil {
						replies = append(replies, reply{b: r, to: src})
					}
					continue
				}
			}
			p := packet{conn: c, src: src, b: append([]byte(nil), b...), at: now}
			select {
			case l.out <- p:
			default:
				// The engine is saturated: shedding load here keeps
				// memory bounded (PKT-08, SEC-04).
				if l.onDrop != nil {
					l.onDrop("queue-full")
				}
			}
		}
	}
}

func readers() int { return max(1, min(runtime.GOMAXPROCS(0), 4)) }

func (l *listener) closeAll() {
	l.mu.Lock()
	for ap, c := range l.conns {
		c.pc.Close()
		delete(l.conns, ap)
	}
	l.mu.Unlock()
	l.wg.Wait()
}
