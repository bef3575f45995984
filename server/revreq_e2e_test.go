package server

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
)

// TestE2EMappedSourceIsNotIPv4Owner (review h/revreq, HIGH): the kernel
// delivers an IPv6 datagram whose source is IPv4-mapped (::ffff:a.b.c.d)
// to an IPv6 socket, and WireGuard lets a peer send one when its
// AllowedIPs cover ::ffff:0:0/96 (a full-tunnel ::/0 peer; policy ignores
// such prefixes for ownership, WireGuard does not). The reader unmapped
// the source to a.b.c.d, so pcpd took the request as the IPv4 address's
// owner's, a peer of the same interface: the attacker opened a NAPT
// mapping to that client's IPv4 port from the Internet, and deleted its
// NAT-PMP mappings. Every attack here must change nothing: no lease but
// the victim's own, the victim's NAT-PMP mapping still in napt4, its
// IPv4 service unreachable on the attacker's ports.
func TestE2EMappedSourceIsNotIPv4Owner(t *testing.T) {
	l := newLab(t)
	victim4 := l.topo.ClientV4
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(victim4, 2222).String())
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(victim4, 2223).String())
	own := l.pmpMap(t, 2223, 2223, time.Hour) // the victim's own mapping
	if !l.reach(own) {
		t.Fatalf("the victim's own NAT-PMP mapping %v passes no traffic", own)
	}

	// A full-tunnel peer of the victim's own interface.
	serverAddr := netip.MustParseAddr("2001:db8:2::1")
	att := l.fullTunnelAttacker(t, "rrq", l.topo.HostLANIf, l.topo.HostWGPort, netip.MustParsePrefix("10.97.0.0/30"), serverAddr)
	dst := netip.AddrPortFrom(serverAddr, Port)
	if err := netlab.Eventually(5*time.Second, func() error {
		for _, ap := range l.srv.Status().Listen {
			if ap == dst {
				return nil
			}
		}
		return fmt.Errorf("pcpd does not serve %v yet", dst)
	}); err != nil {
		t.Fatal(err)
	}
	mapped := netip.AddrFrom16(victim4.As16())

	peer := pcp.NewPeer(victim4, pcp.ProtoTCP, 2225, netip.AddrPortFrom(l.topo.InternetV4, 80), time.Hour)
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"PCP MAP IPv4 NAPT", pcp.AppendRequest(nil, mapReq(victim4, pcp.ProtoTCP, 2222, 2222, time.Hour, 7))},
		{"NAT-PMP map", pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: pcp.PMPOpMapTCP, InternalPort: 2222, SuggestedExternalPort: 2224, Lifetime: time.Hour})},
		{"NAT-PMP delete all TCP", pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: pcp.PMPOpMapTCP})},
		{"PCP MAP delete", pcp.AppendRequest(nil, mapReq(victim4, pcp.ProtoTCP, 2223, 0, 0, 9))},
		{"PCP PEER", pcp.AppendRequest(nil, peer)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for range 3 {
				if err := att.Do(func() error { return sendRaw6(mapped, dst, 40000, tc.b) }); err != nil {
					t.Fatal(err)
				}
				time.Sleep(100 * time.Millisecond)
			}
			time.Sleep(300 * time.Millisecond)
			if ls := l.srv.Leases(); len(ls) != 1 || ls[0].ExternalPort != own.Port() {
				t.Errorf("leases after a request from %v: %+v, want the victim's own only", mapped, ls)
			}
			for _, p := range []uint16{2222, 2224, 2225} {
				if l.napt4Has(t, l.topo.HostPublicV4, p) {
					t.Errorf("napt4 holds %v:%d after a request from %v", l.topo.HostPublicV4, p, mapped)
				}
			}
			if !l.napt4Has(t, l.topo.HostPublicV4, own.Port()) {
				t.Errorf("the victim's own mapping %v gone from napt4 after a request from %v", own, mapped)
			}
		})
	}
	// Not vacuous: the attacker's datagrams reached pcpd's socket.
	if n := counterValue(t, l.srv.lis.es.counter(l.srv.m, counterKey{res: "bad-source"})); n < 15 {
		t.Errorf("pcpd_requests_dropped_total{reason=\"bad-source\"} %v, want the 15 sent", n)
	}
	if l.reach(netip.AddrPortFrom(l.topo.HostPublicV4, 2222)) {
		t.Errorf("the victim's %v:2222 reachable from the Internet after the attacker's requests", victim4)
	}
}

// sendRaw6 sends payload in one UDP datagram from src:sport to dst, src
// written into the IPv6 header as given (a raw IPv6 socket: the kernel
// checks no source), routed as dst is.
func sendRaw6(src netip.Addr, dst netip.AddrPort, sport uint16, payload []byte) error {
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_RAW, unix.IPPROTO_RAW)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	s16, d16 := src.As16(), dst.Addr().As16()
	udp := make([]byte, 8+len(payload))
	binary.BigEndian.PutUint16(udp[0:], sport)
	binary.BigEndian.PutUint16(udp[2:], dst.Port())
	binary.BigEndian.PutUint16(udp[4:], uint16(len(udp)))
	copy(udp[8:], payload)
	// The checksum over the pseudo-header (RFC 8200 §8.1) and the datagram.
	var sum uint32
	add := func(b []byte) {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(b[i])<<8 | uint32(b[i+1])
		}
		if len(b)%2 == 1 {
			sum += uint32(b[len(b)-1]) << 8
		}
	}
	add(s16[:])
	add(d16[:])
	add([]byte{0, 0, byte(len(udp) >> 8), byte(len(udp)), 0, 0, 0, unix.IPPROTO_UDP})
	add(udp)
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	c := ^uint16(sum)
	if c == 0 {
		c = 0xffff
	}
	binary.BigEndian.PutUint16(udp[6:], c)
	pkt := make([]byte, 40, 40+len(udp))
	pkt[0] = 6 << 4
	binary.BigEndian.PutUint16(pkt[4:], uint16(len(udp)))
	pkt[6], pkt[7] = unix.IPPROTO_UDP, 64
	copy(pkt[8:24], s16[:])
	copy(pkt[24:40], d16[:])
	pkt = append(pkt, udp...)
	return unix.Sendto(fd, pkt, 0, &unix.SockaddrInet6{Addr: d16})
}

// TestSockaddrPortRefusesMapped: the reader's decoding of a source the
// kernel wrote refuses an IPv4-mapped one on an IPv6 socket (see
// TestE2EMappedSourceIsNotIPv4Owner) and keeps the others as they were.
func TestSockaddrPortRefusesMapped(t *testing.T) {
	c := &udpConn{iface: "wg0", index: 7, local: netip.MustParseAddrPort("[2001:db8::1]:5351")}
	for _, tc := range []struct {
		src   string
		scope uint32
		want  string // "" = refused
	}{
		{"::ffff:10.0.0.5", 0, ""},
		{"::ffff:0.0.0.0", 0, ""},
		{"::ffff:10.0.0.5", 7, ""},
		{"2001:db8::5", 0, "[2001:db8::5]:40000"},
		{"::a00:5", 0, "[::a00:5]:40000"}, // IPv4-compatible: plain IPv6, no owner
		{"64:ff9b::a00:5", 0, "[64:ff9b::a00:5]:40000"},
		{"fe80::5", 7, "[fe80::5%wg0]:40000"},
	} {
		sa := unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: netip.MustParseAddr(tc.src).As16(), Scope_id: tc.scope}
		putPort(&sa.Port, 40000)
		got, ok := sockaddrPort(&sa, unix.SizeofSockaddrInet6, c)
		if s := got.String(); ok != (tc.want != "") || ok && s != tc.want {
			t.Errorf("%s: %v %v, want %q", tc.src, got, ok, tc.want)
		}
	}
	sa4 := unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: [4]byte{10, 0, 0, 5}}
	putPort(&sa4.Port, 40000)
	if got, ok := sockaddrPort((*unix.RawSockaddrInet6)(unsafe.Pointer(&sa4)), unix.SizeofSockaddrInet4, c); !ok || got.String() != "10.0.0.5:40000" {
		t.Errorf("IPv4 socket's source: %v %v", got, ok)
	}
}
