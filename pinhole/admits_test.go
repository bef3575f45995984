package pinhole

import (
	"bytes"
	"net/netip"
	"testing"
)

// packetKey is the lookup key the guard (or the DNAT) builds from a
// packet for set k (rules.go: keyPacket6, keyPacket4), in the layout
// element uses.
func packetKey(k kind, proto uint8, src, dst netip.AddrPort) []byte {
	switch k {
	case kindPort, kindRedirect6, kindNAPT4:
		return putPort(putProto(putAddr(nil, dst.Addr()), proto), dst.Port())
	case kindProto:
		return putProto(putAddr(nil, dst.Addr()), proto)
	case kindAddr:
		return putAddr(nil, dst.Addr())
	case kindAddrFilter:
		return putAddr(putAddr(nil, dst.Addr()), src.Addr())
	}
	return putPort(putAddr(putPort(putProto(putAddr(nil, dst.Addr()), proto), dst.Port()), src.Addr()), src.Port())
}

// elementHas is the kernel's match of a packet key against an element of
// set k: equal keys, or for an interval set each concatenated field
// within its range (the pipapo set).
func elementHas(k kind, e []byte, end []byte, key []byte) bool {
	if !specs[k].interval {
		return bytes.Equal(e, key)
	}
	off := 0
	for _, t := range specs[k].key {
		n := (int(t.Bytes) + 3) &^ 3
		if bytes.Compare(e[off:off+n], key[off:off+n]) > 0 || bytes.Compare(key[off:off+n], end[off:off+n]) > 0 {
			return false
		}
		off += n
	}
	return true
}

// TestAdmitsAsKernelKey: Pinhole.Admits, which the server's conntrack
// flush spares flows with, says yes for exactly the packets whose key the
// pinhole's set element holds: for every shape (port, all ports, all
// protocols, redirect, NAPT), with and without a remote prefix and port,
// over a grid of packets around each. In particular a FILTERed all-ports
// pinhole's element holds a port range (0-65535), and an IPv4 remote
// prefix given IPv4-mapped (/120) is the IPv4 /24.
func TestAdmitsAsKernelKey(t *testing.T) {
	a6, o6 := netip.MustParseAddr("2001:db8:1::2"), netip.MustParseAddr("2001:db8:1::3")
	r6, s6 := netip.MustParseAddr("2001:db8:99::5"), netip.MustParseAddr("2001:db8:98::5")
	i4, e4, o4 := netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("198.51.100.2")
	r4, s4 := netip.MustParseAddr("203.0.113.5"), netip.MustParseAddr("203.0.114.5")
	pfx := func(s string) netip.Prefix { return netip.MustParsePrefix(s) }
	for _, c := range []struct {
		name string
		p    Pinhole
	}{
		{"IPv6 port", Pinhole{Protocol: 6, InternalAddr: a6, InternalPort: 80}},
		{"IPv6 all ports", Pinhole{Protocol: 6, InternalAddr: a6}},
		{"IPv6 all protocols", Pinhole{InternalAddr: a6}},
		{"IPv6 port, FILTER /48", Pinhole{Protocol: 6, InternalAddr: a6, InternalPort: 80, RemotePrefix: pfx("2001:db8:99::/48")}},
		{"IPv6 port, PEER", Pinhole{Protocol: 6, InternalAddr: a6, InternalPort: 80, RemotePrefix: netip.PrefixFrom(r6, 128), RemotePort: 7000}},
		{"IPv6 all ports, FILTER /48 port 7000", Pinhole{Protocol: 6, InternalAddr: a6, RemotePrefix: pfx("2001:db8:99::/48"), RemotePort: 7000}},
		{"IPv6 all ports, FILTER /0", Pinhole{Protocol: 6, InternalAddr: a6, RemotePrefix: pfx("::/0")}},
		{"IPv6 all protocols, FILTER /48", Pinhole{InternalAddr: a6, RemotePrefix: pfx("2001:db8:99::/48")}},
		{"IPv6 redirect 443 to 80", Pinhole{Protocol: 6, InternalAddr: a6, InternalPort: 80, ExternalPort: 443}},
		{"IPv6 redirect, FILTER", Pinhole{Protocol: 6, InternalAddr: a6, InternalPort: 80, ExternalPort: 443, RemotePrefix: pfx("2001:db8:99::/48"), RemotePort: 7000}},
		{"IPv4 NAPT", Pinhole{Protocol: 6, InternalAddr: i4, InternalPort: 80, ExternalAddr: e4, ExternalPort: 8080}},
		{"IPv4 NAPT, FILTER /24 as mapped /120", Pinhole{Protocol: 6, InternalAddr: i4, InternalPort: 80, ExternalAddr: e4, ExternalPort: 8080, RemotePrefix: pfx("::ffff:203.0.113.0/120")}},
		{"IPv4 NAPT, PEER", Pinhole{Protocol: 17, InternalAddr: i4, InternalPort: 80, ExternalAddr: e4, ExternalPort: 8080, RemotePrefix: pfx("203.0.113.5/32"), RemotePort: 7000}},
	} {
		t.Run(c.name, func(t *testing.T) {
			n, err := c.p.normalize()
			if err != nil {
				t.Fatal(err)
			}
			k := kindOf(n)
			el := element(k, n)
			dsts, srcs := []netip.Addr{a6, o6}, []netip.Addr{r6, s6}
			if n.InternalAddr.Is4() {
				dsts, srcs = []netip.Addr{e4, o4, i4}, []netip.Addr{r4, s4}
			}
			admitted, total := 0, 0
			for _, proto := range []uint8{6, 17} {
				for _, d := range dsts {
					for _, dport := range []uint16{80, 443, 8080, 9} {
						for _, s := range srcs {
							for _, sport := range []uint16{7000, 7001} {
								src, dst := netip.AddrPortFrom(s, sport), netip.AddrPortFrom(d, dport)
								want := elementHas(k, el.Key, el.KeyEnd, packetKey(k, proto, src, dst))
								if got := c.p.Admits(proto, src, dst); got != want {
									t.Errorf("proto %d %v → %v: Admits %v, kernel element (%s) %v", proto, src, dst, got, specs[k].name, want)
								}
								total++
								if want {
									admitted++
								}
							}
						}
					}
				}
			}
			// Not vacuous: each pinhole admits some packets of the grid
			// and refuses others.
			if admitted == 0 || admitted == total {
				t.Fatalf("%d of %d packets admitted", admitted, total)
			}
		})
	}
}
