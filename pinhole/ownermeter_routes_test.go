package pinhole_test

import (
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestOwnerMeterFollowsRoutes (RELIABILITY.md runs V): the owner chain's
// reverse-path rule passes the datagrams arriving on the interfaces the
// host routes the owner's prefixes through without a route lookup, and
// drops, and counts as spoofed, the owner's sources arriving on any other
// (the WAN, another LAN the host serves); when the route moves, FollowRoutes (pcpd: before each
// Healthy, every TamperInterval) moves the rule with it, in place (the
// limit rule, and so the owner's bucket, stays), and Healthy accepts the
// result; a multipath route passes every next hop's interface. Each step
// sends from the same owned addresses on the LAN and on the WAN, both
// families.
func TestOwnerMeterFollowsRoutes(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	// The owner's rate (2 × 200/s, burst 800) far above what is sent:
	// only the reverse-path rule may drop.
	b := meteredTunnel(t, topo, nil)
	pfx6, pfx4 := netip.MustParsePrefix("2001:db8:77::/48"), netip.MustParsePrefix("10.77.0.0/16")
	src6, src4 := netip.MustParseAddr("2001:db8:77::1"), netip.MustParseAddr("10.77.0.1")
	for _, a := range []netip.Addr{src6, src4} {
		p := netip.PrefixFrom(a, a.BitLen()).String()
		topo.Client.MustRun(t, "ip", "addr", "add", p, "dev", topo.ClientIf, "nodad")
		topo.Internet.MustRun(t, "ip", "addr", "add", p, "dev", "lo", "nodad")
	}
	topo.Internet.MustRun(t, "ip", "route", "add", topo.HostTunnelV4.String()+"/32", "via", topo.HostPublicV4.String())
	// Another LAN of the host's, whose hosts claim the owner's addresses.
	lan2 := netlab.NewNS(t, "lan2")
	if err := netlab.Veth(topo.Host, "lan2", lan2, "eth0"); err != nil {
		t.Fatal(err)
	}
	topo.Host.MustRun(t, "ip", "addr", "add", "2001:db8:2::1/64", "dev", "lan2", "nodad")
	topo.Host.MustRun(t, "ip", "addr", "add", "10.102.0.1/24", "dev", "lan2")
	lan2.MustRun(t, "ip", "addr", "add", "2001:db8:2::2/64", "dev", "eth0", "nodad")
	lan2.MustRun(t, "ip", "addr", "add", "10.102.0.2/24", "dev", "eth0")
	lan2.MustRun(t, "ip", "-6", "route", "add", "default", "via", "2001:db8:2::1")
	lan2.MustRun(t, "ip", "route", "add", "default", "via", "10.102.0.1")
	// pcpd serves the other LAN too (else its datagrams skip the meter).
	setServed(t, b, []string{topo.HostLANIf, topo.HostWANIf, "lan2"}, topo.HostTunnelV6, topo.HostTunnelV4)
	for _, a := range []netip.Addr{src6, src4} {
		lan2.MustRun(t, "ip", "addr", "add", netip.PrefixFrom(a, a.BitLen()).String(), "dev", "lo", "nodad")
	}
	route := func(via ...string) {
		t.Helper()
		for _, fam := range []struct {
			flag string
			pfx  netip.Prefix
			lan  netip.Addr
			wan  netip.Addr
		}{{"-6", pfx6, topo.ClientV6, topo.InternetV6}, {"-4", pfx4, topo.ClientV4, topo.InternetV4}} {
			args := []string{"ip", fam.flag, "route", "replace", fam.pfx.String()}
			for _, v := range via {
				gw, dev := fam.lan, topo.HostLANIf
				if v == "wan" {
					gw, dev = fam.wan, topo.HostWANIf
				}
				if len(via) > 1 {
					args = append(args, "nexthop")
				}
				args = append(args, "via", gw.String(), "dev", dev)
			}
			topo.Host.MustRun(t, args...)
		}
	}
	route("lan")
	owners := []pinhole.Owner{{ID: "static:routed", Prefixes: []netip.Prefix{pfx6, pfx4}}}
	if err := b.SetOwners(owners, nil); err != nil {
		t.Fatal(err)
	}
	chain := pinhole.OwnerChains(owners)["static:routed"]
	dst6, dst4 := netip.AddrPortFrom(topo.HostTunnelV6, 5351), netip.AddrPortFrom(topo.HostTunnelV4, 5351)
	srv6, srv4 := countUDP(t, topo.Host, dst6), countUDP(t, topo.Host, dst4)
	limitHandle := regexp.MustCompile(`limit rate over [^\n]* # handle (\d+)`)
	handle := func() string {
		m := limitHandle.FindStringSubmatch(topo.Host.MustRun(t, "nft", "-a", "list", "chain", "inet", "pcpd", chain))
		if m == nil {
			t.Fatalf("no limit rule in %s", chain)
		}
		return m[1]
	}
	firstHandle := handle()

	var dropped uint64
	const n = 20
	for _, step := range []struct {
		name    string
		via     []string // the route's next hops; nil: unchanged
		follow  bool     // FollowRoutes first
		ifs     []string // the interfaces the rule passes unlooked, in index order
		lan     bool     // the owner's sources get through from the LAN
		wan     bool     // and from the WAN
		healthy bool     // Healthy accepts the chain
	}{
		{"routed through the LAN", nil, false, []string{topo.HostLANIf}, true, false, true},
		// Not followed yet: the LAN still passes unlooked (the lag,
		// bounded by pcpd's tamper interval), the WAN meets the lookup,
		// which passes it now.
		{"moved to the WAN, not followed", []string{"wan"}, false, []string{topo.HostLANIf}, true, true, true},
		{"moved to the WAN, followed", nil, true, []string{topo.HostWANIf}, false, true, true},
		{"multipath", []string{"lan", "wan"}, true, indexOrder(t, topo.Host, topo.HostLANIf, topo.HostWANIf), true, true, true},
		{"back to the LAN", []string{"lan"}, true, []string{topo.HostLANIf}, true, false, true},
	} {
		if step.via != nil {
			route(step.via...)
		}
		if step.follow {
			if err := b.FollowRoutes(); err != nil {
				t.Fatalf("%s: FollowRoutes: %v", step.name, err)
			}
		}
		out := nftList(t, topo.Host, "chain", "inet", "pcpd", chain)
		var want strings.Builder
		for _, i := range step.ifs {
			fmt.Fprintf(&want, "iif != %q ", i)
		}
		want.WriteString("fib saddr . iif oif 0 counter")
		if !strings.Contains(out, "\t"+want.String()) {
			t.Errorf("%s: owner chain, want %q:\n%s", step.name, want.String(), out)
		}
		if h := handle(); h != firstHandle {
			t.Errorf("%s: the limit rule was rewritten (handle %s, was %s): the owner's bucket was lost", step.name, h, firstHandle)
		}
		for _, from := range []struct {
			side string
			ns   *netlab.NS
			pass bool
		}{{"LAN", topo.Client, step.lan}, {"WAN", topo.Internet, step.wan}, {"other LAN", lan2, false}} {
			for _, f := range []struct {
				src netip.Addr
				dst netip.AddrPort
				srv *udpCounter
			}{{src6, dst6, srv6}, {src4, dst4, srv4}} {
				got, _ := sendRoundRobin(t, from.ns, []netip.Addr{f.src}, f.dst, n, f.srv)
				want := int64(0)
				if from.pass {
					want = n
				} else {
					dropped += n
				}
				if got != want {
					t.Errorf("%s: %d from %v on the %s: socket got %d, want %d", step.name, n, f.src, from.side, got, want)
				}
			}
		}
		err := b.Healthy() // reads the counters
		if (err == nil) != step.healthy {
			t.Errorf("%s: Healthy: %v", step.name, err)
		}
		if d := b.MeterDrops(); d.ReversePath != dropped || d.OwnerRate != 0 {
			t.Errorf("%s: MeterDrops %+v, want %d dropped by the reverse-path rule, none by the rate", step.name, d, dropped)
		}
	}
}

// indexOrder is names sorted by their interface index in ns.
func indexOrder(t *testing.T, ns *netlab.NS, a, b string) []string {
	if ifIndex(t, ns, a) > ifIndex(t, ns, b) {
		a, b = b, a
	}
	return []string{a, b}
}

// TestNetlinkRoutes: which interfaces NetlinkRoutes says the host routes a
// prefix through, for the routes a host has: on-link prefixes holding the
// host's own addresses, routed prefixes, multipath (every next hop), a
// more specific route at an end of the prefix or a reject route (none:
// every datagram then meets the route lookup), the default route.
func TestNetlinkRoutes(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	h := topo.Host
	for _, r := range [][]string{
		{"-6", "route", "add", "2001:db8:70::/48", "via", topo.ClientV6.String(), "dev", topo.HostLANIf},
		{"-4", "route", "add", "10.70.0.0/16", "via", topo.ClientV4.String(), "dev", topo.HostLANIf},
		{"-6", "route", "add", "2001:db8:71::/48", "nexthop", "via", topo.ClientV6.String(), "dev", topo.HostLANIf, "nexthop", "via", topo.InternetV6.String(), "dev", topo.HostWANIf},
		{"-6", "route", "add", "2001:db8:72::/48", "via", topo.ClientV6.String(), "dev", topo.HostLANIf},
		{"-6", "route", "add", "2001:db8:72::/64", "via", topo.InternetV6.String(), "dev", topo.HostWANIf},
		{"-6", "route", "add", "unreachable", "2001:db8:73::/48"},
		{"-4", "route", "add", "default", "via", topo.InternetV4.String(), "dev", topo.HostWANIf},
	} {
		h.MustRun(t, append([]string{"ip"}, r...)...)
	}
	lan, wan := ifIndex(t, h, topo.HostLANIf), ifIndex(t, h, topo.HostWANIf)
	r := nsRoutes(t, h)
	for _, tc := range []struct {
		name string
		pfx  string
		want []int
	}{
		{"on-link /64 with the host's address", "2001:db8:1:2::/64", []int{lan}},
		{"on-link IPv4 /24 (network, host, broadcast addresses)", "10.100.0.0/24", []int{lan}},
		{"a client's /128", topo.ClientV6.String() + "/128", []int{lan}},
		{"routed /48", "2001:db8:70::/48", []int{lan}},
		{"a /64 inside the routed /48", "2001:db8:70:5::/64", []int{lan}},
		{"routed IPv4 /16", "10.70.0.0/16", []int{lan}},
		{"IPv4-mapped", "::ffff:10.70.0.0/112", []int{lan}},
		{"multipath", "2001:db8:71::/48", []int{min(lan, wan), max(lan, wan)}},
		{"more specific at the start, elsewhere", "2001:db8:72::/48", nil},
		{"wider than its route", "2001:db8:70::/40", nil},
		{"unreachable", "2001:db8:73::/48", nil},
		{"no route", "2001:db8:74::/48", nil},
		{"IPv4 default route", "192.0.2.0/24", []int{wan}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := netip.MustParsePrefix(tc.pfx)
			if p.Addr().Is4In6() {
				p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96) // as ownerInterfaces hands it over
			}
			got, err := r.Interfaces(p)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("Interfaces(%v) = %v, want %v (LAN %d, WAN %d)", p, got, tc.want, lan, wan)
			}
		})
	}
}

// BenchmarkFollowRoutes: what FollowRoutes costs pcpd every TamperInterval
// (5 s) with 1 000 owners, each a routed /64 and an IPv4 /32, when no
// route changed (the lookups alone; nothing is written).
func BenchmarkFollowRoutes(b *testing.B) {
	ns := netlab.NewNS(b, "follow")
	ns.MustRun(b, "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
	ns.MustRun(b, "ip", "link", "set", "d0", "up")
	var owners []pinhole.Owner
	var batch strings.Builder
	for i := range 1000 {
		p6 := netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, byte(i >> 8), byte(i)}), 64)
		p4 := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 32)
		fmt.Fprintf(&batch, "route add %v dev d0\nroute add %v dev d0\n", p6, p4)
		owners = append(owners, pinhole.Owner{ID: fmt.Sprintf("wg:peer%d", i), Prefixes: []netip.Prefix{p6, p4}})
	}
	ns.MustRun(b, "sh", "-c", fmt.Sprintf("printf '%%s' '%s' | ip -batch -", batch.String()))
	// unwatched: every round asks (a Routes without a watch, or a host
	// whose routes keep changing); watched: the routes, rules, links and
	// addresses watched and unchanged, as on most hosts most rounds.
	for _, watched := range []bool{false, true} {
		b.Run(map[bool]string{false: "unwatched", true: "watched-unchanged"}[watched], func(b *testing.B) {
			cfg := pinhole.Config{Meter: pinhole.Meter{Rate: 200}}
			if watched {
				h, err := ns.Handle()
				if err != nil {
					b.Fatal(err)
				}
				r, err := pinhole.NetlinkRoutesAt(h)
				h.Close()
				if err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { r.Close() })
				cfg.Routes = r
			}
			be := newBackend(b, ns, cfg)
			if err := be.SetOwners(owners, nil); err != nil {
				b.Fatal(err)
			}
			out := nftList(b, ns, "table", "inet", "pcpd")
			if n := strings.Count(out, `iif != "d0" fib`); n != 1000 {
				b.Fatalf("%d owner chains pass d0 unlooked, want 1000", n)
			}
			var before, after syscall.Rusage
			syscall.Getrusage(syscall.RUSAGE_SELF, &before)
			for b.Loop() {
				if err := be.FollowRoutes(); err != nil {
					b.Fatal(err)
				}
			}
			syscall.Getrusage(syscall.RUSAGE_SELF, &after)
			cpu := time.Duration(syscall.TimevalToNsec(after.Utime) - syscall.TimevalToNsec(before.Utime) +
				syscall.TimevalToNsec(after.Stime) - syscall.TimevalToNsec(before.Stime))
			b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/op")
			if err := be.Teardown(); err != nil {
				b.Fatal(err)
			}
		})
	}
}
