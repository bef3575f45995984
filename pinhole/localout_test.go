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
	return ns.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_FREEBIND, 1); err != nil {
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrInet6{Port: int(src.Port()), Addr: src.Addr().As16()}); err != nil {
			return err
		}
		return unix.Sendto(fd, []byte("x"), 0, &unix.SockaddrInet6{Port: int(dst.Port()), Addr: dst.Addr().As16()})
	})
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
			remote := netip.AddrPortFrom(topo.InternetV6, 4444)
			var rx *net.UDPConn
			if err := topo.Internet.Do(func() (err error) {
				rx, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(remote))
				return err
			}); err != nil {
				t.Fatal(err)
			}
			defer rx.Close()
			got := func() bool {
				rx.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
				_, _, err := rx.ReadFromUDPAddrPort(make([]byte, 64))
				return err == nil
			}

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
}
