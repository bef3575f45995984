package reliability

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
)

// sendFromAsNobody sends payload from src (bound with IPV6_FREEBIND, or
// IP_FREEBIND for IPv4: neither needs a privilege) to dst as the local
// user nobody in ns, and returns the send's error.
func sendFromAsNobody(ns *netlab.NS, src, dst netip.AddrPort, payload []byte) error {
	return asUserIn(ns, nobody, func() error {
		fam, level, opt := unix.AF_INET6, unix.IPPROTO_IPV6, unix.IPV6_FREEBIND
		if src.Addr().Is4() {
			fam, level, opt = unix.AF_INET, unix.IPPROTO_IP, unix.IP_FREEBIND
		}
		fd, err := unix.Socket(fam, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if err := unix.SetsockoptInt(fd, level, opt, 1); err != nil {
			return fmt.Errorf("freebind: %w", err)
		}
		var from, to unix.Sockaddr
		if fam == unix.AF_INET6 {
			from = &unix.SockaddrInet6{Port: int(src.Port()), Addr: src.Addr().As16()}
			to = &unix.SockaddrInet6{Port: int(dst.Port()), Addr: dst.Addr().As16()}
		} else {
			from = &unix.SockaddrInet4{Port: int(src.Port()), Addr: src.Addr().As4()}
			to = &unix.SockaddrInet4{Port: int(dst.Port()), Addr: dst.Addr().As4()}
		}
		if err := unix.Bind(fd, from); err != nil {
			return fmt.Errorf("bind %s: %w", src, err)
		}
		return unix.Sendto(fd, payload, 0, to)
	})
}

// udpIn opens a UDP socket bound to ap in ns and counts, in n, the
// datagrams it receives until the test ends.
func udpIn(t *testing.T, ns *netlab.NS, ap netip.AddrPort, n *atomic.Int32) *net.UDPConn {
	t.Helper()
	c := ns.MustListenUDP(t, ap)
	if n != nil {
		go func() {
			buf := make([]byte, 1500)
			for {
				if _, _, err := c.ReadFromUDPAddrPort(buf); err != nil {
					if errors.Is(err, net.ErrClosed) {
						return
					}
					continue
				}
				n.Add(1)
			}
		}()
	}
	return c
}

// sendInbound sends n datagrams "inbound" from c to to, 20 ms apart.
func sendInbound(t *testing.T, c *net.UDPConn, to netip.AddrPort, n int) {
	t.Helper()
	for range n {
		if _, err := c.WriteToUDPAddrPort([]byte("inbound"), to); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestLocalUserForgesFlowToClient (h/hunt4, issue 9: a local
// unprivileged user on the tunnel host). pcpd's standalone guard admits
// to a client's prefix what a pinhole admits, or an established flow. An
// unprivileged process of the host may bind an IPv6 socket to any
// address with IPV6_FREEBIND (h/hunt3) and send from it to anywhere: a
// datagram from the WireGuard client's address and port to an internet
// host leaves through the WAN, and conntrack (output hook) records a
// flow whose replies are "established". The internet host's datagrams
// to the client's port then pass the guard as those replies and reach
// the client: a firewall hole no lease, no request and no owner ever
// made (the client's UDP services on ports >= 1024 opened to a remote
// of the local user's choosing, kept open by the remote's traffic).
// Likewise a datagram to another client impersonates this one. Judged by
// what the client receives; the control is the same datagrams without
// the forged one (dropped), and the host's own traffic from its own
// address still flows.
func TestLocalUserForgesFlowToClient(t *testing.T) {
	l := newLab(t, labOptions{wireGuard: true})
	l.start()
	const cport, rport = 40000, 4444
	client := netip.AddrPortFrom(l.topo.ClientV6, cport)
	remote := netip.AddrPortFrom(l.topo.InternetV6, rport)

	var atClient, atRemote atomic.Int32
	udpIn(t, l.topo.Client, client, &atClient)
	in := udpIn(t, l.topo.Internet, remote, &atRemote)
	inbound := func(n int) { t.Helper(); sendInbound(t, in, client, n) }

	// Control: unsolicited, the internet's datagrams are dropped.
	inbound(5)
	time.Sleep(300 * time.Millisecond)
	if n := atClient.Load(); n != 0 {
		t.Fatalf("control: %d unsolicited datagrams from the internet reached the client's port %d with no pinhole", n, cport)
	}

	// IPv4 cannot be forged so (no FLOWI_FLAG_ANYSRC without IP_TRANSPARENT).
	if err := sendFromAsNobody(l.topo.Host, netip.AddrPortFrom(l.topo.ClientV4, cport), netip.AddrPortFrom(l.topo.InternetV4, rport), []byte("forged4")); err == nil {
		t.Logf("IPv4: user nobody sent from the client's %v (no error)", l.topo.ClientV4)
	} else {
		t.Logf("IPv4: user nobody cannot send from the client's %v: %v", l.topo.ClientV4, err)
	}

	// The forgery: user nobody on the host, from the client's address.
	err := sendFromAsNobody(l.topo.Host, client, remote, []byte("forged"))
	t.Logf("user nobody sent from %v to %v: %v", client, remote, err)
	waitFor(time.Second, func() bool { return atRemote.Load() > 0 })
	forgedOut := atRemote.Load()
	inbound(5)
	waitFor(time.Second, func() bool { return atClient.Load() > 0 })
	if n := atClient.Load(); n != 0 || forgedOut != 0 {
		t.Errorf("a datagram user nobody sent from the client's %v left the host (the internet received %d), and then %d of 5 datagrams from the internet's %v reached the client through pcpd's guard, with no lease: %v",
			client, forgedOut, n, remote, l.leases())
	}

	// TCP: the forged SYN (from the client's address and port to the
	// internet host, which ignores it) leaves a flow whose reply-direction
	// SYN (a simultaneous open, as conntrack allows) passes the guard as
	// established and reaches the client's TCP service.
	const tport, trport = 40001, 8080
	tclient := netip.AddrPortFrom(l.topo.ClientV6, tport)
	tremote := netip.AddrPortFrom(l.topo.InternetV6, trport)
	l.topo.Client.ServeTCP(t, tclient.String())
	if err := l.topo.Internet.Probe("tcp", tremote, tclient.String(), time.Second); err == nil {
		t.Fatalf("control: a TCP connection from the internet's %v reached the client's %v with no pinhole", tremote, tclient)
	}
	l.topo.Internet.MustRun(t, "nft", "add table inet hunt4; add chain inet hunt4 in { type filter hook input priority 0; }; add rule inet hunt4 in tcp dport 8080 tcp flags & (syn | ack) == syn drop")
	var tfd int
	if err := asUserIn(l.topo.Host, nobody, func() error {
		fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
		if err != nil {
			return err
		}
		tfd = fd
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_FREEBIND, 1); err != nil {
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrInet6{Port: tport, Addr: tclient.Addr().As16()}); err != nil {
			return err
		}
		if err := unix.Connect(fd, &unix.SockaddrInet6{Port: trport, Addr: tremote.Addr().As16()}); err != nil && err != unix.EINPROGRESS {
			return err
		}
		return nil
	}); err != nil {
		t.Logf("user nobody's TCP SYN from %v: %v", tclient, err)
	}
	if tfd > 0 {
		defer unix.Close(tfd)
	}
	time.Sleep(200 * time.Millisecond)
	if err := l.topo.Internet.Probe("tcp", tremote, tclient.String(), 2*time.Second); err == nil {
		t.Errorf("after user nobody's SYN from the client's %v, a TCP connection from the internet's %v reached the client's service through pcpd's guard, with no lease", tclient, tremote)
	}

	// The host's own traffic from its own addresses is untouched: from
	// its WAN address to the internet, from its tunnel address to the
	// client.
	for _, h := range []struct {
		from netip.Addr
		to   netip.AddrPort
		n    *atomic.Int32
	}{{l.topo.HostWANV6, remote, &atRemote}, {l.topo.HostTunnelV6, client, &atClient}} {
		h.n.Store(0)
		c := udpIn(t, l.topo.Host, netip.AddrPortFrom(h.from, 0), nil)
		if _, err := c.WriteToUDPAddrPort([]byte("host"), h.to); err != nil {
			t.Fatalf("the host's own datagram from %v to %v: %v", h.from, h.to, err)
		}
		if _, ok := waitFor(2*time.Second, func() bool { return h.n.Load() > 0 }); !ok {
			t.Fatalf("the host's own datagram from %v did not reach %v", h.from, h.to)
		}
	}
}
