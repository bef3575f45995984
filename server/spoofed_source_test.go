package server

import (
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
)

// TestMappingDropsSpoofedOwnedSource: a mapping opens a client's port to
// the internet, not to datagrams from the WAN that claim the source
// address of a tunnel client. Over the tunnel such a source is
// authenticated by WireGuard's cryptokey routing (DESIGN.md "Who owns
// what"), so clients may trust it; a packet from the WAN carrying it is
// spoofed. Reverse-path filtering does not catch it in the usual loose
// mode (rp_filter=2, systemd's default: a route back via the tunnel
// exists), and IPv6 has none. Before a mapping the guard drops it; with one
// it is forwarded (IPv4: DNAT-ed) to the client as if it came from the
// other peer.
func TestMappingDropsSpoofedOwnedSource(t *testing.T) {
	cases := []struct {
		name    string
		v4      bool
		other   netip.Prefix // a second peer's AllowedIPs
		spoofed netip.Addr   // inside other, sent from the Internet namespace
	}{
		{"ipv4 NAPT", true, netip.MustParsePrefix("10.100.0.64/26"), netip.MustParseAddr("10.100.0.77")},
		{"ipv6 pinhole", false, netip.MustParsePrefix("2001:db8:1:3::/64"), netip.MustParseAddr("2001:db8:1:3::77")},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t)
			l.topo.Host.MustRun(t, "sh", "-c", "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 2 > $f; done")
			other, _ := wgtypes.GeneratePrivateKey()
			if err := l.wgc.ConfigureDevice(l.topo.HostLANIf, wgtypes.Config{Peers: []wgtypes.PeerConfig{{
				PublicKey: other.PublicKey(), AllowedIPs: []net.IPNet{ipnet(tc.other)},
			}}}); err != nil {
				t.Fatal(err)
			}
			if err := netlab.Eventually(3*time.Second, func() error {
				if o, ok := l.wg.Lookup(tc.spoofed); !ok || o.ID == "" {
					return errors.New("second peer not seen yet")
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}

			client, pub, real := l.topo.ClientV6, netip.AddrPortFrom(l.topo.ClientV6, 7000), l.topo.InternetV6
			if tc.v4 {
				client, real = l.topo.ClientV4, l.topo.InternetV4
				pub = netip.AddrPortFrom(l.topo.HostPublicV4, 17000)
			}
			r := l.pcp(mapReq(client, pcp.ProtoUDP, 7000, pub.Port(), time.Hour, 1))
			if r.Result != 0 || r.Map.ExternalPort != pub.Port() {
				t.Fatalf("MAP: %v, external %d", r.Result, r.Map.ExternalPort)
			}
			var rx *net.UDPConn
			if err := l.topo.Client.Do(func() (err error) {
				rx, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(client, 7000)))
				return err
			}); err != nil {
				t.Fatal(err)
			}
			defer rx.Close()
			l.topo.Internet.MustRun(t, "ip", "addr", "add", netip.PrefixFrom(tc.spoofed, tc.spoofed.BitLen()).String(), "dev", "eth0", "nodad")

			// From the Internet's own address (the mapping works), then
			// from the spoofed one (it must not pass).
			for _, src := range []netip.Addr{real, tc.spoofed} {
				got := sendAndReceive(t, l.topo.Internet, src, pub, rx)
				switch {
				case src == real && !got.IsValid():
					t.Fatalf("a datagram from %v through %v did not arrive", src, pub)
				case src == tc.spoofed && got.IsValid():
					t.Errorf("a datagram from the WAN claiming %v (another peer's address) reached the client through %v, seen from %v", src, pub, got)
				}
			}
		})
	}
}

// sendAndReceive sends a few datagrams from src in ns to dst and returns
// the source rx saw for the first that arrives (invalid: none).
func sendAndReceive(t *testing.T, ns *netlab.NS, src netip.Addr, dst netip.AddrPort, rx *net.UDPConn) netip.Addr {
	t.Helper()
	var c *net.UDPConn
	if err := ns.Do(func() (err error) {
		c, err = net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(src, 0)), net.UDPAddrFromAddrPort(dst))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 64)
	for range 3 {
		c.Write([]byte("hello from " + src.String()))
		rx.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		if _, from, err := rx.ReadFromUDPAddrPort(buf); err == nil {
			return from.Addr().Unmap()
		}
	}
	return netip.Addr{}
}

func ipnet(p netip.Prefix) net.IPNet {
	return net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
