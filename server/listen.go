package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"go.uber.org/zap"
	"golang.org/x/net/bpf"
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
// enough that a flood queued in it does not delay others for long. The
// kernel doubles it (2 MiB) and charges each datagram its buffer's true
// size, ≈ 830 bytes for a 60-octet request: ≈ 2 500 requests, three
// owners' bursts at the kernel owner meter's default (800, what pcpd's
// owner bucket admits). The meter's former burst of 3 200 overflowed it
// whenever pcpd ran late (RELIABILITY.md known bug 5); sizing the buffer
// to the meter instead would not scale (every owner has its burst) and
// would queue others' requests behind more of the flood.
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
	iface string // as configured (the zone of link-local sources)
	// kname is the interface's kernel name when bound: what the socket is
	// bound to, and what the firewall's "meta iifname" matches
	// (onServe). iface may be an alternative name of it.
	kname string
	index int // the interface's index when bound: a re-created interface is a new one
	local netip.AddrPort
	pc    *net.UDPConn
	rc    syscall.RawConn // pc's, for recvmmsg and sendmmsg
	// full, if set, counts datagrams dropped because the socket's send
	// buffer was full (see sendmmsg).
	full func(n int)
}

// dropFull counts n datagrams the full send buffer refused.
func (c *udpConn) dropFull(n int) error {
	if c.full != nil {
		c.full(n)
	}
	return fmt.Errorf("server: send buffer of %s full: %d datagrams dropped", c.local, n)
}

// reply is one datagram to send.
type reply struct {
	b  []byte
	to netip.AddrPort
}

// sendPool holds the sendmmsg arrays of the engine's reply batches.
var sendPool = sync.Pool{New: func() any { return newMmsg(readBatch) }}

// sendBatch sends rs with as few sendmmsg calls as it takes (one sendto
// per reply was half of pcpd's CPU on the error path). It returns the
// first error; the replies after a failed one are still tried.
func (c *udpConn) sendBatch(rs []reply) error {
	if len(rs) == 1 {
		return c.send(rs[0].b, rs[0].to)
	}
	m := sendPool.Get().(*mmsg)
	defer sendPool.Put(m)
	var first error
	for len(rs) > 0 {
		n := min(len(rs), len(m.hdrs))
		for i, r := range rs[:n] {
			m.set(i, r.b, r.to, c)
		}
		if err := c.sendmmsg(m, n); err != nil && first == nil {
			first = err
		}
		rs = rs[n:]
	}
	m.release(len(m.hdrs))
	return first
}

func (c *udpConn) send(b []byte, to netip.AddrPort) error {
	if c.local.Addr().Is4() {
		to = netip.AddrPortFrom(to.Addr().Unmap(), to.Port())
	} else if to.Addr().Zone() != "" {
		// Go resolves a zone in its interface cache, which holds kernel
		// names only: a configured altname (the zone of link-local
		// sources) missed it and forced a dump of every interface per
		// send (TestLinkLocalReplyAltnameZone). No zone, scope 0, and
		// the kernel takes the socket's bound interface (udpv6_sendmsg),
		// as sendmmsg's c.index does, with no cache in between.
		to = netip.AddrPortFrom(to.Addr().WithZone(""), to.Port())
	}
	// Never waits for a full send buffer (see sendmmsg): the datagram
	// is dropped instead, as WriteToUDPAddrPort would not.
	var sa unix.Sockaddr
	if a := to.Addr(); c.local.Addr().Is4() {
		if !a.Is4() {
			return fmt.Errorf("server: send to %s from %s: not an IPv4 address", to, c.local)
		}
		sa = &unix.SockaddrInet4{Port: int(to.Port()), Addr: a.As4()}
	} else {
		sa = &unix.SockaddrInet6{Port: int(to.Port()), Addr: a.As16()}
	}
	var serr error
	if err := c.rc.Write(func(fd uintptr) bool {
		serr = unix.Sendto(int(fd), b, unix.MSG_DONTWAIT, sa)
		return serr != unix.EINTR
	}); err != nil {
		return err // the socket is closed
	}
	if serr == unix.EAGAIN {
		return c.dropFull(1)
	}
	if serr != nil {
		return fmt.Errorf("server: send to %s from %s: %w", to, c.local, serr)
	}
	return nil
}

// mmsg is the arrays one recvmmsg or sendmmsg call hands the kernel,
// allocated once per reader (or pooled): the datagrams themselves cost no
// allocation. x/net's ReadBatch and WriteBatch allocated a net.UDPAddr
// and its IP per datagram, and the headers per call.
type mmsg struct {
	hdrs  []unix.Mmsghdr
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6 // large enough for a sockaddr_in too

	// The system call and its result, kept here so that the function
	// handed to RawConn.Read/Write is made once, not per call.
	fd       uintptr
	off, cnt int
	r        int
	errno    unix.Errno
	recvF    func(fd uintptr) bool
	sendF    func(fd uintptr) bool
}

func newMmsg(n int) *mmsg {
	m := &mmsg{
		hdrs:  make([]unix.Mmsghdr, n),
		iovs:  make([]unix.Iovec, n),
		names: make([]unix.RawSockaddrInet6, n),
	}
	for i := range m.hdrs {
		h := &m.hdrs[i].Hdr
		h.Name = (*byte)(unsafe.Pointer(&m.names[i]))
		h.Namelen = unix.SizeofSockaddrInet6
		h.Iov = &m.iovs[i]
		h.SetIovlen(1)
	}
	m.recvF = func(fd uintptr) bool { return m.call(unix.SYS_RECVMMSG, fd) }
	m.sendF = func(fd uintptr) bool { return m.call(unix.SYS_SENDMMSG, fd) }
	return m
}

// call runs recvmmsg or sendmmsg on hdrs[off:off+cnt]; false asks the
// runtime poller to wait for the socket (EAGAIN).
//
// It is a raw system call (no entersyscall): with MSG_DONTWAIT neither
// call sleeps, it only takes CPU (a batch's sendmmsg delivers each reply
// into the client's socket, 100-300 µs), so the goroutine keeps its P.
// As an ordinary system call one that long is retaken by sysmon, which
// then keeps polling every 20 µs and hands the P to another thread:
// sysmon was 7.9 % of pcpd's CPU in a renewal run, 4.3 % with raw calls,
// and pcpd's CPU per request fell (BENCHMARKS.md item 25).
func (m *mmsg) call(trap, fd uintptr) bool {
	r, _, e := unix.RawSyscall6(trap, fd, uintptr(unsafe.Pointer(&m.hdrs[m.off])), uintptr(m.cnt), unix.MSG_DONTWAIT, 0, 0)
	if e == unix.EINTR || e == unix.EAGAIN && trap == unix.SYS_RECVMMSG {
		return false
	}
	m.r, m.errno = int(r), e
	return true
}

// set makes entry i the datagram b to to, for sending on c.
func (m *mmsg) set(i int, b []byte, to netip.AddrPort, c *udpConn) {
	m.iovs[i].Base = unsafe.SliceData(b)
	m.iovs[i].SetLen(len(b))
	h := &m.hdrs[i].Hdr
	a := to.Addr()
	if c.local.Addr().Is4() {
		if a = a.Unmap(); !a.Is4() {
			// Never a request's source on an IPv4 socket; an empty name
			// makes the kernel refuse this one datagram, not panic here.
			h.Namelen = 0
			return
		}
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(&m.names[i]))
		*sa = unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: a.As4()}
		putPort(&sa.Port, to.Port())
		h.Namelen = unix.SizeofSockaddrInet4
		return
	}
	sa := &m.names[i]
	*sa = unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: a.As16()}
	putPort(&sa.Port, to.Port())
	if a.Zone() != "" {
		// Link-local: the scope is the socket's interface (it is bound to
		// it, so a reply can leave by no other).
		sa.Scope_id = uint32(c.index)
	}
	h.Namelen = unix.SizeofSockaddrInet6
}

// release drops the references to the first n datagrams' buffers, so a
// pooled mmsg does not keep replies alive.
func (m *mmsg) release(n int) {
	for i := range n {
		m.iovs[i].Base = nil
	}
}

// sendmmsg sends entries [0, n) of m. A datagram the kernel refuses is
// skipped (its error returned if it is the first) and the rest still go.
//
// It never waits for the socket: a full send buffer (EAGAIN) drops the
// datagram that met it and every one after it, counted (c.full). Waiting
// parked the caller, and the engine sends every client's replies:
// datagrams to IPv4 LAN addresses that never answer ARP stay charged to
// the socket in the neighbour queue, and 256 of them kept its buffer
// full for 3 s (review h/revu2, TestE2EFullSendBufferDrops). UDP: the
// client retransmits; an update or ANNOUNCE is lost as on the wire.
func (c *udpConn) sendmmsg(m *mmsg, n int) error {
	var first error
	for m.off = 0; m.off < n; {
		m.cnt = n - m.off
		if err := c.rc.Write(m.sendF); err != nil {
			return err // the socket is closed
		}
		if m.errno == unix.EAGAIN {
			return c.dropFull(n - m.off)
		}
		if m.errno != 0 {
			if first == nil {
				first = fmt.Errorf("server: sendmmsg to %s: %w", c.local, m.errno)
			}
			m.off++ // the datagram at off failed: skip it
			continue
		}
		m.off += max(m.r, 1)
	}
	return first
}

// putPort stores a port in network byte order.
func putPort(p *uint16, port uint16) {
	b := (*[2]byte)(unsafe.Pointer(p))
	b[0], b[1] = byte(port>>8), byte(port)
}

func getPort(p *uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(p))
	return uint16(b[0])<<8 | uint16(b[1])
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
	lab      bool // Config.loopbackLab: no filter on a loopback socket
	out      chan<- packet
	onDrop   func(reason string)
	// admit decides, before a packet is queued, whether it is worth the
	// engine's time ("" = yes).
	// now is the time of the batch the packet came in (clock's).
	// iface is the per-source bucket's key of the socket's interface
	// (sourceKey of ifaceKey).
	admit func(b []byte, src netip.AddrPort, iface uint32, now time.Time) string
	// clock is admit's and early's clock (the Server's steady one, which
	// no wall-clock step or rebase moves: they measure durations only;
	// nil: the wall clock), read once per batch.
	clock func() time.Time
	// early, if set, answers requests that need no engine
	// (Server.earlyRead), given the socket's interface (kernel name):
	// earlyAnswered means the reader sends reply (nil: nothing) itself. The reply is appended to the dst it is given; the
	// answers are counted in the reader's tally. earlyDeferred: the
	// request is thirdParty's.
	early func(t *tally, dst, b []byte, src netip.AddrPort, local netip.Addr, iface string, now time.Time) (reply []byte, v earlyVerdict)
	// thirdParty takes a THIRD_PARTY request early deferred, to be
	// judged once a fresh enough WireGuard view is read, without the
	// reader waiting (Server.deferThirdParty); p.b is the reader's copy.
	thirdParty func(p packet)
	// onFull, if set, counts datagrams a socket's full send buffer
	// refused (udpConn.full).
	onFull func(n int)
	// es is the readers' state for Server.early.
	es earlyState
	// onServe, if set, gets the serving addresses (and each socket's
	// interface) after every pass over
	// the interfaces (resync), from the run goroutine only, outside mu;
	// addresses still in duplicate address detection are left out (link).
	onServe func(aps []netip.AddrPort, ifaces []string)
	// onRename, if set, gets the kernel names a rename of a served
	// interface concerns (renames; policy.RenameFollower), before sockets
	// under them are opened. Called from the run goroutine, under mu.
	onRename func(knames []string)
	// onDevice, if set, gets the kernel names of served interfaces whose
	// device is not the one served before (renames; policy.DeviceFollower):
	// created again under the name, renamed, first served after the
	// first pass, or served again after it was found deleted (moved
	// to another namespace and back) (gone false), before sockets under
	// them are opened (bound by index: the device reported); or
	// deleted (gone true). Called from the run goroutine, under mu.
	onDevice func(knames []string, gone bool)
	// firstIndex, if set, is the index the ownership's first read found
	// under a kernel name (policy.DeviceFollower.FirstIndex): on the
	// first pass, every served name whose index differs or is unknown
	// goes to onDevice, as a swap after that read and before the pass
	// (review h/revsw: the start-up window) is seen by no event.
	firstIndex func(kname string) (index int, ok bool)
	// byName and byIndex are the kernel name ↔ index pairs served so far
	// (resync; nil before the first pass): those whose interface exists
	// and the last maxGonePairs of those whose index was found gone
	// (renames prunes the others). byIndex keeps only the pairs byName
	// still has, so both are bounded by the interfaces there plus
	// maxGonePairs.
	byName  map[string]int
	byIndex map[int]string
	// gone numbers byName's pairs whose index was not found, in the
	// order first found gone (goneSeq counts), for renames to drop the
	// oldest.
	gone    map[string]uint64
	goneSeq uint64
	// away is byName's names reported deleted (onDevice, gone) and not
	// served since: the next pass that serves one reports it again,
	// its index the same or not (renames).
	away map[string]bool

	// hook, if set (tests), runs in resync under mu with the pass's
	// wanted addresses: at "open", after renames reported the pass's
	// device changes and before its sockets open; at "opened", after.
	hook func(stage string, want map[netip.AddrPort]link)

	// pass is how often the interfaces are read whatever the
	// notifications say (0: every 2 s; tests set it long, to see that a
	// notification alone is followed).
	pass time.Duration

	// bindIndex, if set (tests), stands for setsockopt SO_BINDTOIFINDEX
	// on fd (bindToIndex).
	bindIndex func(fd, index int) error

	// left is the links the kernel told deleted or moved out of the
	// namespace (RTM_DELLINK, noteLeft) since a pass last took them
	// (takeLeft), under leftMu (not mu: follow records them while a
	// pass runs).
	leftMu sync.Mutex
	left   leftLinks

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
	// A route socket only (routeHandle): the handle reads links and
	// addresses, and a NETLINK_NETFILTER socket beside it would only cost
	// a wait for nftables' commit lock when it closes.
	h, err := routeHandle(l.ns)
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
	// One subscription for links and both families' addresses. netlink's
	// AddrSubscribe and LinkSubscribe (two sockets, used before) end at
	// their first receive error, an overrun (ENOBUFS) included: after an
	// address storm pcpd then followed changes only at its pass. follow
	// keeps reading through errors.
	var sock *nl.NetlinkSocket
	var serr error
	groups := []uint{unix.RTNLGRP_LINK, unix.RTNLGRP_IPV4_IFADDR, unix.RTNLGRP_IPV6_IFADDR}
	if nsSet(l.ns) {
		sock, serr = nl.SubscribeAt(l.ns, netns.None(), unix.NETLINK_ROUTE, groups...)
	} else {
		sock, serr = nl.Subscribe(unix.NETLINK_ROUTE, groups...)
	}
	done, followed := make(chan struct{}), make(chan struct{})
	if serr != nil {
		l.log.Warn("cannot follow address and link changes; polling only", zap.Error(serr))
		close(followed)
	} else {
		go func() { defer close(followed); l.follow(sock, done, poke) }()
	}
	defer func() {
		// done first: follow's Receive fails when sock closes, and done
		// tells it that is the end, not an error to wait out.
		close(done)
		if sock != nil {
			sock.Close()
		}
		<-followed
	}()

	// Netlink notifications can be lost (buffer overrun); a slow poll is the
	// safety net, the notifications make the common case prompt.
	every := l.pass
	if every <= 0 {
		every = 2 * time.Second
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	if err := l.probeBindToIndex(); err != nil {
		return err
	}
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

// follow pokes a pass for every notification of sock, and for every
// receive error too: an overrun (ENOBUFS) means some were lost, which the
// pass makes good (a lost departure too: noteOverrun). Messages from other processes (any may send to the
// socket's port id) are not notifications and ask nothing, as netlink's
// subscriptions skipped them. It returns once done is closed (run closes
// sock after it, which ends the Receive in progress).
func (l *listener) follow(sock *nl.NetlinkSocket, done <-chan struct{}, poke func()) {
	for {
		msgs, from, err := sock.Receive()
		select {
		case <-done:
			return
		default:
		}
		if err == nil && from.Pid != nl.PidKernel || err != nil && malformed(err) {
			continue
		}
		switch {
		case err == nil:
			l.noteLeft(msgs) // before the pass it asks for
		case errors.Is(err, unix.ENOBUFS):
			l.noteOverrun()
		}
		poke()
		if err != nil && !errors.Is(err, unix.ENOBUFS) {
			l.log.Debug("netlink subscription", zap.Error(err))
			// Not an overrun: an error that repeats must not spin.
			select {
			case <-done:
				return
			case <-time.After(time.Second):
			}
		}
	}
}

// malformed reports whether err is Receive's for a datagram it read but
// could not take for netlink messages (shorter than a header, or a header
// longer than the datagram: syscall.ParseNetlinkMessage's EINVAL). The
// kernel sends no such thing, any process may (to the port id in
// /proc/net/netlink), and Receive drops the sender with the error: these
// ask no pass, and no backoff, as the datagram is gone (no spin).
func malformed(err error) bool {
	return errors.Is(err, unix.EINVAL) || strings.HasPrefix(err.Error(), "Got short response")
}

// link names a serving interface as the kernel knows it now.
type link struct {
	name string
	// kname is the interface's kernel name: name may be one of its
	// alternative names ("ip link property add ... altname"), which
	// LinkByName and SO_BINDTODEVICE resolve (the latter only below
	// IFNAMSIZ) but "meta iifname" never matches (review8 A1).
	kname string
	index int
	// tentative: the address is still in IPv6 duplicate address detection.
	// It is served (the socket binds with IP_FREEBIND), but the kernel
	// has no local route for it yet and would forward datagrams to it, so
	// it is not given to onServe (the firewall's served sets) until DAD
	// completes (the kernel announces that; the 2-s pass catches it too).
	tentative bool
}

// want computes the serving addresses from the interfaces' current state.
func (l *listener) want(h *netlink.Handle) map[netip.AddrPort]link {
	want := map[netip.AddrPort]link{}
	seen := map[int]bool{} // interface indexes already taken
	for _, name := range l.ifaces {
		lnk, err := h.LinkByName(name)
		if err != nil || lnk.Attrs().Flags&net.FlagUp == 0 {
			continue
		}
		// An interface configured twice, by its kernel name and an
		// altname, is served once, under its first configured name: its
		// link-local addresses, zoned by that name, were wanted twice,
		// and the second bind failed at every pass, while which name
		// zoned them (and the link-local leases) followed map order
		// (TestServedInterfaceTwoNames).
		if seen[lnk.Attrs().Index] {
			continue
		}
		seen[lnk.Attrs().Index] = true
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
			want[netip.AddrPortFrom(ip, port)] = link{name: name, kname: lnk.Attrs().Name, index: lnk.Attrs().Index,
				tentative: a.Flags&unix.IFA_F_TENTATIVE != 0}
		}
	}
	return want
}

func (l *listener) resync(h *netlink.Handle) {
	// The links gone since the last pass, taken before the interfaces
	// are read: one that leaves after this is left for the next pass
	// (its event asks for one), which reports it if served.
	left := l.takeLeft()
	want := l.want(h)
	if l.onServe != nil {
		// Deferred before the lock's: runs after the unlock, with the
		// sockets as this pass left them (closed ones gone, new ones open).
		defer func() {
			var aps []netip.AddrPort
			var ifaces []string
			for _, c := range l.sockets() {
				if !want[c.local].tentative {
					// The kernel's name: the firewall matches the
					// arrival interface by it.
					aps, ifaces = append(aps, c.local), append(ifaces, c.kname)
				}
			}
			l.onServe(aps, ifaces)
		}()
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.conns == nil {
		l.conns = map[netip.AddrPort]*udpConn{}
	}
	l.renamesLeft(h, want, left)
	if l.hook != nil {
		l.hook("open", want)
		defer l.hook("opened", want)
	}
	for ap, c := range l.conns {
		// SO_BINDTODEVICE holds the interface index: an interface deleted
		// and re-created under the same name needs a new socket.
		if w, ok := want[ap]; !ok || w.name != c.iface || w.kname != c.kname || w.index != c.index {
			c.pc.Close()
			delete(l.conns, ap)
			l.log.Info("stopped serving", zap.String("interface", c.iface), zap.Stringer("address", ap))
		}
	}
	for ap, w := range want {
		if _, ok := l.conns[ap]; ok {
			continue
		}
		pc, err := l.open(w.kname, w.index, ap)
		if err != nil {
			l.log.Warn("cannot serve address", zap.String("interface", w.name), zap.Stringer("address", ap), zap.Error(err))
			continue
		}
		rc, err := pc.SyscallConn()
		if err != nil {
			pc.Close()
			l.log.Warn("cannot serve address", zap.String("interface", w.name), zap.Stringer("address", ap), zap.Error(err))
			continue
		}
		c := &udpConn{iface: w.name, kname: w.kname, index: w.index, local: ap, pc: pc, rc: rc, full: l.onFull}
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
		if w.kname != w.name {
			// Configured by an altname: the kernel name is what
			// "nft list set ... serving_ifs" and "ip link" show.
			l.log.Info("serving", zap.String("interface", w.name), zap.String("kernel_name", w.kname), zap.Stringer("address", ap))
		} else {
			l.log.Info("serving", zap.String("interface", w.name), zap.Stringer("address", ap))
		}
	}
}

// renames reports to onRename the kernel names a rename concerns
// (listener.onRename), and records want's name ↔ index pairs: an index
// served before under another name (that name too), or a name served
// before on another index that still exists (renamed away: a re-created
// interface, whose old index is gone, is no rename; its device is new,
// and read by its name). Before the first pass nothing is reported to
// onRename: the ownership has just read the interfaces itself. An interface never
// served before renamed to a served name is caught only by the second
// rule (the served name's old index still exists).
//
// To onDevice it reports every name served on an index it was not
// served on before (renamed, re-created, or not served since the first
// pass), every served pair whose index is gone (deleted), once, and a
// name reported deleted that is served again on its old index (moved to
// another namespace and back: away; h/swap2) (h/swapev): the ownership's view, however young, may be of the device
// that was there, and a re-created WireGuard interface's first requests
// were judged by the old device's peers (TestE2EWireGuardDeviceSwapWithinBound).
// Both come from the link events run follows, before any socket of the
// new device is opened. On the first pass it reports every served name
// whose index is not the one the ownership's first read found there
// (firstIndex; unknown too): a device swapped between that read and
// this pass, within the fresh bound, was judged by the old device's
// peers (review h/revsw, TestE2EWireGuardDeviceSwapBeforeServing).
//
// And to onDevice every served name whose index or name left lists: an
// interface deleted or moved out of the namespace since the last pass,
// whatever is under the name now (h/lodrop). Without it a device moved
// out and back (or another moved in on its index, or one deleted and
// created again with "ip link add ... index N") between two passes was
// reported by nothing: the pass saw the name on its index as before
// (TestListenerLeftWithinOnePass).
func (l *listener) renames(h *netlink.Handle, want map[netip.AddrPort]link) {
	l.renamesLeft(h, want, l.takeLeft())
}

// renamesLeft is renames with the links gone since the last pass, as
// taken before want was read.
func (l *listener) renamesLeft(h *netlink.Handle, want map[netip.AddrPort]link, left leftLinks) {
	first := l.byName == nil
	if first {
		l.byName, l.byIndex = map[string]int{}, map[int]string{}
	}
	var changed, devs, deleted []string
	if first {
		for _, w := range want {
			var differs bool
			if l.firstIndex != nil {
				i, ok := l.firstIndex(w.kname)
				differs = !ok || i != w.index
			}
			if (differs || left.has(w.index, w.kname)) && !slices.Contains(devs, w.kname) {
				devs = append(devs, w.kname)
			}
		}
	}
	dev := func(k string) {
		if !first && !slices.Contains(devs, k) {
			devs = append(devs, k)
		}
	}
	add := func(k string) {
		if !first && !slices.Contains(changed, k) {
			changed = append(changed, k)
		}
		dev(k)
	}
	for _, w := range want {
		idx, had := l.byName[w.kname]
		if had && idx == w.index {
			if left.has(w.index, w.kname) {
				// Gone and back within one pass (its RTM_DELLINK):
				// as below, but no pass found it gone.
				delete(l.away, w.kname)
				dev(w.kname)
				continue
			}
			if l.away[w.kname] {
				// Served again on its index after a pass found it
				// gone: moved to another namespace and back (ip
				// link set DEV netns X; the index is kept), where
				// anything may have configured it, or another
				// device moved in on the free index. Not the
				// device the ownership last read, whatever the
				// index says (TestE2EWireGuardDeviceBackFromNamespace).
				delete(l.away, w.kname)
				dev(w.kname)
			}
			continue
		}
		delete(l.away, w.kname)
		// Served on an index it was not served on before: whatever
		// else it is (a rename, below), its device is not the one the
		// ownership may have read under the name (a re-created
		// WireGuard interface: new peers, maybe).
		dev(w.kname)
		if name, ok := l.byIndex[w.index]; ok && name != w.kname {
			add(w.kname)
			add(name)
		}
		if had {
			if _, err := h.LinkByIndex(idx); err == nil {
				add(w.kname)
			}
		}
		l.byName[w.kname], l.byIndex[w.index] = w.index, w.kname
	}
	// The pairs of interfaces that no longer exist here go, the oldest
	// first, beyond maxGonePairs (WireGuard bounces under new kernel
	// names, an altname-configured interface re-created under another,
	// renames): kept, the maps grew with every name ever served. Not at
	// once: an index gone from this namespace may come back with its
	// device (ip link set DEV netns X, and back: the index is kept) under
	// another served name, which the first rule reports
	// (TestListenerRenamesAcrossNamespaces). A pair served now is not
	// looked up; one whose index still exists (renamed away, unserved)
	// stays for the second rule, as does one whose lookup fails
	// otherwise (a transient error).
	if l.gone == nil {
		l.gone = map[string]uint64{}
	}
	for k, i := range l.byName {
		if servedPair(want, k, i) {
			delete(l.gone, k)
			continue
		}
		if _, err := h.LinkByIndex(i); errors.As(err, new(netlink.LinkNotFoundError)) {
			if _, ok := l.gone[k]; !ok {
				l.goneSeq++
				l.gone[k] = l.goneSeq
				if l.byIndex[i] == k { // its last served name, not one renamed away
					deleted = append(deleted, k)
					if l.away == nil {
						l.away = map[string]bool{}
					}
					l.away[k] = true
				}
			}
		} else {
			delete(l.gone, k)
		}
	}
	for len(l.gone) > maxGonePairs {
		oldest, seq := "", uint64(0)
		for k, n := range l.gone {
			if oldest == "" || n < seq {
				oldest, seq = k, n
			}
		}
		delete(l.gone, oldest)
		delete(l.byName, oldest)
		delete(l.away, oldest)
	}
	for i, k := range l.byIndex {
		if l.byName[k] != i {
			delete(l.byIndex, i)
		}
	}
	if l.onDevice != nil {
		for _, d := range []struct {
			ks   []string
			gone bool
		}{{deleted, true}, {devs, false}} {
			if len(d.ks) > 0 {
				slices.Sort(d.ks)
				l.onDevice(d.ks, d.gone)
			}
		}
	}
	if len(changed) > 0 {
		slices.Sort(changed)
		l.log.Info("served interface renamed", zap.Strings("kernel_names", changed))
		if l.onRename != nil {
			l.onRename(changed)
		}
	}
}

// leftLinks is the links the kernel told deleted or moved out of the
// listener's namespace (RTM_DELLINK) since the last pass: by index and
// by name, each as the kernel named it then; all, once more than maxLeft
// were told (every served name then counts as gone and back).
type leftLinks struct {
	index map[int]bool
	name  map[string]bool
	all   bool
}

// maxLeft bounds leftLinks between two passes (links of containers coming
// and going, say); beyond it every served name is reported, which is
// safe: the ownership reads its devices again.
const maxLeft = 256

// has reports whether a link of index or kname left.
func (k leftLinks) has(index int, kname string) bool {
	return k.all || k.index[index] || k.name[kname]
}

// noteLeft records the links msgs tell deleted or moved out of the
// namespace: RTM_DELLINK of family AF_UNSPEC (a bridge port's removal
// is an RTM_DELLINK of AF_BRIDGE, its device staying). The kernel sends
// one when a device is deleted and when it moves to another namespace
// (dev_change_net_namespace), and none when it is renamed, goes down or
// loses its addresses.
func (l *listener) noteLeft(msgs []syscall.NetlinkMessage) {
	for _, m := range msgs {
		if m.Header.Type != unix.RTM_DELLINK || len(m.Data) < unix.SizeofIfInfomsg {
			continue
		}
		ifi := nl.DeserializeIfInfomsg(m.Data)
		if ifi.Family != unix.AF_UNSPEC {
			continue
		}
		name := ""
		if attrs, err := nl.ParseRouteAttr(m.Data[unix.SizeofIfInfomsg:]); err == nil {
			for _, a := range attrs {
				if a.Attr.Type == unix.IFLA_IFNAME {
					name = strings.TrimRight(string(a.Value), "\x00")
				}
			}
		}
		l.leftMu.Lock()
		k := &l.left
		switch {
		case k.all:
		case len(k.index) >= maxLeft || len(k.name) >= maxLeft:
			*k = leftLinks{all: true}
		default:
			if k.index == nil {
				k.index, k.name = map[int]bool{}, map[string]bool{}
			}
			k.index[int(ifi.Index)] = true
			if name != "" {
				k.name[name] = true
			}
		}
		l.leftMu.Unlock()
	}
}

// noteOverrun records that the subscription lost notifications
// (ENOBUFS): an RTM_DELLINK among them is unknown, so every served name
// counts as gone and back at the next pass, as beyond maxLeft (the
// ownership reads its devices again). Before (review h/revdw), a served
// device deleted and created again on its index during a link storm
// that overran the subscription was reported by nothing
// (TestListenerLeftOverrun).
func (l *listener) noteOverrun() {
	l.leftMu.Lock()
	l.left = leftLinks{all: true}
	l.leftMu.Unlock()
}

// takeLeft returns the links gone since the last call and forgets them.
func (l *listener) takeLeft() leftLinks {
	l.leftMu.Lock()
	defer l.leftMu.Unlock()
	k := l.left
	l.left = leftLinks{}
	return k
}

// maxGonePairs bounds the name ↔ index pairs the listener keeps of
// interfaces no longer in its namespace (listener.renames).
const maxGonePairs = 16

// servedPair reports whether want serves kernel name kname on index.
func servedPair(want map[netip.AddrPort]link, kname string, index int) bool {
	for _, w := range want {
		if w.kname == kname && w.index == index {
			return true
		}
	}
	return false
}

// open binds a serving socket to ap on the interface ifc (kernel name,
// index index).
func (l *listener) open(ifc string, index int, ap netip.AddrPort) (*net.UDPConn, error) {
	network := "udp6"
	if ap.Addr().Is4() {
		network = "udp4"
	}
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			// Bound by the index want read, not by the name: the
			// kernel resolves a name when the option is set, and a
			// device swapped under it again after want (two swaps
			// inside one pass) was served on the socket as the device
			// renames reported, judged by the view of the one it
			// replaced (TestE2EWireGuardTwoSwapsInOnePass). A gone
			// index fails (ENODEV); the pass its link events ask for
			// reports the newer device first.
			if serr = l.bindToIndex(int(fd), index); serr != nil {
				serr = fmt.Errorf("SO_BINDTOIFINDEX %s (%d): %w", ifc, index, serr)
				return
			}
			if index != loopbackIndex || !l.lab {
				if serr = unix.SetsockoptSockFprog(int(fd), unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, hostOwnFilter(ap.Addr().Is4())); serr != nil {
					serr = fmt.Errorf("SO_ATTACH_FILTER: %w", serr)
					return
				}
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
	// A link-local address's zone is given as the index, not the name:
	// Go resolves a name in its process-wide cache, refreshed at most
	// once a minute while the name is in it, so a served interface
	// created again under its name (wg-quick down/up) had its new
	// link-local address bound to the old index (ENODEV) at every pass
	// for up to a minute (TestE2EWireGuardLinkLocalServedAfterSwap).
	bind := ap
	if ap.Addr().Zone() != "" {
		bind = netip.AddrPortFrom(ap.Addr().WithZone(strconv.Itoa(index)), ap.Port())
	}
	var pc net.PacketConn
	err := inNS(l.ns, func() error {
		var err error
		pc, err = lc.ListenPacket(context.Background(), network, bind.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("server: listen %s on %s: %w", ap, ifc, err)
	}
	return pc.(*net.UDPConn), nil
}

// bindToIndex binds socket fd to interface index (0: to none) with
// SO_BINDTOIFINDEX (Linux 5.1), or bindIndex.
func (l *listener) bindToIndex(fd, index int) error {
	if l.bindIndex != nil {
		return l.bindIndex(fd, index)
	}
	return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_BINDTOIFINDEX, index)
}

// probeBindToIndex asks the kernel, on a socket of its own, whether the
// serving sockets can be bound by index (bindToIndex to none, which a
// kernel with the option takes from any socket since 5.7), so that a
// kernel that cannot stops pcpd at start with what it needs rather than
// leave it serving nothing, every bind failing at every pass with a bare
// errno (h/lodrop; README.md, Requirements). No fallback to binding by
// name (SO_BINDTODEVICE): the kernel resolves the name when the option
// is set, and a device swapped under the name since want read it would
// get the socket (TestE2EWireGuardTwoSwapsInOnePass), its requests judged
// as the old device's. Any other failure is left to the binds, which
// log theirs.
func (l *listener) probeBindToIndex() error {
	return inNS(l.ns, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return nil // the binds will say
		}
		defer unix.Close(fd)
		switch err := l.bindToIndex(fd, 0); {
		case errors.Is(err, unix.ENOPROTOOPT):
			return fmt.Errorf("server: this kernel has no SO_BINDTOIFINDEX (Linux 5.1), which binds the serving sockets to their interface; pcpd needs Linux 5.6 or later (README.md, Requirements): %w", err)
		case errors.Is(err, unix.EPERM):
			// The kernel's release is named: on 5.7 or later the
			// refusal is not the capability's (seccomp, an LSM), and
			// the advice below would mislead (review h/revdw).
			return fmt.Errorf("server: binding a socket to an interface (SO_BINDTOIFINDEX) was refused on kernel %s; before Linux 5.7 it needs CAP_NET_RAW: give pcpd CAP_NET_RAW (AmbientCapabilities, CapabilityBoundingSet) or run Linux 5.7 or later; on a later kernel a seccomp filter or security module refused it (README.md, Requirements): %w", kernelRelease(), err)
		}
		return nil
	})
}

// kernelRelease is the running kernel's release (uname -r), or "unknown".
func kernelRelease() string {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return "unknown"
	}
	return unix.ByteSliceToString(u.Release[:])
}

// loopbackIndex is the loopback interface's index, the same in every
// network namespace (LOOPBACK_IFINDEX).
const loopbackIndex = 1

// hostOwnFilter is the socket filter (SO_ATTACH_FILTER) of every serving
// socket: a datagram the kernel delivered through loopback is taken only
// when its source is the address it was sent to; every other datagram is
// taken. On a socket serving loopback itself (--interface lo) every
// datagram came through loopback: only the host's own requests are taken
// there (h/local9, below).
//
// Security (issue 9, h/hunt3, HIGH): a datagram a process of this host
// sends to an address of the serving interface goes through loopback,
// and the kernel hands it to a socket bound to that interface
// (SO_BINDTODEVICE) as though it had arrived there: IPv6 counts it as
// received on the address's interface (ip6_rcv_core), IPv4 takes the
// local route's device for it (__mkroute_output's orig_oif). Any local
// user may bind an IPv6 socket to any address (IPV6_FREEBIND needs no
// privilege) and send from it. So user nobody on the host, sending from a
// WireGuard peer's address, was that peer to pcpd, whose ownership rests
// on WireGuard having checked every source (PROTOCOL.md choice (a)):
// it opened the peer's ports to the internet, IPv4 ones too through
// THIRD_PARTY, and deleted the peer's mappings
// (TestLocalUserCannotSpeakForPeer). A datagram from the host itself
// keeps the source the kernel chooses for a local destination, the
// destination itself (RFC 6724 rule 1; IPv4's local routes carry it as
// their source), so the host's own requests still arrive; one bound to
// another source does not. IPv4 cannot be sent from an address that is
// not the host's without IP_TRANSPARENT (CAP_NET_ADMIN), IPv6 can.
//
// Loopback (issue 9, review h/revh3, LOW): a socket serving lo had no
// filter, and every datagram there is one a process of this host sent, from
// any address it bound (IPV6_FREEBIND; any of 127.0.0.0/8 needs nothing):
// with static ownership (no interface checked) any local user spoke for
// any client, and opened its ports (TestLoopbackServesOnlyHost). Serving
// loopback now serves only the host, whose own address is never openable:
// a lab whose clients are addresses on lo must serve them from another
// interface (this package's tests: Config.loopbackLab).
//
// A socket filter, not an nftables rule: it holds in every mode (attached
// mode and --nft-notrack=false install no control chains), and the
// arrival device is known only to the kernel (the socket's interface
// index in IPV6_PKTINFO is the one it counts the datagram as received
// on). It costs a datagram from the serving interface one load and one
// comparison. A datagram it drops is counted in the socket's drops
// (/proc/net/udp6, Udp6InErrors), not in pcpd's metrics.
func hostOwnFilter(v4 bool) *unix.SockFprog {
	// Offsets from the network header (SKF_NET_OFF) of the source and
	// destination addresses, and their length in 4-octet words.
	const netOff = 0xfff00000
	src, dst, words := uint32(8), uint32(24), uint32(4)
	if v4 {
		src, dst, words = 12, 16, 1
	}
	// The arrival device (skb->dev): not loopback, take it; else compare
	// the addresses word by word.
	prog := []bpf.Instruction{
		bpf.LoadExtension{Num: bpf.ExtInterfaceIndex},
		bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: loopbackIndex, SkipTrue: uint8(4 * words)},
	}
	for i := range words {
		prog = append(prog,
			bpf.LoadAbsolute{Off: netOff + src + 4*i, Size: 4},
			bpf.TAX{},
			bpf.LoadAbsolute{Off: netOff + dst + 4*i, Size: 4},
			bpf.JumpIfX{Cond: bpf.JumpNotEqual, SkipTrue: uint8(4*(words-1-i) + 1)}, // to the drop
		)
	}
	prog = append(prog, bpf.RetConstant{Val: 0xffffffff}, bpf.RetConstant{Val: 0}) // take, drop
	raw, err := bpf.Assemble(prog)
	if err != nil {
		panic(err) // a fixed program
	}
	fs := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		fs[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	return &unix.SockFprog{Len: uint16(len(fs)), Filter: &fs[0]}
}

func (l *listener) read(c *udpConn) {
	defer l.wg.Done()
	// Draining the socket in batches (recvmmsg) keeps up with a flooding
	// source, so other clients' packets wait less behind the ones admit
	// drops; the replies the reader makes itself go out in one sendmmsg
	// per batch. Nothing here allocates per datagram but the copy of one
	// queued for the engine.
	ifk := ifaceKey(c.index, c.kname)
	in := newMmsg(readBatch)
	bufs := make([]byte, readBatch*readSize)
	for i := range in.iovs {
		in.iovs[i].Base = &bufs[i*readSize]
		in.iovs[i].SetLen(readSize)
	}
	out := newMmsg(readBatch)
	arena := make([]byte, 0, 64<<10) // the batch's replies, back to back
	ends := make([]int, 0, readBatch)
	tos := make([]netip.AddrPort, 0, readBatch)
	var counts tally
	for {
		counts.flush()
		if len(ends) > 0 {
			start := 0
			for i, end := range ends {
				out.set(i, arena[start:end], tos[i], c)
				start = end
			}
			if err := c.sendmmsg(out, len(ends)); err != nil {
				l.log.Debug("send replies", zap.Stringer("from", c.local), zap.Error(err))
			}
			arena, ends, tos = arena[:0], ends[:0], tos[:0]
		}
		in.off, in.cnt = 0, readBatch
		if err := c.rc.Read(in.recvF); err != nil {
			return // closed
		}
		if in.errno != 0 {
			continue
		}
		n := in.r
		now := time.Now() // the packets' arrival, for the latency histogram
		steady := now
		if l.clock != nil {
			steady = l.clock()
		}
		queued := false
		for i := range n {
			h := &in.hdrs[i]
			src, ok := sockaddrPort(&in.names[i], h.Hdr.Namelen, c)
			h.Hdr.Namelen = unix.SizeofSockaddrInet6 // for the next call
			if !ok {
				if l.onDrop != nil {
					l.onDrop("bad-source")
				}
				continue
			}
			b := bufs[i*readSize : i*readSize+int(h.Len)]
			if l.admit != nil {
				if reason := l.admit(b, src, sourceKey(ifk, src.Addr(), c.local.Addr()), steady); reason != "" {
					if l.onDrop != nil {
						l.onDrop(reason)
					}
					continue
				}
			}
			if l.early != nil {
				before := len(arena)
				switch r, v := l.early(&counts, arena, b, src, c.local.Addr(), c.kname, steady); v {
				case earlyAnswered:
					if len(r) > before {
						arena = r
						ends = append(ends, len(arena))
						tos = append(tos, src)
					}
					continue
				case earlyDeferred:
					l.thirdParty(packet{conn: c, src: src, b: append([]byte(nil), b...), at: now})
					continue
				}
			}
			p := packet{conn: c, src: src, b: append([]byte(nil), b...), at: now}
			select {
			case l.out <- p:
				queued = true
			default:
				// The engine is saturated: shedding load here keeps
				// memory bounded (PKT-08, SEC-04).
				if l.onDrop != nil {
					l.onDrop("queue-full")
				}
			}
		}
		if queued {
			// Let the engine run now. Under a flood the readers never
			// block (the socket always has data), and the engine,
			// readied by the channel send, would otherwise wait for this
			// goroutine's preemption (10 ms) with both cores' Ps held by
			// readers: a well-behaved client's request, queued in
			// microseconds, was answered tens of milliseconds later.
			runtime.Gosched()
		}
	}
}

// sockaddrPort decodes a source address the kernel wrote, link-local ones
// zoned with c's interface. An IPv4-mapped source on an IPv6 socket is
// refused (false): every serving socket is bound to one address of its
// own family, so real IPv4 never arrives as mapped; such a source is an
// IPv6 datagram that claims it, which the kernel delivers and WireGuard
// admits from a peer whose AllowedIPs cover ::ffff:0:0/96 (a full-tunnel
// ::/0). Unmapped, it was taken as the IPv4 address's owner's request
// (review h/revreq, TestE2EMappedSourceIsNotIPv4Owner).
func sockaddrPort(sa *unix.RawSockaddrInet6, n uint32, c *udpConn) (netip.AddrPort, bool) {
	switch {
	case sa.Family == unix.AF_INET6 && n >= unix.SizeofSockaddrInet6:
		a := netip.AddrFrom16(sa.Addr)
		if a.Is4In6() {
			return netip.AddrPort{}, false
		}
		if sa.Scope_id != 0 && a.Is6() {
			zone := c.iface
			if int(sa.Scope_id) != c.index {
				zone = strconv.FormatUint(uint64(sa.Scope_id), 10)
			}
			a = a.WithZone(zone)
		}
		return netip.AddrPortFrom(a, getPort(&sa.Port)), true
	case sa.Family == unix.AF_INET && n >= unix.SizeofSockaddrInet4:
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), getPort(&sa4.Port)), true
	}
	return netip.AddrPort{}, false
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
