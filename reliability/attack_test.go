package reliability

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
)

// attackCase is one hostile datagram and what must come of it.
type attackCase struct {
	name string
	src  netip.Addr
	pkt  []byte
	want int // result code, wantNotSuccess (any refusal) or wantDrop (never reaches pcpd)
}

// sendAttacks sends each attack from its source in the client namespace
// and fails the test on any SUCCESS, a missing answer, an answer to a
// packet that should never have passed WireGuard, or another code than
// the one named.
func (l *lab) sendAttacks(t *testing.T, attacks []attackCase) {
	t.Helper()
	for _, a := range attacks {
		conn, err := socketIn(l.topo.Client, a.src)
		if err != nil {
			t.Fatal(err)
		}
		wait := 3 * time.Second
		if a.want == wantDrop {
			wait = 2 * time.Second
		}
		reply, err := rawExchange(conn, l.serverFor(a.src), a.pkt, wait)
		conn.Close()
		if err != nil {
			t.Fatal(err)
		}
		got := resultOf(reply)
		switch {
		case a.want == wantDrop && reply != nil:
			t.Errorf("%s: answered (result %d): the source should never have passed WireGuard", a.name, got)
		case a.want == wantDrop:
		case reply == nil:
			t.Errorf("%s: no answer (want a refusal)", a.name)
		case got == 0:
			t.Errorf("%s: SUCCESS", a.name)
		case a.want >= 0 && got != a.want:
			t.Errorf("%s: result %d, want %d", a.name, got, a.want)
		}
	}
}

// kernelDiff lists the pinholes that appeared in and vanished from the
// kernel since before.
func kernelDiff(before, after map[pinhole.Pinhole]bool) (appeared, vanished []pinhole.Pinhole) {
	for p := range after {
		if !before[p] {
			appeared = append(appeared, p)
		}
	}
	for p := range before {
		if !after[p] {
			vanished = append(vanished, p)
		}
	}
	return appeared, vanished
}

// mapNonce is a MAP request with a fixed nonce (n), THIRD_PARTY target
// tp if valid.
func mapNonce(src netip.Addr, port uint16, life time.Duration, n byte, tp netip.Addr) []byte {
	r := pcp.NewMap(src, pcp.ProtoTCP, port, life)
	r.Map.Nonce = pcp.Nonce{n}
	b := pcp.AppendRequest(nil, r)
	if tp.IsValid() {
		b = cat(b, tpOpt(tp))
	}
	return b
}

// TestOwnershipAttacksWireGuardPeers: ownership attacks that need a
// second WireGuard peer and AllowedIPs that change while pcpd runs
// (issue 9 "ownership attacks", LIFE-05; h/attack). The client (peer A)
// holds 2001:db8:1:2::/64 and 10.100.0.2/32; a second peer B (no
// endpoint) is given a more-specific 2001:db8:1:2:ff00::/72 inside A's
// /64 and 10.100.0.3/32, as an operator carving a part of a peer's prefix
// out for another peer does. WireGuard's longest match then routes that
// part to B, and pcpd must agree:
//
//   - A's THIRD_PARTY lease inside the carved-out part, made before B
//     appeared, is revoked from the kernel; one A asks for just after B
//     appeared is refused (NOT_AUTHORIZED, no kernel element): a
//     THIRD_PARTY target is judged by a WireGuard read no older than
//     --wireguard-fresh (0 here: a read begun after the request, so the
//     test does not depend on when pcpd last read; 1 s by default).
//     Before h/tpfresh pcpd judged it by its last periodic read (every
//     5 s) and granted it: its pinhole lived until that read, 4.8 s;
//   - A cannot open, renew (same nonce), delete, or PEER-open anything
//     there by THIRD_PARTY (from its IPv6 or IPv4 address), nor name it
//     as its Client IP; A's packets from B's addresses (IPv6 and IPv4,
//     NAT-PMP included) never pass WireGuard; 0 pinholes change;
//   - the rest of A's /64 stays A's (control: a THIRD_PARTY MAP there
//     succeeds, exactly one pinhole appears);
//   - A's AllowedIPs then shrink to its IPv4 /32: its IPv6 lease is
//     revoked from the kernel, and from its IPv4 address A can neither
//     renew it nor open its former IPv6 address by THIRD_PARTY;
//   - A (peer) removed: its NAT-PMP mapping's DNAT element is revoked.
func TestOwnershipAttacksWireGuardPeers(t *testing.T) {
	l := newLab(t, labOptions{wireGuard: true, extra: []string{"--wireguard-fresh", "0"}})
	l.start()
	cli, cli4 := l.topo.ClientV6, l.topo.ClientV4
	nested := netip.MustParsePrefix("2001:db8:1:2:ff00::/72")
	inNested := netip.MustParseAddr("2001:db8:1:2:ff00::5")
	b4 := netip.MustParseAddr("10.100.0.3")
	wg, err := wgctrl.New()
	if err != nil {
		t.Fatal(err)
	}
	defer wg.Close()

	// Before B: A owns the whole /64, so a THIRD_PARTY MAP into the part
	// B will get is granted (and a NAT-PMP mapping kept for the end).
	conn := l.clientSocket(cli)
	if r, err := rawExchange(conn, l.server6(), mapNonce(cli, 9100, time.Hour, 7, inNested), 3*time.Second); err != nil || resultOf(r) != 0 {
		t.Fatalf("THIRD_PARTY MAP inside A's /64 before B: %x %v", r, err)
	}
	if !l.kernelHas(inNested, pcp.ProtoTCP, 9100) {
		t.Fatal("no kernel element for A's THIRD_PARTY lease")
	}
	napt := l.mustPMP(l.pcpClient(cli4), pcp.PMPOpMapTCP, 9200, time.Hour)

	bKey, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	err = wg.ConfigureDevice(l.topo.HostLANIf, wgtypes.Config{Peers: []wgtypes.PeerConfig{{
		PublicKey:  bKey.PublicKey(),
		AllowedIPs: []net.IPNet{ipnet(nested), ipnet(netip.PrefixFrom(b4, 32))},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	// At once, before pcpd's next periodic WireGuard read (every 5 s; a
	// lookup that finds A the owner triggers none): a THIRD_PARTY MAP
	// there is judged by a read begun after it (--wireguard-fresh 0),
	// which sees B: refused, nothing in the kernel (h/tpfresh; before,
	// the old view granted it).
	r, err := rawExchange(conn, l.server6(), mapNonce(cli, 9111, time.Hour, 17, inNested), 3*time.Second)
	if err != nil || r == nil {
		t.Fatalf("THIRD_PARTY MAP just after B appeared: %x %v", r, err)
	}
	if got := resultOf(r); got != int(pcp.NotAuthorized) || l.kernelHas(inNested, pcp.ProtoTCP, 9111) {
		t.Fatalf("THIRD_PARTY MAP into B's new prefix just after B appeared: result %d (want %d, NOT_AUTHORIZED), kernel element %v (want none)",
			got, pcp.NotAuthorized, l.kernelHas(inNested, pcp.ProtoTCP, 9111))
	}
	took, ok := waitFor(15*time.Second, func() bool { return !l.kernelHas(inNested, pcp.ProtoTCP, 9100) })
	if !ok {
		t.Fatalf("A's lease inside B's more-specific prefix still in the kernel 15 s after B got it; log:\n%s", l.log.tail(10))
	}
	t.Logf("A's lease inside B's new /72 revoked from the kernel %v after B appeared; the MAP sent just after B appeared was refused",
		took.Round(time.Millisecond))
	for _, ls := range l.leases() {
		if ls.InternalAddress == inNested {
			t.Fatalf("kernel element gone but the lease is still listed: %+v", ls)
		}
	}

	// B's IPv4 address as a local one of the client namespace, so that
	// its socket may send from it (IPv4 ignores IP_FREEBIND on output).
	l.topo.Client.MustRun(t, "ip", "addr", "add", b4.String()+"/32", "dev", "lo")
	before := kernelSet(l.kernel())
	remote := netip.AddrPortFrom(l.topo.InternetV6, 443)
	peerTP := cat(pcp.AppendRequest(nil, pcp.NewPeer(cli, pcp.ProtoTCP, 9101, remote, time.Hour)), tpOpt(inNested))
	l.sendAttacks(t, []attackCase{
		{"THIRD_PARTY into B's more-specific prefix", cli, mapNonce(cli, 9102, time.Hour, 8, inNested), int(pcp.NotAuthorized)},
		{"renewal of the revoked lease (same nonce, THIRD_PARTY)", cli, mapNonce(cli, 9100, time.Hour, 7, inNested), int(pcp.NotAuthorized)},
		{"THIRD_PARTY delete inside B's prefix", cli, mapNonce(cli, 9100, 0, 7, inNested), int(pcp.NotAuthorized)},
		{"PEER with THIRD_PARTY inside B's prefix", cli, peerTP, int(pcp.NotAuthorized)},
		{"THIRD_PARTY inside B's prefix from A's IPv4", cli4, mapNonce(cli4, 9103, time.Hour, 9, inNested), int(pcp.NotAuthorized)},
		{"THIRD_PARTY B's IPv4 from A's IPv4", cli4, mapNonce(cli4, 9104, time.Hour, 10, b4), int(pcp.NotAuthorized)},
		{"Client IP = B's address", cli, setClientIP(mapNonce(cli, 9105, time.Hour, 11, netip.Addr{}), inNested), int(pcp.AddressMismatch)},
		{"source spoofed from B's IPv6 through the tunnel", inNested, mapNonce(inNested, 9106, time.Hour, 12, netip.Addr{}), wantDrop},
		{"source spoofed from B's IPv4 through the tunnel (PCP)", b4, mapNonce(b4, 9107, time.Hour, 13, netip.Addr{}), wantDrop},
		{"source spoofed from B's IPv4 through the tunnel (NAT-PMP)", b4, []byte{0, 2, 0, 0, 0x23, 0xcc, 0x23, 0xcc, 0, 0, 0x0e, 0x10}, wantDrop},
	})
	if appeared, vanished := kernelDiff(before, kernelSet(l.kernel())); len(appeared)+len(vanished) > 0 {
		t.Fatalf("kernel changed by refused attacks: appeared %v, vanished %v", appeared, vanished)
	}

	// Control: the rest of the /64 is still A's.
	own := netip.MustParseAddr("2001:db8:1:2::77")
	if r, err := rawExchange(conn, l.server6(), mapNonce(cli, 9108, time.Hour, 14, own), 3*time.Second); err != nil || resultOf(r) != 0 {
		t.Fatalf("control: THIRD_PARTY MAP for A's own address outside B's prefix: %x %v", r, err)
	}
	if appeared, _ := kernelDiff(before, kernelSet(l.kernel())); len(appeared) != 1 || appeared[0].InternalAddr != own || appeared[0].InternalPort != 9108 {
		t.Fatalf("control: kernel comparison saw %v, want exactly tcp [%s]:9108", appeared, own)
	}

	// A's AllowedIPs shrink to its IPv4 /32.
	err = wg.ConfigureDevice(l.topo.HostLANIf, wgtypes.Config{Peers: []wgtypes.PeerConfig{{
		PublicKey: l.topo.ClientKey.PublicKey(), UpdateOnly: true, ReplaceAllowedIPs: true,
		AllowedIPs: []net.IPNet{ipnet(l.topo.ClientPrefix4)},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	if took, ok = waitFor(15*time.Second, func() bool { return !l.kernelHas(own, pcp.ProtoTCP, 9108) }); !ok {
		t.Fatalf("A's IPv6 lease still in the kernel 15 s after its AllowedIPs lost the /64; log:\n%s", l.log.tail(10))
	}
	t.Logf("A's IPv6 lease revoked from the kernel %v after its AllowedIPs shrank", took.Round(time.Millisecond))
	before = kernelSet(l.kernel())
	l.sendAttacks(t, []attackCase{
		{"after the shrink: renewal of the revoked IPv6 lease by THIRD_PARTY from IPv4", cli4, mapNonce(cli4, 9108, time.Hour, 14, own), int(pcp.NotAuthorized)},
		{"after the shrink: THIRD_PARTY A's former IPv6 address from IPv4", cli4, mapNonce(cli4, 9109, time.Hour, 15, cli), int(pcp.NotAuthorized)},
		{"after the shrink: from A's former IPv6 address", cli, mapNonce(cli, 9110, time.Hour, 16, netip.Addr{}), wantDrop},
	})
	if appeared, vanished := kernelDiff(before, kernelSet(l.kernel())); len(appeared)+len(vanished) > 0 {
		t.Fatalf("kernel changed by refused attacks after the shrink: appeared %v, vanished %v", appeared, vanished)
	}

	// A removed: its NAT-PMP mapping (DNAT to 10.100.0.2) goes.
	napt4 := func() bool {
		for _, e := range l.kernel() {
			if e.Pinhole.InternalAddr == cli4 && e.Pinhole.ExternalPort == napt.Port() {
				return true
			}
		}
		return false
	}
	if !napt4() {
		t.Fatalf("no kernel element for A's NAT-PMP mapping %v", napt)
	}
	err = wg.ConfigureDevice(l.topo.HostLANIf, wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: l.topo.ClientKey.PublicKey(), Remove: true}}})
	if err != nil {
		t.Fatal(err)
	}
	if took, ok = waitFor(15*time.Second, func() bool { return !napt4() }); !ok {
		t.Fatalf("removed peer's NAT-PMP mapping still in the kernel after 15 s; log:\n%s", l.log.tail(10))
	}
	t.Logf("removed peer's NAT-PMP DNAT element revoked %v after the removal", took.Round(time.Millisecond))
	if ls := l.leases(); len(ls) != 0 {
		t.Fatalf("leases left after every owner lost its addresses: %+v", ls)
	}
}

// acceptCounter listens on addr in ns and counts the connections it
// accepts (each greeted as netlab.StartTCPServer does, then closed).
func acceptCounter(t *testing.T, ns *netlab.NS, addr string) *atomic.Int64 {
	t.Helper()
	ln, err := ns.ListenTCP(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var n atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			io.WriteString(c, netlab.Greeting+"\n") // what DialTCP waits for
			c.Close()
		}
	}()
	return &n
}

// TestNAPTBesideAdminPortForwardReserved: the host's admin forwards a
// public IPv4 port with a DNAT rule of their own (a port forward, a
// container runtime publishing a port without a proxy socket, CNI
// hostPort): no socket on the host holds the port, so pcpd's host port
// scan cannot see it, and without --reserved-ports a client asking for
// it is granted it; with the admin's table loaded before pcpd (the usual
// boot order) the client's DNAT then wins and takes the forward's new
// connections (h/attack, README --reserved-ports). Listed in
// --reserved-ports, the port is never granted: a NAT-PMP request
// suggesting it gets another port, the kernel holds no element on it, and
// a connection from the internet still reaches the admin's backend.
func TestNAPTBesideAdminPortForwardReserved(t *testing.T) {
	const port = 40080
	l := newLab(t, labOptions{extra: []string{"--reserved-ports", fmt.Sprint(port)}})
	public := netip.AddrPortFrom(l.topo.HostPublicV4, port).String()
	backend := netip.AddrPortFrom(netip.MustParseAddr("10.100.2.7"), 80) // nobody's address, answered in the client namespace
	l.topo.Host.MustRun(t, "nft", "add table ip admin")
	l.topo.Host.MustRun(t, "nft", "add chain ip admin pre { type nat hook prerouting priority dstnat; }")
	l.topo.Host.MustRun(t, "nft", "add rule ip admin pre ip daddr "+l.topo.HostPublicV4.String()+" tcp dport "+fmt.Sprint(port)+" dnat to "+backend.String())
	l.start() // after the admin's table, as at boot
	admin := acceptCounter(t, l.topo.Client, backend.String())
	client := acceptCounter(t, l.topo.Client, netip.AddrPortFrom(l.topo.ClientV4, port).String())
	if err := l.topo.Internet.DialTCP(public, time.Second); err != nil || admin.Load() != 1 {
		t.Fatalf("the admin's port forward before any mapping: %v, backend accepted %d", err, admin.Load())
	}
	got := l.mustPMP(l.pcpClient(l.topo.ClientV4), pcp.PMPOpMapTCP, port, time.Hour)
	for _, e := range l.kernel() {
		if e.Pinhole.ExternalAddr == l.topo.HostPublicV4 && e.Pinhole.ExternalPort == port {
			t.Fatalf("kernel maps the reserved, admin-forwarded port: %v", e.Pinhole)
		}
	}
	if err := l.topo.Internet.DialTCP(public, time.Second); err != nil {
		t.Fatalf("the admin's port forward after the mapping: %v", err)
	}
	if got.Port() == port || client.Load() != 0 || admin.Load() != 2 {
		t.Fatalf("the client took the admin's forwarded port %d: granted %v; after the mapping the admin backend accepted %d, the client %d",
			port, got, admin.Load()-1, client.Load())
	}
	t.Logf("NAT-PMP TCP suggesting the reserved, admin-forwarded %d: granted %v; the forward kept its traffic", port, got)
}

// TestOwnershipAttacksMoreForms: address forms and endpoint collisions
// TestOwnershipAttacksSEC02 leaves out (h/attack), in the static lab. The
// host's lan0 holds 2001:db8:1:2::1/64 inside client cli's /64, so its
// subnet-router anycast address 2001:db8:1:2:: (which a forwarding Linux
// host answers for) is cli's by ownership and refused only as the host's
// own: by THIRD_PARTY for MAP, PEER and an all-ports MAP. A suggested
// external address or port another client holds opens nothing of
// theirs: cli's IPv6 MAP suggesting the victim's address and mapped port
// is granted on cli's own address (choice (d)), and cli's NAT-PMP request
// suggesting the flood client's external port gets another. The kernel
// then holds exactly cli's two new elements; the others' are unchanged.
func TestOwnershipAttacksMoreForms(t *testing.T) {
	l := newLab(t, labOptions{})
	l.start()
	cli, cli4 := l.topo.ClientV6, l.topo.ClientV4
	l.mustMap(l.pcpClient(victimAddr6), victimAddr6, pcp.ProtoTCP, servicePort, time.Hour)
	flood4 := netip.MustParseAddr("10.100.1.5")
	floodExt := l.mustPMP(l.pcpClient(flood4), pcp.PMPOpMapTCP, 9400, time.Hour)
	before := kernelSet(l.kernel())

	anycast := netip.PrefixFrom(l.topo.HostTunnelV6, 64).Masked().Addr()
	remote := netip.AddrPortFrom(l.topo.InternetV6, 443)
	allPorts := pcp.NewMap(cli, pcp.ProtoTCP, 0, time.Hour)
	l.sendAttacks(t, []attackCase{
		{"THIRD_PARTY the host's subnet-router anycast " + anycast.String(), cli, mapNonce(cli, 9300, time.Hour, 1, anycast), int(pcp.NotAuthorized)},
		{"PEER with THIRD_PARTY the subnet-router anycast", cli, cat(pcp.AppendRequest(nil, pcp.NewPeer(cli, pcp.ProtoTCP, 9301, remote, time.Hour)), tpOpt(anycast)), int(pcp.NotAuthorized)},
		{"all-ports MAP with THIRD_PARTY the subnet-router anycast", cli, cat(pcp.AppendRequest(nil, allPorts), tpOpt(anycast)), int(pcp.NotAuthorized)},
		{"THIRD_PARTY delete of the subnet-router anycast", cli, mapNonce(cli, 9300, 0, 1, anycast), wantNotSuccess},
	})
	if appeared, vanished := kernelDiff(before, kernelSet(l.kernel())); len(appeared)+len(vanished) > 0 {
		t.Fatalf("kernel changed by refused attacks: appeared %v, vanished %v", appeared, vanished)
	}

	// Suggestions naming another client's endpoint.
	r := pcp.NewMap(cli, pcp.ProtoTCP, 9302, time.Hour)
	r.Map.ExternalAddr, r.Map.ExternalPort = victimAddr6, servicePort
	resp, err := do(l.pcpClient(cli), r)
	if err != nil || resp.Result != pcp.Success || resp.Map.ExternalAddr != cli {
		t.Fatalf("MAP suggesting the victim's [%s]:%d: %+v %v", victimAddr6, servicePort, resp, err)
	}
	got := l.mustPMPSuggest(l.pcpClient(cli4), pcp.PMPOpMapTCP, 9401, floodExt.Port(), time.Hour)
	if got == floodExt {
		t.Fatalf("NAT-PMP suggesting the flood client's %v was granted it", floodExt)
	}
	appeared, vanished := kernelDiff(before, kernelSet(l.kernel()))
	if len(vanished) != 0 || len(appeared) != 2 {
		t.Fatalf("kernel after the suggestions: appeared %v, vanished %v; want only cli's two", appeared, vanished)
	}
	for _, p := range appeared {
		if p.InternalAddr != cli && p.InternalAddr != cli4 {
			t.Fatalf("a suggestion opened %v, not cli's", p)
		}
		if p.InternalAddr == cli && (p.ExternalAddr.IsValid() && p.ExternalAddr != cli) {
			t.Fatalf("cli's IPv6 MAP installed on another external address: %v", p)
		}
	}
	t.Logf("4 anycast attacks refused, 0 pinholes changed; suggestions of the victim's [%s]:%d and the flood client's %v gave cli [%s]:%d and %v",
		victimAddr6, servicePort, floodExt, resp.Map.ExternalAddr, resp.Map.ExternalPort, got)
}
