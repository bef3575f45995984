package server

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// nat64 is a's IPv4 address under the /96 translation prefix p (RFC 6052
// §2.2: the last 32 bits).
func nat64(p netip.Prefix, a netip.Addr) netip.Addr {
	b, v4 := p.Addr().As16(), a.As4()
	copy(b[12:], v4[:])
	return netip.AddrFrom16(b)
}

// TestE2ETranslatedTargetsStaticLAN (h/pol64): an operator gave a LAN
// client the NAT64 prefixes (64:ff9b::/96, RFC 6052; 64:ff9b:1::/48, RFC
// 8215) with its own /64, and names the network's own translation prefix
// (--nat64-prefix) inside that /64. An address there stands for an IPv4
// host, someone else's through the translator: MAP and PEER from such an
// address, and THIRD_PARTY naming one (the client's own IPv4, the
// Internet host's), are answered NOT_AUTHORIZED (TP-03, never openable),
// and neither pcpd nor the kernel holds anything. The client's own
// address is then mapped (the ownership alone would have allowed them).
func TestE2ETranslatedTargetsStaticLAN(t *testing.T) {
	wkp, local := netip.MustParsePrefix("64:ff9b::/96"), netip.MustParsePrefix("64:ff9b:1::/96")
	var nsp netip.Prefix // the operator's, inside the client's /64
	l := newStaticLab(t, func(topo *netlab.Topology) (map[string][]netip.Prefix, policy.Config) {
		b := topo.ClientPrefix6.Addr().As16()
		b[11] = 0x64
		nsp = netip.PrefixFrom(netip.AddrFrom16(b), 96)
		return map[string][]netip.Prefix{
			"c6": {topo.ClientPrefix6, wkp, netip.MustParsePrefix("64:ff9b:1::/48")},
			"c4": {topo.ClientPrefix4},
		}, policy.Config{TranslationPrefixes: []netip.Prefix{nsp}}
	})
	c6, c4 := l.topo.ClientV6, l.topo.ClientV4
	n64, nspSrc := nat64(wkp, c4), nat64(nsp, c4)
	// The client sends from them too; the host routes the NAT64 prefix's
	// replies back over the LAN.
	for _, a := range []netip.Addr{n64, nspSrc} {
		l.topo.Client.MustRun(t, "ip", "addr", "add", a.String()+"/128", "dev", l.topo.ClientIf, "nodad")
	}
	l.topo.Host.MustRun(t, "ip", "-6", "route", "add", wkp.String(), "dev", l.topo.HostLANIf)
	rem6 := netip.AddrPortFrom(l.topo.InternetV6, 80)
	for _, tc := range []struct {
		name string
		from netip.Addr
		b    []byte
	}{
		{"MAP from a NAT64 address", n64, rawMap(n64, pcp.ProtoTCP, 2222)},
		{"PEER from a NAT64 address", n64, rawPeer(n64, rem6)},
		{"MAP from the operator's NSP", nspSrc, rawMap(nspSrc, pcp.ProtoTCP, 2222)},
		{"TP NAT64 form of own IPv4", c6, rawMap(c6, pcp.ProtoTCP, 2222, rawTP(n64))},
		{"TP NAT64 form of the Internet's IPv4", c6, rawMap(c6, pcp.ProtoTCP, 2222, rawTP(nat64(wkp, l.topo.InternetV4)))},
		{"TP NAT64, UDP", c6, rawMap(c6, pcp.ProtoUDP, 2222, rawTP(n64))},
		{"TP NAT64 with FILTER", c6, rawMap(c6, pcp.ProtoTCP, 2222, rawTP(n64), rawFilter(128, rem6.Addr()))},
		{"TP local-use prefix", c6, rawMap(c6, pcp.ProtoTCP, 2222, rawTP(nat64(local, c4)))},
		{"TP operator's NSP", c6, rawMap(c6, pcp.ProtoTCP, 2222, rawTP(nspSrc))},
		{"PEER TP NAT64", c6, rawPeer(c6, rem6, rawTP(n64))},
		{"PEER TP operator's NSP", c6, rawPeer(c6, rem6, rawTP(nspSrc))},
	} {
		t.Run(tc.name, func(t *testing.T) { l.refusedLeavesNothing(t, tc.from, tc.b, pcp.NotAuthorized) })
	}
	// Not vacuous: the same client's own address is mapped.
	if r := l.pcp(mapReq(c6, pcp.ProtoTCP, 2222, 2222, time.Hour, 9)); r.Result != pcp.Success {
		t.Errorf("MAP of the client's own %v: %v", c6, r.Result)
	}
	if es := l.kernelHoles(); len(es) != 1 {
		t.Errorf("kernel entries after the client's own MAP: %+v", es)
	}
}

// TestE2ETranslatedTargetsWireGuard (h/pol64): the same through
// WireGuard, the NAT64 prefixes in the client peer's AllowedIPs (a peer
// that is the site's NAT64 gateway): THIRD_PARTY MAP and PEER for
// addresses there are NOT_AUTHORIZED and leave the kernel empty; the
// peer still owns them (the prefixes are not holes).
func TestE2ETranslatedTargetsWireGuard(t *testing.T) {
	l := newLab(t)
	wkp, local := netip.MustParsePrefix("64:ff9b::/96"), netip.MustParsePrefix("64:ff9b:1::/48")
	err := l.wgc.ConfigureDevice(l.topo.HostLANIf, wgtypes.Config{Peers: []wgtypes.PeerConfig{{
		PublicKey: l.topo.ClientKey.PublicKey(), UpdateOnly: true, AllowedIPs: []net.IPNet{
			{IP: wkp.Addr().AsSlice(), Mask: net.CIDRMask(96, 128)}, {IP: local.Addr().AsSlice(), Mask: net.CIDRMask(48, 128)}},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	c6, c4 := l.topo.ClientV6, l.topo.ClientV4
	n64 := nat64(wkp, c4)
	if err := netlab.Eventually(3*time.Second, func() error {
		if o, ok := l.wg.Lookup(n64); !ok || o.ID != mustOwner(t, l, c6) {
			return fmt.Errorf("%v not the client's yet", n64)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	rem6 := netip.AddrPortFrom(l.topo.InternetV6, 80)
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"TP NAT64 form of own IPv4", rawMap(c6, pcp.ProtoTCP, 2222, rawTP(n64))},
		{"TP NAT64 form of the Internet's IPv4", rawMap(c6, pcp.ProtoTCP, 2222, rawTP(nat64(wkp, l.topo.InternetV4)))},
		{"TP local-use prefix", rawMap(c6, pcp.ProtoTCP, 2222, rawTP(netip.MustParseAddr("64:ff9b:1:5::a64:2")))},
		{"PEER TP NAT64", rawPeer(c6, rem6, rawTP(n64))},
	} {
		t.Run(tc.name, func(t *testing.T) { l.refusedLeavesNothing(t, c6, tc.b, pcp.NotAuthorized) })
	}
}

// mustOwner is the owner of a, which must have one.
func mustOwner(t *testing.T, l *lab, a netip.Addr) policy.OwnerID {
	o, ok := l.wg.Lookup(a)
	if !ok {
		t.Fatalf("%v has no owner", a)
	}
	return o.ID
}
