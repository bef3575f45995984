package reliability

import (
	"errors"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
)

// nobody is the unprivileged local user of the loopback tests.
const nobody = 65534

// asUserIn runs fn on a thread in ns's network namespace (NS.Do) with
// the effective uid uid, and returns once fn has. asuser.Do cannot enter
// a namespace (setns needs the capabilities the uid change drops), and
// it lets its thread exit: a thread that exits kills the children it
// started with a parent-death signal (pcpdtest's pcpd, the lab's
// WireGuard devices, which the runtime may have started from it), as
// the first form of this helper did now and then (the host's WireGuard
// interface gone mid-test). So the thread gets euid 0 back (its real
// and saved uids stayed 0) before Do restores its namespace.
func asUserIn(ns *netlab.NS, uid int, fn func() error) error {
	setEUID := func(id int) error {
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, ^uintptr(0), uintptr(id), ^uintptr(0)); e != 0 {
			return fmt.Errorf("setresuid %d: %w", id, e)
		}
		return nil
	}
	return ns.Do(func() error {
		if err := setEUID(uid); err != nil {
			return err
		}
		ferr := fn()
		if err := setEUID(0); err != nil {
			return errors.Join(ferr, err) // Do's setns fails: the thread is discarded
		}
		return ferr
	})
}

// sendAsNobody sends each of pkts from src (any IPv6 address: the
// socket binds with IPV6_FREEBIND, which needs no privilege) to pcpd's
// server address in ns, as the local user nobody, and returns the first
// datagram that comes back within wait (nil: none; the answer to a
// source not of this host goes wherever that address is routed).
func sendAsNobody(ns *netlab.NS, src netip.Addr, server netip.AddrPort, wait time.Duration, pkts ...[]byte) (reply []byte, err error) {
	err = asUserIn(ns, nobody, func() error {
		fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_FREEBIND, 1); err != nil {
			return fmt.Errorf("IPV6_FREEBIND: %w", err)
		}
		if err := unix.Bind(fd, &unix.SockaddrInet6{Addr: src.As16()}); err != nil {
			return fmt.Errorf("bind %s: %w", src, err)
		}
		tv := unix.NsecToTimeval(wait.Nanoseconds())
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			return err
		}
		to := &unix.SockaddrInet6{Port: int(server.Port()), Addr: server.Addr().As16()}
		for i, b := range pkts {
			err := unix.Sendto(fd, b, 0, to)
			if err != nil {
				return fmt.Errorf("send %d of %d from %s: %w", i+1, len(pkts), src, err)
			}
		}
		buf := make([]byte, 2048)
		n, _, err := unix.Recvfrom(fd, buf, 0)
		for err == unix.EINTR { // the runtime's preemption signals
			n, _, err = unix.Recvfrom(fd, buf, 0)
		}
		if err == unix.EAGAIN {
			return nil
		}
		if err != nil {
			return err
		}
		reply = append([]byte(nil), buf[:n]...)
		return nil
	})
	return reply, err
}

// TestLocalUserCannotSpeakForPeer (h/hunt3, issue 9: a local
// unprivileged user on the tunnel host): a datagram a process of the
// host sends to an address of the serving interface is delivered through
// loopback, and the kernel gives it to a socket bound to that interface
// (SO_BINDTODEVICE) as though it had arrived there (IPv6 counts it as
// received on the address's interface; IPv4 as of the route's device).
// An unprivileged user may bind an IPv6 socket to any address with
// IPV6_FREEBIND and send from it. So user nobody on the host, sending
// from the WireGuard client's tunnel address, was taken by pcpd as that
// peer: WireGuard's cryptokey check (PROTOCOL.md choice (a), the whole
// ownership model) never saw the datagram. Judged by the kernel and
// `pcpd leases`: nobody's MAP in the peer's name opened the peer's port
// to the internet, a THIRD_PARTY MAP of the peer's IPv4 address opened a
// NAPT port to it, and a delete removed the peer's own mapping. pcpd's
// nftables rules let it through: serving_ifs holds "lo" for the host's
// own requests, and the served-source drops look only at sources that
// are the served addresses.
//
// The host's own request (from the served address itself, as the kernel
// picks for a local destination) is still answered.
func TestLocalUserCannotSpeakForPeer(t *testing.T) {
	l := newLab(t, labOptions{wireGuard: true})
	l.start()
	cli, cli4 := l.topo.ClientV6, l.topo.ClientV4
	server := l.server6()

	// The client's own mapping, made through the tunnel.
	c := l.pcpClient(cli)
	l.mustMap(c, cli, pcp.ProtoTCP, 9302, time.Hour)
	if !l.kernelHas(cli, pcp.ProtoTCP, 9302) {
		t.Fatal("no kernel element for the client's own mapping")
	}

	// IPv4 cannot be sent from an address that is not the host's (no
	// FLOWI_FLAG_ANYSRC without IP_TRANSPARENT, which needs
	// CAP_NET_ADMIN): asserted by TestLocalUserOtherSpoofPaths.

	before := kernelSet(l.kernel())
	for _, tc := range []struct {
		name string
		pkt  []byte
	}{
		{"MAP in the peer's name", mapNonce(cli, 9300, time.Hour, 1, netip.Addr{})},
		{"THIRD_PARTY MAP of the peer's IPv4", mapNonce(cli, 9301, time.Hour, 2, cli4)},
		{"delete of the peer's mapping", mapNonce(cli, 9302, 0, 3, netip.Addr{})},
	} {
		// EPERM: pcpd's local_out chain dropped it at the output hook
		// (h/hunt4), before the socket filter could.
		if _, err := sendAsNobody(l.topo.Host, cli, server, 300*time.Millisecond, tc.pkt, tc.pkt, tc.pkt); errors.Is(err, unix.EPERM) {
			t.Logf("%s: %v", tc.name, err)
		} else if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
	}
	time.Sleep(time.Second)
	appeared, vanished := kernelDiff(before, kernelSet(l.kernel()))
	if len(appeared)+len(vanished) > 0 {
		t.Errorf("user nobody, sending from the WireGuard peer's address %s over loopback, changed the kernel: appeared %v, vanished %v", cli, appeared, vanished)
	}
	for _, ls := range l.leases() {
		if p := ls.InternalPort; p == 9300 || p == 9301 {
			t.Errorf("lease made by user nobody in the peer's name: %+v", ls)
		}
	}
	if !l.kernelHas(cli, pcp.ProtoTCP, 9302) {
		t.Errorf("the client's own mapping was deleted by user nobody")
	}

	// Control: the host's own request, from the served address itself.
	r, err := sendAsNobody(l.topo.Host, server.Addr(), server, 3*time.Second, announceBytes(server.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	if r == nil || resultOf(r) != 0 {
		t.Errorf("the host's own ANNOUNCE from %s: reply %x, want SUCCESS", server.Addr(), r)
	}
}

// TestLocalUserHostAddressInOwnerPrefix (h/hunt3): the same local user
// as TestLocalUserCannotSpeakForPeer, sending from the served address
// itself (the host's own source, which the socket filter lets through):
// in the static lab the host's LAN address 2001:db8:1:2::1 lies inside
// client cli's /64 (an operator giving a LAN client its whole prefix), so
// pcpd took the host's own request as cli's, and a THIRD_PARTY MAP of
// cli's address opened it. The host's own address is never openable; as
// a requester it is nobody's either.
func TestLocalUserHostAddressInOwnerPrefix(t *testing.T) {
	l := newLab(t, labOptions{})
	l.start()
	server := l.server6()
	host, cli := server.Addr(), l.topo.ClientV6
	if !l.topo.ClientPrefix6.Contains(host) {
		t.Fatalf("the lab changed: the host's %s is not in the client's %s", host, l.topo.ClientPrefix6)
	}
	before := kernelSet(l.kernel())
	r, err := sendAsNobody(l.topo.Host, host, server, 3*time.Second, mapNonce(host, 9310, time.Hour, 1, cli))
	if err != nil {
		t.Fatal(err)
	}
	if appeared, vanished := kernelDiff(before, kernelSet(l.kernel())); len(appeared)+len(vanished) > 0 || resultOf(r) == 0 {
		t.Errorf("user nobody, from the host's own %s, THIRD_PARTY MAP of the client's %s: result %d, kernel appeared %v, vanished %v; want a refusal, no change",
			host, cli, resultOf(r), appeared, vanished)
	}
	// Still answered: the host's own ANNOUNCE.
	if r, err = sendAsNobody(l.topo.Host, host, server, 3*time.Second, announceBytes(host)); err != nil || r == nil || resultOf(r) != 0 {
		t.Errorf("the host's own ANNOUNCE: reply %x, %v; want SUCCESS", r, err)
	}
}
