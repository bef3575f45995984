package server

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
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

// TestE2EHostileRequestsLeaveKernelEmpty (review h/revreq; no defect
// found): a tunnel client's requests for what it does not own, for
// addresses never openable, and every malformed class on the way to the
// pinholes get their code and change nothing, in the kernel (every set of
// pcpd's table empty) and in the lease table. Another peer of the same
// interface owns 2001:db8:1:3::/64 and 10.100.0.77/32.
func TestE2EHostileRequestsLeaveKernelEmpty(t *testing.T) {
	l := newLab(t)
	other, _ := wgtypes.GeneratePrivateKey()
	other6, other4 := netip.MustParseAddr("2001:db8:1:3::10"), netip.MustParseAddr("10.100.0.77")
	err := l.wgc.ConfigureDevice(l.topo.HostLANIf, wgtypes.Config{Peers: []wgtypes.PeerConfig{{
		PublicKey: other.PublicKey(), AllowedIPs: []net.IPNet{
			{IP: other6.AsSlice(), Mask: net.CIDRMask(64, 128)}, {IP: other4.AsSlice(), Mask: net.CIDRMask(32, 32)}},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := netlab.Eventually(3*time.Second, func() error {
		if o, ok := l.wg.Lookup(other4); !ok || o.ID == "" {
			return fmt.Errorf("second peer not seen yet")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	c6, c4 := l.topo.ClientV6, l.topo.ClientV4
	opt, tpOf, filterOf, mapOf, peerOf := rawOpt, rawTP, rawFilter, rawMap, rawPeer
	rem6, rem4 := netip.AddrPortFrom(l.topo.InternetV6, 80), netip.AddrPortFrom(l.topo.InternetV4, 80)
	mapped := func(a netip.Addr) netip.Addr { return netip.AddrFrom16(a.As16()) }
	for _, tc := range []struct {
		name string
		from netip.Addr
		b    []byte
		want pcp.ResultCode
	}{
		{"TP other peer's /64", c6, mapOf(c6, pcp.ProtoTCP, 2222, tpOf(other6)), pcp.NotAuthorized},
		{"TP other peer's IPv4 from IPv6", c6, mapOf(c6, pcp.ProtoTCP, 2222, tpOf(other4)), pcp.NotAuthorized},
		{"TP other peer's IPv4 from IPv4", c4, mapOf(c4, pcp.ProtoTCP, 2222, tpOf(other4)), pcp.NotAuthorized},
		{"TP other peer, PEER", c6, peerOf(c6, rem6, tpOf(other6)), pcp.NotAuthorized},
		{"TP other peer, IPv4 PEER", c4, peerOf(c4, rem4, tpOf(other4)), pcp.NotAuthorized},
		{"TP other peer, FILTER", c6, mapOf(c6, pcp.ProtoTCP, 2222, tpOf(other6), filterOf(128, rem6.Addr())), pcp.NotAuthorized},
		{"TP host's tunnel IPv6", c6, mapOf(c6, pcp.ProtoTCP, 2222, tpOf(l.topo.HostTunnelV6)), pcp.NotAuthorized},
		{"TP host's tunnel IPv4", c6, mapOf(c6, pcp.ProtoTCP, 2222, tpOf(l.topo.HostTunnelV4)), pcp.NotAuthorized},
		{"TP host's public IPv4", c4, mapOf(c4, pcp.ProtoTCP, 2222, tpOf(l.topo.HostPublicV4)), pcp.NotAuthorized},
		{"TP link-local", c6, mapOf(c6, pcp.ProtoTCP, 2222, tpOf(netip.MustParseAddr("fe80::1"))), pcp.NotAuthorized},
		{"TP multicast", c6, mapOf(c6, pcp.ProtoTCP, 2222, tpOf(netip.MustParseAddr("ff02::1"))), pcp.NotAuthorized},
		{"TP loopback", c6, mapOf(c6, pcp.ProtoTCP, 2222, tpOf(netip.IPv6Loopback())), pcp.NotAuthorized},
		{"TP unspecified", c6, mapOf(c6, pcp.ProtoTCP, 2222, tpOf(netip.IPv6Unspecified())), pcp.NotAuthorized},
		{"TP IPv4 loopback", c4, mapOf(c4, pcp.ProtoTCP, 2222, tpOf(netip.MustParseAddr("127.0.0.1"))), pcp.NotAuthorized},
		{"TP IPv4 0.0.0.0", c4, mapOf(c4, pcp.ProtoTCP, 2222, tpOf(netip.IPv4Unspecified())), pcp.NotAuthorized},
		{"TP IPv4 broadcast", c4, mapOf(c4, pcp.ProtoTCP, 2222, tpOf(netip.MustParseAddr("255.255.255.255"))), pcp.NotAuthorized},
		{"TP IPv4 multicast", c4, mapOf(c4, pcp.ProtoTCP, 2222, tpOf(netip.MustParseAddr("224.0.0.1"))), pcp.NotAuthorized},
		{"TP IPv4-compatible form of own IPv4", c6, mapOf(c6, pcp.ProtoTCP, 2222, tpOf(netip.AddrFrom16([16]byte{12: 10, 13: 100, 14: 0, 15: 2}))), pcp.NotAuthorized},
		{"TP NAT64 form of own IPv4", c6, mapOf(c6, pcp.ProtoTCP, 2222, tpOf(netip.MustParseAddr("64:ff9b::10.100.0.2"))), pcp.NotAuthorized},
		{"TP own address (TP-01)", c6, mapOf(c6, pcp.ProtoTCP, 2222, tpOf(c6)), pcp.MalformedRequest},
		{"TP twice", c6, mapOf(c6, pcp.ProtoTCP, 2222, tpOf(c6.Next()), tpOf(c6.Next())), pcp.MalformedOption},
		{"TP short", c6, mapOf(c6, pcp.ProtoTCP, 2222, opt(1, 0, 0, 0, 0)), pcp.MalformedOption},
		{"client IP other peer's", c6, mapOf(other6, pcp.ProtoTCP, 2222), pcp.AddressMismatch},
		{"client IP mapped own IPv4 from IPv6", c6, mapOf(mapped(c4), pcp.ProtoTCP, 2222), pcp.AddressMismatch},
		{"all ports TCP (off)", c6, mapOf(c6, pcp.ProtoTCP, 0), pcp.UnsuppProtocol},
		{"all traffic", c6, mapOf(c6, 0, 0), pcp.UnsuppProtocol},
		{"protocol 0 port 443", c6, mapOf(c6, 0, 443), pcp.MalformedRequest},
		{"SCTP", c6, mapOf(c6, 132, 2222), pcp.UnsuppProtocol},
		{"PEER remote loopback", c6, peerOf(c6, netip.AddrPortFrom(netip.IPv6Loopback(), 80)), pcp.MalformedRequest},
		{"PEER remote mapped for IPv6", c6, peerOf(c6, rem4), pcp.MalformedRequest},
		{"PEER remote multicast", c4, peerOf(c4, netip.MustParseAddrPort("224.0.0.1:80")), pcp.MalformedRequest},
		{"PEER + PREFER_FAILURE", c6, peerOf(c6, rem6, opt(2)), pcp.MalformedRequest},
		{"PEER + FILTER", c6, peerOf(c6, rem6, filterOf(128, rem6.Addr())), pcp.MalformedOption},
		{"FILTER mapped /95", c4, mapOf(c4, pcp.ProtoTCP, 2222, filterOf(95, mapped(rem4.Addr()))), pcp.MalformedOption},
		{"FILTER /129", c6, mapOf(c6, pcp.ProtoTCP, 2222, filterOf(129, rem6.Addr())), pcp.MalformedOption},
		{"FILTER other family", c6, mapOf(c6, pcp.ProtoTCP, 2222, filterOf(128, mapped(rem4.Addr()))), pcp.MalformedOption},
		{"FILTER past the end", c6, append(mapOf(c6, pcp.ProtoTCP, 2222), 3, 0, 0, 0x40, 0, 0, 0, 0), pcp.MalformedOption},
		{"unknown mandatory option", c6, mapOf(c6, pcp.ProtoTCP, 2222, opt(4, 0, 0, 0, 0)), pcp.UnsuppOption},
		{"unknown mandatory after a valid FILTER", c6, mapOf(c6, pcp.ProtoTCP, 2222, filterOf(128, rem6.Addr()), opt(127)), pcp.UnsuppOption},
		{"PREFER_FAILURE twice", c6, mapOf(c6, pcp.ProtoTCP, 2222, opt(2), opt(2)), pcp.MalformedOption},
		{"PREFER_FAILURE port 0", c6, mapOf(c6, pcp.ProtoTCP, 0, opt(2)), pcp.UnsuppProtocol},
	} {
		t.Run(tc.name, func(t *testing.T) { l.refusedLeavesNothing(t, tc.from, tc.b, tc.want) })
	}
}

// refusedLeavesNothing sends b from the client's address from (port 0:
// any) to pcpd's address of its family and checks that it is answered
// want, in no more octets than the request's padded to 4, and that pcpd
// holds no lease and its table no element.
func (l *lab) refusedLeavesNothing(t *testing.T, from netip.Addr, b []byte, want pcp.ResultCode) {
	t.Helper()
	dst := l.server6()
	if from.Is4() {
		dst = l.server4()
	}
	out, err := l.exchange(netip.AddrPortFrom(from, 0), dst, b)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) < 4 || pcp.ResultCode(out[3]) != want {
		t.Errorf("reply % x, want result %v", out[:min(len(out), 4)], want)
	}
	if len(out) > (len(b)+3)&^3 {
		t.Errorf("reply of %d octets to a request of %d", len(out), len(b))
	}
	if ls := l.srv.Leases(); len(ls) != 0 {
		t.Errorf("leases: %+v", ls)
	}
	if es := l.kernelHoles(); len(es) != 0 {
		t.Errorf("kernel entries: %+v", es)
	}
}

// rawOpt is a PCP option of code with data, padded to 4 octets.
func rawOpt(code byte, data ...byte) []byte {
	o := append([]byte{code, 0, byte(len(data) >> 8), byte(len(data))}, data...)
	for len(o)%4 != 0 {
		o = append(o, 0)
	}
	return o
}

// rawTP is a THIRD_PARTY option naming a; rawFilter a FILTER of a/plen.
func rawTP(a netip.Addr) []byte { b := a.As16(); return rawOpt(1, b[:]...) }

func rawFilter(plen byte, a netip.Addr) []byte {
	b := a.As16()
	return rawOpt(3, append([]byte{0, plen, 0, 0}, b[:]...)...)
}

// rawMap is a one-hour MAP of client's port (external port suggested the
// same) with opts appended; rawPeer a one-hour TCP PEER of client's port
// 2226 to remote.
func rawMap(client netip.Addr, proto pcp.Protocol, port uint16, opts ...[]byte) []byte {
	return appendOpts(pcp.AppendRequest(nil, mapReq(client, proto, port, port, time.Hour, 3)), opts)
}

func rawPeer(client netip.Addr, remote netip.AddrPort, opts ...[]byte) []byte {
	return appendOpts(pcp.AppendRequest(nil, peerReq(client, pcp.ProtoTCP, 2226, remote, time.Hour, 3)), opts)
}

func appendOpts(b []byte, opts [][]byte) []byte {
	for _, o := range opts {
		b = append(b, o...)
	}
	return b
}

// TestE2EMappedSourceStaticLAN: the IPv4-mapped source of
// TestE2EMappedSourceIsNotIPv4Owner needs no WireGuard peer at all where
// ownership is static (a home router serving its LAN): any LAN host
// sends IPv6 from ::ffff:a.b.c.d, nothing checks it (the kernel owner
// meter's reverse-path rule covers owned IPv6 prefixes only), and pcpd
// took it as the IPv4 address's owner's. Here client "c6" owns the LAN
// client's IPv6 prefix, "c4" its IPv4 address; "c6"'s MAP from c4's
// mapped address must make no lease and no NAPT mapping.
func TestE2EMappedSourceStaticLAN(t *testing.T) {
	l := newStaticLab(t, func(topo *netlab.Topology) (map[string][]netip.Prefix, policy.Config) {
		return map[string][]netip.Prefix{"c6": {topo.ClientPrefix6}, "c4": {topo.ClientPrefix4}}, policy.Config{}
	})
	topo := l.topo

	dst := netip.AddrPortFrom(topo.HostTunnelV6, Port)
	mapped := netip.AddrFrom16(topo.ClientV4.As16())
	b := pcp.AppendRequest(nil, mapReq(topo.ClientV4, pcp.ProtoTCP, 2222, 2222, time.Hour, 7))
	for range 3 {
		if err := topo.Client.Do(func() error { return sendRaw6(mapped, dst, 40000, b) }); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	if ls := l.srv.Leases(); len(ls) != 0 {
		t.Errorf("a LAN host's MAP from %v made leases: %+v", mapped, ls)
	}
	if es := l.kernelHoles(); len(es) != 0 {
		t.Errorf("kernel entries after a LAN host's MAP from %v: %+v", mapped, es)
	}
	if n := counterValue(t, l.srv.lis.es.counter(l.srv.m, counterKey{res: "bad-source"})); n < 3 {
		t.Errorf("dropped{reason=\"bad-source\"} %v, want the 3 sent", n)
	}
}

// newStaticLab is newLab without WireGuard: the client on a LAN (lan0 /
// eth0), static ownership and the policy's rules as setup(topo) says.
func newStaticLab(t *testing.T, setup func(*netlab.Topology) (map[string][]netip.Prefix, policy.Config)) *lab {
	netlab.RequireRoot(t)
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	ring := newLogRing(logRingLines)
	l := &lab{t: t, topo: topo, dir: t.TempDir(), log: labLogger(t, ring), ring: ring}
	conn, err := topo.Host.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	if l.fw, err = pinhole.New(conn, pinhole.Config{}); err != nil {
		t.Fatal(err)
	}
	clients, pcfg := setup(topo)
	own, err := policy.NewStatic(clients)
	if err != nil {
		t.Fatal(err)
	}
	if l.pol, err = policy.New(pcfg, own); err != nil {
		t.Fatal(err)
	}
	ns, err := topo.Host.Handle()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	l.cfg.Interfaces, l.cfg.NetNS, l.cfg.ExternalIPv4 = []string{topo.HostLANIf}, ns, topo.HostPublicV4
	l.start()
	t.Cleanup(l.stop)
	return l
}
