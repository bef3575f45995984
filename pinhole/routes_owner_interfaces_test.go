package pinhole_test

import (
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestNetlinkRoutesSameDstOtherTable (review of 2026-12-03): NetlinkRoutes
// compares the routes found at a prefix's two ends by destination only.
// A policy rule sending the upper half of the prefix to another table that
// holds a route of the same destination through another interface makes
// both ends "the same route", and Interfaces answers the first end's
// interface although half of the prefix is routed elsewhere: datagrams
// from that half arriving on the first interface then pass unlooked where
// the fib lookup dropped them. Want: no interfaces (or the union that
// really routes every address; never one that misses half of p).
func TestNetlinkRoutesSameDstOtherTable(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	h := topo.Host
	for _, r := range [][]string{
		{"-4", "route", "add", "10.70.0.0/16", "via", topo.ClientV4.String(), "dev", topo.HostLANIf},
		{"-4", "route", "add", "table", "100", "10.70.0.0/16", "via", topo.InternetV4.String(), "dev", topo.HostWANIf},
		{"-4", "rule", "add", "pref", "100", "to", "10.70.128.0/17", "lookup", "100"},
		{"-6", "route", "add", "2001:db8:70::/48", "via", topo.ClientV6.String(), "dev", topo.HostLANIf},
		{"-6", "route", "add", "table", "100", "2001:db8:70::/48", "via", topo.InternetV6.String(), "dev", topo.HostWANIf},
		{"-6", "rule", "add", "pref", "100", "to", "2001:db8:70:8000::/49", "lookup", "100"},
	} {
		h.MustRun(t, append([]string{"ip"}, r...)...)
	}
	lan, wan := ifIndex(t, h, topo.HostLANIf), ifIndex(t, h, topo.HostWANIf)
	r := nsRoutes(t, h)
	for _, tc := range []struct {
		pfx, upper string // upper: an address of the half routed through the WAN
	}{{"10.70.0.0/16", "10.70.200.1"}, {"2001:db8:70::/48", "2001:db8:70:ff00::1"}} {
		t.Run(tc.pfx, func(t *testing.T) {
			out := h.MustRun(t, "ip", "route", "get", tc.upper)
			if !strings.Contains(out, "dev "+topo.HostWANIf) {
				t.Fatalf("setup: %s not routed through the WAN: %s", tc.upper, out)
			}
			got, err := r.Interfaces(netip.MustParsePrefix(tc.pfx))
			if err != nil {
				t.Fatal(err)
			}
			if len(got) > 0 && !slices.Contains(got, wan) {
				t.Errorf("Interfaces(%s) = %v (LAN %d, WAN %d): %s is routed through the WAN, so a datagram from it arriving on the LAN would pass unlooked", tc.pfx, got, lan, wan, tc.upper)
			}
		})
	}
}

// routeModes are the two ways a test's backend learns the owners' routes:
// none (every owned datagram looked up, the rule before rpfset) and
// NetlinkRoutes in the host namespace. A spoof must be dropped in both.
type routeMode struct {
	name   string
	routes func(*testing.T, *netlab.NS) pinhole.Routes
}

// backend is a fresh topology's host backend learning routes this way,
// metering port 5351 and serving the tunnel addresses.
func (m routeMode) backend(t *testing.T) (*netlab.Topology, *pinhole.Backend) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	b := meteredTunnel(t, topo, m.routes(t, topo.Host))
	return topo, b
}

var routeModes = []routeMode{
	{"lookup on every datagram (before rpfset)", func(*testing.T, *netlab.NS) pinhole.Routes { return noRoutes{} }},
	{"NetlinkRoutes", func(t *testing.T, ns *netlab.NS) pinhole.Routes { return nsRoutes(t, ns) }},
}

// TestOwnerMeterSourcePolicyRouting (review of 2026-12-03): the kernel's fib lookup of
// the reverse-path rule is made from the datagram's destination (pcpd's
// served address: fib saddr sets the flow's source to the packet's daddr),
// so source-based policy rules ("from <served address> lookup 100", the
// usual multi-homing recipe) take part in it; NetlinkRoutes asks without a
// source and sees the main table. Host: main routes the owner's prefix by
// the default route (WAN); the served address's table routes it through
// the LAN, where its requests come in. The old rule (no interfaces:
// noRoutes) drops the owner's sources spoofed from the WAN; the new one
// passes them unlooked (iif != "wan0"), charges the owner and delivers them
// to pcpd's socket. Each row must drop the WAN spoofs.
func TestOwnerMeterSourcePolicyRouting(t *testing.T) {
	for _, tc := range routeModes {
		t.Run(tc.name, func(t *testing.T) {
			topo, b := tc.backend(t)
			pfx6, pfx4 := netip.MustParsePrefix("2001:db8:77::/48"), netip.MustParsePrefix("10.77.0.0/16")
			src6, src4 := netip.MustParseAddr("2001:db8:77::1"), netip.MustParseAddr("10.77.0.1")
			for _, a := range []netip.Addr{src6, src4} {
				p := netip.PrefixFrom(a, a.BitLen()).String()
				topo.Client.MustRun(t, "ip", "addr", "add", p, "dev", topo.ClientIf, "nodad")
				topo.Internet.MustRun(t, "ip", "addr", "add", p, "dev", "lo", "nodad")
			}
			topo.Internet.MustRun(t, "ip", "route", "add", topo.HostTunnelV4.String()+"/32", "via", topo.HostPublicV4.String())
			for _, r := range [][]string{
				{"-6", "route", "replace", "default", "via", topo.InternetV6.String(), "dev", topo.HostWANIf},
				{"-4", "route", "replace", "default", "via", topo.InternetV4.String(), "dev", topo.HostWANIf},
				{"-6", "route", "add", "table", "100", pfx6.String(), "via", topo.ClientV6.String(), "dev", topo.HostLANIf},
				{"-4", "route", "add", "table", "100", pfx4.String(), "via", topo.ClientV4.String(), "dev", topo.HostLANIf},
				{"-6", "rule", "add", "pref", "100", "from", topo.HostTunnelV6.String(), "lookup", "100"},
				{"-4", "rule", "add", "pref", "100", "from", topo.HostTunnelV4.String(), "lookup", "100"},
				// Inbound (DNAT'd) traffic to the owner finds it too.
				{"-6", "rule", "add", "pref", "101", "iif", topo.HostWANIf, "lookup", "100"},
				{"-4", "rule", "add", "pref", "101", "iif", topo.HostWANIf, "lookup", "100"},
			} {
				topo.Host.MustRun(t, append([]string{"ip"}, r...)...)
			}
			owners := []pinhole.Owner{{ID: "static:policy", Prefixes: []netip.Prefix{pfx6, pfx4}}}
			if err := b.SetOwners(owners, nil); err != nil {
				t.Fatal(err)
			}
			chain := pinhole.OwnerChains(owners)["static:policy"]
			t.Logf("owner chain:\n%s", nftList(t, topo.Host, "chain", "inet", "pcpd", chain))
			dst6, dst4 := netip.AddrPortFrom(topo.HostTunnelV6, 5351), netip.AddrPortFrom(topo.HostTunnelV4, 5351)
			srv6, srv4 := countUDP(t, topo.Host, dst6), countUDP(t, topo.Host, dst4)
			const n = 20
			for _, from := range []struct {
				side string
				ns   *netlab.NS
				want int64
			}{{"LAN", topo.Client, n}, {"WAN", topo.Internet, 0}} {
				for _, f := range []struct {
					src netip.Addr
					dst netip.AddrPort
					srv *udpCounter
				}{{src6, dst6, srv6}, {src4, dst4, srv4}} {
					got, _ := sendRoundRobin(t, from.ns, []netip.Addr{f.src}, f.dst, n, f.srv)
					if got != from.want {
						t.Errorf("%d from %v on the %s: socket got %d, want %d", n, f.src, from.side, got, from.want)
					}
				}
			}
			if d := b.MeterDrops(); d.ReversePath != 0 {
				t.Logf("reverse-path drops before Healthy read: %d", d.ReversePath)
			}
			_ = b.Healthy()
			t.Logf("MeterDrops %+v (want %s)", b.MeterDrops(), strconv.Itoa(2*n)+" reverse-path")
		})
	}
}

// fakeRoutes answers every prefix with ifs, or fails with err.
type fakeRoutes struct {
	ifs []int
	err error
}

func (f *fakeRoutes) Interfaces(netip.Prefix) ([]int, error) { return f.ifs, f.err }

// TestFollowRoutesFailsClosed (review of 2026-12-03): when the route lookups start
// failing (the kept netlink socket broken, ENOBUFS, ...), FollowRoutes
// keeps each owner's last interfaces, for as long as the failures last:
// the interface the owner's prefix has left (here: the LAN, now nobody's)
// keeps passing the owner's sources unlooked, with only a warning logged
// every 5 s. SetOwners, on the same failure, drops the interfaces (every
// datagram meets the lookup): FollowRoutes should fail closed the same way.
func TestFollowRoutesFailsClosed(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	lan := ifIndex(t, topo.Host, topo.HostLANIf)
	routes := &fakeRoutes{ifs: []int{lan}}
	b := meteredTunnel(t, topo, routes)
	owners := []pinhole.Owner{{ID: "static:x", Prefixes: []netip.Prefix{netip.MustParsePrefix("10.77.0.0/16")}}}
	if err := b.SetOwners(owners, nil); err != nil {
		t.Fatal(err)
	}
	chain := pinhole.OwnerChains(owners)["static:x"]
	skip := `iif != "` + topo.HostLANIf + `"`
	if out := nftList(t, topo.Host, "chain", "inet", "pcpd", chain); !strings.Contains(out, skip) {
		t.Fatalf("setup: no %s in\n%s", skip, out)
	}
	routes.ifs, routes.err = nil, errSimulated
	if err := b.FollowRoutes(); err == nil {
		t.Fatal("FollowRoutes: no error")
	}
	if out := nftList(t, topo.Host, "chain", "inet", "pcpd", chain); strings.Contains(out, skip) {
		t.Errorf("after failed lookups the owner chain still passes the LAN unlooked (fails open):\n%s", out)
	}
}

var errSimulated = errorString("simulated netlink failure")

type errorString string

func (e errorString) Error() string { return string(e) }

// TestSetOwnersKeepsBucketOnRouteChange (review of 2026-12-03): FollowRoutes
// replaces only the reverse-path rule when an owner's interfaces change
// (the limit rule, and its bucket, stay), but SetOwners, called with the
// same owners after a route change FollowRoutes has not seen yet (or when
// one lookup fails transiently), finds the chain "not intact" against the
// new interfaces and rewrites it whole: the owner's bucket is reset (a
// flooding owner gets a fresh burst) and the chain's counters restart.
func TestSetOwnersKeepsBucketOnRouteChange(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	lan, wan := ifIndex(t, topo.Host, topo.HostLANIf), ifIndex(t, topo.Host, topo.HostWANIf)
	for _, tc := range []struct {
		name string
		ifs  []int
		err  error
	}{{"route moved", []int{wan}, nil}, {"one failed lookup", nil, errSimulated}} {
		t.Run(tc.name, func(t *testing.T) {
			routes := &fakeRoutes{ifs: []int{lan}}
			b := meteredTunnel(t, topo, routes)
			owners := []pinhole.Owner{{ID: "static:" + tc.name, Prefixes: []netip.Prefix{netip.MustParsePrefix("10.77.0.0/16")}}}
			if err := b.SetOwners(owners, nil); err != nil {
				t.Fatal(err)
			}
			chain := pinhole.OwnerChains(owners)["static:"+tc.name]
			limit := func() string {
				out := topo.Host.MustRun(t, "nft", "-a", "list", "chain", "inet", "pcpd", chain)
				for _, l := range strings.Split(out, "\n") {
					if strings.Contains(l, "limit rate") {
						return l[strings.LastIndex(l, "handle"):]
					}
				}
				t.Fatalf("no limit rule:\n%s", out)
				return ""
			}
			before := limit()
			routes.ifs, routes.err = tc.ifs, tc.err
			if err := b.SetOwners(owners, nil); err != nil {
				t.Fatal(err)
			}
			if after := limit(); after != before {
				t.Errorf("SetOwners with the same owners rewrote the limit rule (%s, was %s): the owner's bucket was reset", after, before)
			}
		})
	}
}

// TestOwnerMeterCarvedOut (review of 2026-12-03; documented in ownerRules, here
// measured, then fixed): a more specific route inside the owner's prefix onto
// another LAN of the host's was not seen by NetlinkRoutes, so a host on the owner's
// LAN spoofing a source of that other LAN passes unlooked, is charged to
// the owner and reaches pcpd (which, README: "the only check of IPv6
// source addresses the kernel makes" for static ownership, then maps for
// a host on the other LAN). Before rpfset the lookup dropped it.
func TestOwnerMeterCarvedOut(t *testing.T) {
	for _, tc := range routeModes {
		t.Run(tc.name, func(t *testing.T) {
			topo, b := tc.backend(t)
			lan2 := netlab.NewNS(t, "lan2")
			if err := netlab.Veth(topo.Host, "lan2", lan2, "eth0"); err != nil {
				t.Fatal(err)
			}
			pfx6 := netip.MustParsePrefix("2001:db8:77::/48")
			carved := netip.MustParseAddr("2001:db8:77:5::1")
			topo.Host.MustRun(t, "ip", "-6", "route", "add", pfx6.String(), "via", topo.ClientV6.String(), "dev", topo.HostLANIf)
			topo.Host.MustRun(t, "ip", "-6", "route", "add", "2001:db8:77:5::/64", "dev", "lan2")
			topo.Client.MustRun(t, "ip", "addr", "add", carved.String()+"/128", "dev", topo.ClientIf, "nodad")
			owners := []pinhole.Owner{{ID: "static:carved", Prefixes: []netip.Prefix{pfx6}}}
			if err := b.SetOwners(owners, nil); err != nil {
				t.Fatal(err)
			}
			dst6 := netip.AddrPortFrom(topo.HostTunnelV6, 5351)
			srv6 := countUDP(t, topo.Host, dst6)
			const n = 20
			if got, _ := sendRoundRobin(t, topo.Client, []netip.Addr{carved}, dst6, n, srv6); got != 0 {
				t.Errorf("%d from %v (routed through lan2) on the owner's LAN: socket got %d, want 0", n, carved, got)
			}
		})
	}
}
