package server

import (
	"net"
	"net/netip"
	"testing"
	"time"

	mdnl "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"go.uber.org/zap"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
)

// TestCtDumpPortFilteredForOneTarget (root; review h/revnatleft): a
// retake of one IPv4 endpoint walks its inbound filter and the SNAT
// filters of its old targets (appendSNATCuts): two SNAT filters, one
// target. The namespace holds 200 outbound flows SNAT-ed to other ports
// of the external address (a masquerade's). The kernel must filter the
// SNAT dump by the target's port too (as for a lone filter), not return
// every flow SNAT-ed to the address: before, with more than one filter
// in the group it filtered by address only, and the retake, under the
// engine lock, copied and parsed the whole NAT table's outbound flows.
// The old targets' flows end either way.
func TestCtDumpPortFilteredForOneTarget(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "revnatleftdump")
	h, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	nh, err := netlink.NewHandleAt(h)
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	ext4 := netip.MustParseAddr("198.51.100.7")
	own, err := policy.NewStatic(map[string][]netip.Prefix{"t": {netip.MustParsePrefix("10.0.0.0/8")}})
	if err != nil {
		t.Fatal(err)
	}
	pol, err := policy.New(policy.Config{MinLifetime: time.Minute}, own)
	if err != nil {
		t.Fatal(err)
	}
	fw, st := servertest.NewFirewall(time.Now), servertest.NewStore()
	s, err := New(Config{ExternalIPv4: ext4, NetNS: h, RateLimit: 1e12, RateBurst: 1 << 30}, Deps{Firewall: fw, Store: st, State: st.State(), Policy: pol}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	flow := func(src, dst, rsrc, rdst netip.AddrPort) *netlink.ConntrackFlow {
		f := &netlink.ConntrackFlow{FamilyType: netlink.FAMILY_V4, TimeOut: 3600}
		f.Forward = netlink.IPTuple{Protocol: protoTCP, SrcIP: net.IP(src.Addr().AsSlice()), SrcPort: src.Port(), DstIP: net.IP(dst.Addr().AsSlice()), DstPort: dst.Port()}
		f.Reverse = netlink.IPTuple{Protocol: protoTCP, SrcIP: net.IP(rsrc.Addr().AsSlice()), SrcPort: rsrc.Port(), DstIP: net.IP(rdst.Addr().AsSlice()), DstPort: rdst.Port()}
		return f
	}
	rem := netip.MustParseAddrPort("203.0.113.1:443")
	for j := range 200 {
		in := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 200, byte(j >> 8), byte(j)}), 30000)
		if err := nh.ConntrackCreate(netlink.ConntrackTable, netlink.FAMILY_V4, flow(in, rem, rem, netip.AddrPortFrom(ext4, uint16(20000+j)))); err != nil {
			t.Fatal(err)
		}
	}
	tg := ctTarget{addr: ext4, proto: protoTCP, port: 5000}
	x, y := netip.MustParseAddrPort("10.0.0.2:80"), netip.MustParseAddrPort("10.0.0.3:80")
	for _, old := range []netip.AddrPort{x, y} {
		if err := nh.ConntrackCreate(netlink.ConntrackTable, netlink.FAMILY_V4, flow(old, rem, rem, netip.AddrPortFrom(ext4, tg.port))); err == nil {
			break // one flow: the two tuples' replies would clash
		} else {
			t.Fatal(err)
		}
	}
	var got int
	s.ctDumpFault = func(ms []mdnl.Message, err error) ([]mdnl.Message, error) {
		got = max(got, len(ms))
		return ms, err
	}
	fs := []ctFilter{
		{v4: true, t: tg, nat: true, src4: x.Addr().As4(), sport: x.Port()},
		{v4: true, t: tg, nat: true, src4: y.Addr().As4(), sport: y.Port()},
	}
	left, err := s.walkConntrack(fs, nil)
	if err != nil || len(left) > 0 {
		t.Fatalf("walk: %v (left %v)", err, left)
	}
	if got > 3 { // the flow, and the dump's end
		t.Errorf("the SNAT dump for one target returned %d messages (the address's every SNAT-ed flow)", got)
	}
	flows, err := nh.ConntrackTableList(netlink.ConntrackTable, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range flows {
		if f.Reverse.DstPort == tg.port {
			t.Errorf("the old target's flow is left: %s", f)
		}
	}
	if len(flows) != 200 {
		t.Errorf("%d flows left, want the 200 others", len(flows))
	}
}
