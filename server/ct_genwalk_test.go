package server

import (
	"bytes"
	"net"
	"net/netip"
	"slices"
	"testing"

	mdnl "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/ctnl"
	"github.com/pcpd/pcpd/internal/netlab"
)

// TestCtGenericDeleteEveryKind (root, h/genwalk): the generic walk's dump
// and deletes (ctDeleter.deleteMatching, kernels without CTA_FILTER: the
// whole table dumped, filtered here, deleted by reply tuple and id) end
// exactly the flows its filters match, of every kind a walk ends: an
// IPv4 NAPT mapping's DNAT-ed inbound flow and its SNAT-ed outbound one,
// an IPv6 port MAP's, an IPv6 all-protocols MAP's (wildcard); the flows
// of other ports, client ports and addresses stay. And each entry reads
// as netlink's own parser reads it (ctFlowOf: what the filters are asked
// about), zone, mark and labels included.
func TestCtGenericDeleteEveryKind(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "genwalkkinds")
	h, nh := nsHandles(t, ns)
	ap := netip.MustParseAddrPort
	type flow struct {
		proto                uint8
		src, dst, rsrc, rdst netip.AddrPort
		ended                bool
	}
	ext := netip.MustParseAddr("198.51.100.1")
	a, b := netip.MustParseAddr("2001:db8:1::2"), netip.MustParseAddr("2001:db8:1::3")
	flows := []flow{
		// NAPT 198.51.100.1:19000 → 10.100.0.2:9000 ended: inbound, SNAT-ed outbound.
		{protoTCP, ap("203.0.113.5:40000"), ap("198.51.100.1:19000"), ap("10.100.0.2:9000"), ap("203.0.113.5:40000"), true},
		{protoTCP, ap("10.100.0.2:9000"), ap("203.0.113.5:443"), ap("203.0.113.5:443"), ap("198.51.100.1:19000"), true},
		// Another mapping's, and another client port's outbound flow.
		{protoTCP, ap("203.0.113.5:40001"), ap("198.51.100.1:19001"), ap("10.100.0.2:9001"), ap("203.0.113.5:40001"), false},
		{protoTCP, ap("10.100.0.2:9002"), ap("203.0.113.5:443"), ap("203.0.113.5:443"), ap("198.51.100.1:19002"), false},
		// IPv6 TCP MAP a:80 ended; a:81 not.
		{protoTCP, ap("[2001:db8:ff::1]:40000"), ap("[2001:db8:1::2]:80"), ap("[2001:db8:1::2]:80"), ap("[2001:db8:ff::1]:40000"), true},
		{protoTCP, ap("[2001:db8:ff::1]:40000"), ap("[2001:db8:1::2]:81"), ap("[2001:db8:1::2]:81"), ap("[2001:db8:ff::1]:40000"), false},
		// IPv6 all-protocols MAP of b ended: its TCP and UDP flows.
		{protoTCP, ap("[2001:db8:ff::1]:40000"), ap("[2001:db8:1::3]:22"), ap("[2001:db8:1::3]:22"), ap("[2001:db8:ff::1]:40000"), true},
		{protoUDP, ap("[2001:db8:ff::1]:40000"), ap("[2001:db8:1::3]:53"), ap("[2001:db8:1::3]:53"), ap("[2001:db8:ff::1]:40000"), true},
		{protoUDP, ap("[2001:db8:ff::1]:40000"), ap("[2001:db8:1::4]:53"), ap("[2001:db8:1::4]:53"), ap("[2001:db8:ff::1]:40000"), false},
	}
	tuple := func(proto uint8, s, d netip.AddrPort) netlink.IPTuple {
		return netlink.IPTuple{Protocol: proto, SrcIP: net.IP(s.Addr().AsSlice()), SrcPort: s.Port(), DstIP: net.IP(d.Addr().AsSlice()), DstPort: d.Port()}
	}
	for i, f := range flows {
		fam := netlink.InetFamily(netlink.FAMILY_V6)
		if f.src.Addr().Is4() {
			fam = netlink.FAMILY_V4
		}
		fl := &netlink.ConntrackFlow{FamilyType: uint8(fam), TimeOut: 3600, Mark: uint32(i + 1),
			Forward: tuple(f.proto, f.src, f.dst), Reverse: tuple(f.proto, f.rsrc, f.rdst)}
		if err := nh.ConntrackCreate(netlink.ConntrackTable, fam, fl); err != nil {
			t.Fatalf("flow %d: %v", i, err)
		}
	}
	d, err := dialConntrack(int(h))
	if err != nil {
		t.Fatal(err)
	}
	defer d.close()
	// Read as netlink reads them.
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		want, err := nh.ConntrackTableList(netlink.ConntrackTable, netlink.InetFamily(fam))
		if err != nil {
			t.Fatal(err)
		}
		msgs, err := d.c.Execute(ctnl.Request(ctnl.MsgGet, mdnl.Request|mdnl.Dump, fam, nil))
		if err != nil {
			t.Fatal(err)
		}
		seen := 0
		for _, m := range msgs {
			var got netlink.ConntrackFlow
			if len(m.Data) < 4 {
				continue
			}
			if _, _, _, _, ok := ctFlowOf(&got, m.Data[0], m.Data[4:]); !ok {
				t.Errorf("family %d: an entry unread", fam)
				continue
			}
			k := slices.IndexFunc(want, func(w *netlink.ConntrackFlow) bool { return w.Mark == got.Mark })
			if k < 0 {
				t.Errorf("mark %d: not in netlink's dump", got.Mark)
				continue
			}
			w := want[k]
			same := func(x, y netlink.IPTuple) bool {
				return x.Protocol == y.Protocol && x.SrcIP.Equal(y.SrcIP) && x.DstIP.Equal(y.DstIP) && x.SrcPort == y.SrcPort && x.DstPort == y.DstPort
			}
			if got.FamilyType != w.FamilyType || !same(got.Forward, w.Forward) || !same(got.Reverse, w.Reverse) || got.Zone != w.Zone || !bytes.Equal(got.Labels, w.Labels) {
				t.Errorf("mark %d: read %+v %+v, netlink read %+v %+v", got.Mark, got.Forward, got.Reverse, w.Forward, w.Reverse)
			}
			seen++
		}
		if seen != len(want) {
			t.Errorf("family %d: %d entries read, netlink read %d", fam, seen, len(want))
		}
	}
	fs := []ctFilter{
		{v4: true, t: ctTarget{addr: ext, proto: protoTCP, port: 19000}},
		{v4: true, nat: true, t: ctTarget{addr: ext, proto: protoTCP, port: 19000}, src4: [4]byte{10, 100, 0, 2}, sport: 9000},
		{t: ctTarget{addr: a, proto: protoTCP, port: 80}},
		{t: ctTarget{addr: b}},
	}
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		var nfs []netlink.CustomConntrackFilter
		for _, f := range fs {
			if f.v4 == (fam == unix.AF_INET) {
				nfs = append(nfs, f.netlinkFilter())
			}
		}
		n, err := d.deleteMatching(fam, nfs...)
		want := 0
		for _, f := range flows {
			if f.ended && f.src.Addr().Is4() == (fam == unix.AF_INET) {
				want++
			}
		}
		if err != nil || n != want {
			t.Errorf("family %d: %d deleted, %v; want %d", fam, n, err, want)
		}
	}
	for i, f := range flows {
		fam := netlink.InetFamily(netlink.FAMILY_V6)
		if f.src.Addr().Is4() {
			fam = netlink.FAMILY_V4
		}
		left, err := nh.ConntrackTableList(netlink.ConntrackTable, fam)
		if err != nil {
			t.Fatal(err)
		}
		there := slices.ContainsFunc(left, func(fl *netlink.ConntrackFlow) bool { return fl.Mark == uint32(i+1) })
		if there == f.ended {
			t.Errorf("flow %d (%v → %v, reply %v → %v): there %v after the walk, ended %v", i, f.src, f.dst, f.rsrc, f.rdst, there, f.ended)
		}
	}
}
