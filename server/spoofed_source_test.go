package server

import (
	"errors"
	"fmt"
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
// it was forwarded (IPv4: DNAT-ed) to the client as if it came from the
// other peer. The guard's reverse-path rule (pinhole/rules.go, layout)
// drops it; the same address sent by the peer that owns it, through its
// tunnel and the host to the client's mapping (client to client), and
// the Internet's own address still pass.
func TestMappingDropsSpoofedOwnedSource(t *testing.T) {
	cases := []struct {
		name    string
		v4      bool
		other   netip.Prefix // a second peer's AllowedIPs
		spoofed netip.Addr   // inside other: the second peer's address, also sent from the Internet namespace
	}{
		{"ipv4 NAPT", true, netip.MustParsePrefix("10.100.0.64/26"), netip.MustParseAddr("10.100.0.77")},
		{"ipv6 pinhole", false, netip.MustParsePrefix("2001:db8:1:3::/64"), netip.MustParseAddr("2001:db8:1:3::77")},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t)
			l.topo.Host.MustRun(t, "sh", "-c", "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 2 > $f; done")
			// The host routes the second peer's prefix through the
			// tunnel, as wg-quick does (IPv4: the tunnel's /24 covers
			// it): a route back exists, so loose reverse path passes the
			// spoofed source.
			if !tc.v4 {
				l.topo.Host.MustRun(t, "ip", "-6", "route", "add", tc.other.String(), "dev", l.topo.HostLANIf)
			}
			peer := newSecondPeer(t, l, tc.other, tc.spoofed)
			// The guard protects the new peer's prefix from the next
			// sweep pass on (updateProtected).
			if err := netlab.Eventually(5*time.Second, func() error {
				set := "protected6"
				if tc.v4 {
					set = "protected4"
				}
				if out, err := l.topo.Host.Run("nft", "get", "element", "inet", "pcpd", set, "{", tc.other.String(), "}"); err != nil {
					return fmt.Errorf("%s not protected yet: %v: %s", tc.other, err, out)
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

			// From the Internet's own address (the mapping works), from
			// the second peer through its tunnel (client to client via
			// the host: its own address passes), then from the Internet
			// claiming the second peer's address (it must not pass).
			for _, from := range []struct {
				what string
				ns   *netlab.NS
				src  netip.Addr
				pass bool
			}{
				{"the Internet", l.topo.Internet, real, true},
				{"the second peer through its tunnel", peer, tc.spoofed, true},
				{"the Internet, spoofed", l.topo.Internet, tc.spoofed, false},
			} {
				var got netip.Addr
				if from.pass {
					// The second peer's first datagrams may wait for its
					// handshake.
					netlab.Eventually(5*time.Second, func() error {
						if got = sendAndReceive(t, from.ns, from.src, pub, rx); !got.IsValid() {
							return errors.New("nothing arrived")
						}
						return nil
					})
				} else {
					got = sendAndReceive(t, from.ns, from.src, pub, rx)
				}
				switch {
				case from.pass && got != from.src:
					t.Errorf("a datagram from %s (%v) through %v: arrived from %v, want from %v", from.what, from.src, pub, got, from.src)
				case !from.pass && got.IsValid():
					t.Errorf("a datagram from the WAN claiming %v (another peer's address) reached the client through %v, seen from %v", from.src, pub, got)
				}
			}
		})
	}
}

// newSecondPeer is a second WireGuard client of the lab's host, in a
// namespace of its own with its own underlay link: it owns prefix (its
// AllowedIPs on the host) and sends from addr, routing everything through
// its tunnel. It returns once the host's ownership view has it.
func newSecondPeer(t *testing.T, l *lab, prefix netip.Prefix, addr netip.Addr) *netlab.NS {
	t.Helper()
	ns := netlab.NewNS(t, "spf2")
	if err := netlab.Veth(ns, "ul0", l.topo.Host, "ul1"); err != nil {
		t.Fatal(err)
	}
	l.topo.Host.MustRun(t, "ip", "addr", "add", "10.98.0.1/30", "dev", "ul1")
	ns.MustRun(t, "ip", "addr", "add", "10.98.0.2/30", "dev", "ul0")
	cmd, err := netlab.DefaultWGCommand()
	if err != nil {
		t.Fatal(err)
	}
	ifname := netlab.UniqueIfName("wgs")
	if err := netlab.StartWireGuardDevice(ns, ifname, cmd); err != nil {
		t.Fatal(err)
	}
	key, _ := wgtypes.GeneratePrivateKey()
	keepalive := time.Second
	if err := l.wgc.ConfigureDevice(ifname, wgtypes.Config{
		PrivateKey: &key,
		Peers: []wgtypes.PeerConfig{{
			PublicKey:                   l.topo.HostKey.PublicKey(),
			Endpoint:                    &net.UDPAddr{IP: net.ParseIP("10.98.0.1"), Port: l.topo.HostWGPort},
			PersistentKeepaliveInterval: &keepalive,
			AllowedIPs:                  []net.IPNet{ipnet(netip.MustParsePrefix("::/0")), ipnet(netip.MustParsePrefix("0.0.0.0/0"))},
		}},
	}); err != nil {
		t.Fatal(err)
	}
	if err := l.wgc.ConfigureDevice(l.topo.HostLANIf, wgtypes.Config{Peers: []wgtypes.PeerConfig{{
		PublicKey: key.PublicKey(), AllowedIPs: []net.IPNet{ipnet(prefix)},
	}}}); err != nil {
		t.Fatal(err)
	}
	ns.MustRun(t, "ip", "link", "set", ifname, "mtu", "1420", "up")
	ns.MustRun(t, "ip", "addr", "add", netip.PrefixFrom(addr, addr.BitLen()).String(), "dev", ifname, "nodad")
	if addr.Is4() {
		ns.MustRun(t, "ip", "route", "add", "default", "dev", ifname)
	} else {
		ns.MustRun(t, "ip", "-6", "route", "add", "default", "dev", ifname)
	}
	if err := netlab.Eventually(3*time.Second, func() error {
		if o, ok := l.wg.Lookup(addr); !ok || o.ID == "" {
			return errors.New("second peer not seen yet")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return ns
}

// sendAndReceive sends a few datagrams from src in ns to dst and returns
// the source rx saw for the first of them that arrives (invalid: none).
// Datagrams left in rx from an earlier call (its retries) are skipped:
// each call's payload is its own.
func sendAndReceive(t *testing.T, ns *netlab.NS, src netip.Addr, dst netip.AddrPort, rx *net.UDPConn) netip.Addr {
	t.Helper()
	from, err := ns.SendUDPFrom(src, dst, rx, 500*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	return from
}

func ipnet(p netip.Prefix) net.IPNet {
	return net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
