package server

import (
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/pcpd/pcpd/store"
)

// TestCtInboundFilterDelivered (h/revprio): an ended mapping's inbound
// filter (appendCtFilters) ends the flows to its external endpoint that
// it delivered (reply source: its internal endpoint; an IPv6 pinhole's,
// untranslated, its external one), not those an admin's own DNAT of the
// same endpoint delivered elsewhere (ctFilter.delivered), in the generic
// walk's filter (netlinkFilter) as in the kernel-filtered walk's
// (deliveredBy; reliability TestNAPTBesideAdminPortForwardEndKeepsAdminFlows
// end to end). A retarget walk's (appendRetargetCuts) ends those of the
// endpoint's recorded former targets; every flow when it had several.
// Before, every filter matched the admin's flow: "admin's flow ... matched
// true, want false".
func TestCtInboundFilterDelivered(t *testing.T) {
	in4, ext4 := netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("198.51.100.1")
	in6 := netip.MustParseAddr("2001:db8::2")
	remote4, remote6 := netip.MustParseAddr("203.0.113.9"), netip.MustParseAddr("2001:db8:ff::9")
	admin4, admin6 := netip.AddrPortFrom(netip.MustParseAddr("10.100.2.7"), 80), netip.AddrPortFrom(netip.MustParseAddr("2001:db8:2::7"), 80)
	lease := func(in, ext netip.Addr, port, eport uint16) store.Lease {
		return store.Lease{Key: store.Key{Protocol: protoTCP, InternalAddr: in, InternalPort: port}, Kind: store.KindNATPMP, ExternalAddr: ext, ExternalPort: eport}
	}
	flow := func(remote netip.Addr, dst, to netip.AddrPort) *netlink.ConntrackFlow {
		f := &netlink.ConntrackFlow{}
		f.Forward = netlink.IPTuple{Protocol: protoTCP, SrcIP: net.IP(remote.AsSlice()), SrcPort: 7000, DstIP: net.IP(dst.Addr().AsSlice()), DstPort: dst.Port()}
		f.Reverse = netlink.IPTuple{Protocol: protoTCP, SrcIP: net.IP(to.Addr().AsSlice()), SrcPort: to.Port(), DstIP: net.IP(remote.AsSlice()), DstPort: 7000}
		return f
	}
	check := func(name string, f ctFilter, remote netip.Addr, to netip.AddrPort, want bool) {
		t.Helper()
		dst := f.t.dst()
		if got := f.netlinkFilter().MatchConntrackFlow(flow(remote, dst, to)); got != want {
			t.Errorf("%s: generic walk: the flow to %v delivered at %v matched %v, want %v", name, dst, to, got, want)
		}
		if got := deliveredBy([]ctFilter{f}, f.t, to); got != want {
			t.Errorf("%s: kernel-filtered walk: the flow to %v delivered at %v matched %v, want %v", name, dst, to, got, want)
		}
	}
	for _, c := range []struct {
		name   string
		l      store.Lease
		remote netip.Addr
		own    netip.AddrPort // where the mapping delivered its flows
		admin  netip.AddrPort
	}{
		{"IPv4 NAPT", lease(in4, ext4, 8080, 18080), remote4, netip.AddrPortFrom(in4, 8080), admin4},
		{"IPv6 redirect", lease(in6, in6, 8080, 18080), remote6, netip.AddrPortFrom(in6, 8080), admin6},
		{"IPv6 pinhole", lease(in6, in6, 8080, 8080), remote6, netip.AddrPortFrom(in6, 8080), admin6},
	} {
		f := appendCtFilters(nil, &c.l)[0]
		check(c.name+": its own flow", f, c.remote, c.own, true)
		check(c.name+": the admin's flow", f, c.remote, c.admin, false)
	}
	t4 := ctTarget{addr: ext4, proto: protoTCP, port: 18080}
	old := netip.AddrPortFrom(in4, 8080)
	fs := appendRetargetCuts(nil, t4, natPrior{to: old}, true, nil)
	if len(fs) != 1 {
		t.Fatalf("retarget filters: %+v", fs)
	}
	check("retarget: the former target's flow", fs[0], remote4, old, true)
	check("retarget: the admin's flow", fs[0], remote4, admin4, false)
	fs = appendRetargetCuts(nil, t4, natPrior{to: old, many: true}, true, nil)
	check("retarget of several former targets: the admin's flow", fs[0], remote4, admin4, true)
}
