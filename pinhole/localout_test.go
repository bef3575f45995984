package pinhole_test

import (
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// sendFrom sends one UDP datagram from src (bound with IPV6_FREEBIND, as
// any unprivileged process may) to dst in ns and returns sendto's error.
func sendFrom(ns *netlab.NS, src, dst netip.AddrPort) error {
	return sendOpt(ns, src, "", dst, unix.IPV6_FREEBIND)
}

// eachLocalOutMode runs fn on a fresh topology whose Host has pcpd's
// layout guarding Client's prefixes, standalone and attached.
func eachLocalOutMode(t *testing.T, fn func(t *testing.T, topo *netlab.Topology)) {
	for _, tc := range []struct {
		name string
		cfg  pinhole.Config
	}{
		{"standalone", pinhole.Config{}},
		{"attached", pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			topo := netlab.NewTopology(t, netlab.TopologyOptions{})
			if tc.cfg.Attached {
				loadNft(t, topo.Host, adminRuleset)
			}
			b := newBackend(t, topo.Host, tc.cfg)
			defer b.Teardown()
			if !tc.cfg.Attached {
				serveTunnel(t, b, topo)
			}
			if err := b.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
				t.Fatal(err)
			}
			fn(t, topo)
		})
	}
}

// listenOnce opens a UDP socket on ap in ns (closed when the test ends)
// and returns whether a datagram arrives within 500 ms, each call.
func listenOnce(t *testing.T, ns *netlab.NS, ap netip.AddrPort) (got func() bool) {
	t.Helper()
	c := ns.MustListenUDP(t, ap)
	return func() bool {
		c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		_, _, err := c.ReadFromUDPAddrPort(make([]byte, 64))
		return err == nil
	}
}

// TestLocalOutDropsForgedSource (h/hunt4, issue 9): the output hook's
// local_out chain drops a datagram a host process sends from a protected
// address that is not the host's (here the client's, bound with
// IPV6_FREEBIND): sendto fails with EPERM and nothing reaches the
// internet. Not dropped: the host's own address inside the protected
// /64 (the lab's LAN address 2001:db8:1:2::1), and what the kernel sends
// for no socket: an admin's "reject with tcp reset" of an inbound
// connection to the client, a reset whose source is the client's
// address (the internet's dial is refused, not timed out). Standalone
// and attached.
func TestLocalOutDropsForgedSource(t *testing.T) {
	eachLocalOutMode(t, func(t *testing.T, topo *netlab.Topology) {
		remote := netip.AddrPortFrom(topo.InternetV6, 4444)
		got := listenOnce(t, topo.Internet, remote)

		forged := netip.AddrPortFrom(topo.ClientV6, 40000)
		if err := sendFrom(topo.Host, forged, remote); !errors.Is(err, unix.EPERM) || got() {
			t.Errorf("from the client's %v: sendto = %v, want EPERM, and nothing at the internet", forged, err)
		}
		own := netip.AddrPortFrom(topo.HostTunnelV6, 40000)
		if !topo.ClientPrefix6.Contains(own.Addr()) {
			t.Fatalf("the lab changed: the host's %v is not in the protected %v", own.Addr(), topo.ClientPrefix6)
		}
		if err := sendFrom(topo.Host, own, remote); err != nil || !got() {
			t.Errorf("from the host's own %v (in a protected prefix): sendto = %v, received %v; want sent", own, err, !got())
		}

		// A reject's reset carries the client's address and no socket.
		topo.Host.MustRun(t, "nft", "add table inet hunt4rej; add chain inet hunt4rej rej { type filter hook forward priority -10; }; add rule inet hunt4rej rej ip6 daddr "+
			topo.ClientV6.String()+" tcp dport 40002 reject with tcp reset")
		err := topo.Internet.DialTCP(netip.AddrPortFrom(topo.ClientV6, 40002).String(), 2*time.Second)
		if err == nil || !strings.Contains(err.Error(), "connection refused") {
			t.Errorf("the admin's reset of an inbound connection to the client: dial = %v, want connection refused", err)
		}
	})
}

// sendOpt sends one UDP datagram from src (zone: its interface, for a
// link-local source) to dst in ns, after setting the IPv6 socket options
// opts to 1 (IPV6_FREEBIND as any process may, IPV6_TRANSPARENT as a
// privileged transparent proxy), and returns sendto's error.
func sendOpt(ns *netlab.NS, src netip.AddrPort, zone string, dst netip.AddrPort, opts ...int) error {
	return ns.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		for _, o := range opts {
			if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, o, 1); err != nil {
				return err
			}
		}
		sa := &unix.SockaddrInet6{Port: int(src.Port()), Addr: src.Addr().As16()}
		if zone != "" {
			ifi, err := net.InterfaceByName(zone)
			if err != nil {
				return err
			}
			sa.ZoneId = uint32(ifi.Index)
		}
		if err := unix.Bind(fd, sa); err != nil {
			return err
		}
		return unix.Sendto(fd, []byte("x"), 0, &unix.SockaddrInet6{Port: int(dst.Port()), Addr: dst.Addr().As16()})
	})
}

// TestLocalOutDropsForgedRemoteToClient (h/revh4, issue 9): local_out
// also drops what a host process sends to a protected address from a
// source that is not the host's (here an internet host's, bound with
// IPV6_FREEBIND): such a datagram makes a flow whose original side is the
// remote, so the remote's own datagrams to the client pass the guard as
// established once the client answers. Not dropped: the host's own
// datagram to the client from its link-local address (as pcpd answers a
// request sent to it there), and a transparent proxy's answer
// (IPV6_TRANSPARENT) from the remote's address to the client within the
// flow the client made to the remote. Standalone and attached.
func TestLocalOutDropsForgedRemoteToClient(t *testing.T) {
	eachLocalOutMode(t, func(t *testing.T, topo *netlab.Topology) {
		client := netip.AddrPortFrom(topo.ClientV6, 40010)
		remote := netip.AddrPortFrom(topo.InternetV6, 4445)
		atClient, atRemote := listenOnce(t, topo.Client, client), listenOnce(t, topo.Internet, remote)

		if err := sendOpt(topo.Host, remote, "", client, unix.IPV6_FREEBIND); !errors.Is(err, unix.EPERM) || atClient() {
			t.Errorf("from the internet's %v to the client's %v: sendto = %v, want EPERM, and nothing at the client", remote, client, err)
		}
		var ll netip.Addr
		if err := topo.Host.Do(func() error {
			ifi, err := net.InterfaceByName(topo.HostLANIf)
			if err != nil {
				return err
			}
			as, err := ifi.Addrs()
			for _, a := range as {
				if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().Is6() && p.Addr().IsLinkLocalUnicast() {
					ll = p.Addr()
				}
			}
			return err
		}); err != nil || !ll.IsValid() {
			t.Fatalf("the host's link-local address on %s: %v %v", topo.HostLANIf, ll, err)
		}
		if err := sendOpt(topo.Host, netip.AddrPortFrom(ll, 0), topo.HostLANIf, client); err != nil || !atClient() {
			t.Errorf("from the host's link-local %v%%%s to the client's %v: sendto = %v; want sent and received", ll, topo.HostLANIf, client, err)
		}
		// Within a flow the client made: a transparent proxy answering
		// as the server the client asked (IPV6_TRANSPARENT).
		if err := topo.Client.Do(func() error {
			c, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(client.Addr(), 40011)), net.UDPAddrFromAddrPort(remote))
			if err != nil {
				return err
			}
			defer c.Close()
			_, err = c.Write([]byte("q"))
			return err
		}); err != nil || !atRemote() {
			t.Fatalf("the client's own datagram to the internet's %v: %v", remote, err)
		}
		toProxied := netip.AddrPortFrom(client.Addr(), 40011)
		atProxied := listenOnce(t, topo.Client, toProxied)
		if err := sendOpt(topo.Host, remote, "", toProxied, unix.IPV6_TRANSPARENT); err != nil || !atProxied() {
			t.Errorf("a transparent proxy's answer from the internet's %v to the client's %v, in the client's flow: sendto = %v; want sent and received", remote, toProxied, err)
		}
	})
}
