package pinhole_test

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// The owner meter must charge an owner for its own datagrams only
// (RELIABILITY.md known bug 4). Both tests use the meter of
// TestOwnerMeterPKT08: an owner may send a burst of 100, then 20 a second;
// the per-source meter holds each /64 to a burst of 40, and its sets are
// full after two sources.
const (
	bug4Rate, bug4Burst           = 20, 40
	bug4OwnerRate, bug4OwnerBurst = 20, 100
)

func bug4Backend(t *testing.T, ns *netlab.NS) *pinhole.Backend {
	return newBackend(t, ns, pinhole.Config{Meter: pinhole.Meter{Rate: bug4Rate, Burst: bug4Burst, Ports: []uint16{5351}, Size: 2,
		OwnerRate: bug4OwnerRate, OwnerBurst: bug4OwnerBurst}})
}

// TestOwnerMeterHoleBug4: a hole (policy.Holes: peer B's AllowedIPs on
// wg1 inside peer A's on wg0, owned by nobody) inside A's prefix is not
// charged to A. B floods from the hole; A's requests still all get
// through, A's owner chain dropped nothing, and the owner map has no range
// for the hole. Without the holes (the map jumping to A's chain there) B
// held A to its rate.
func TestOwnerMeterHoleBug4(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	b := bug4Backend(t, topo.Host)
	serveTunnel(t, b, topo)
	for _, tc := range []struct {
		name   string
		outer  netip.Prefix // A's
		hole   netip.Prefix // B's, nobody's
		fromA  netip.Addr   // A's, outside the hole
		fromB  netip.Addr   // B's, inside the hole
		dst    netip.AddrPort
		family string // ip -6 or -4
	}{
		{"IPv6", netip.MustParsePrefix("2001:db8:77::/48"), netip.MustParsePrefix("2001:db8:77:5::/64"),
			netip.MustParseAddr("2001:db8:77:100::1"), netip.MustParseAddr("2001:db8:77:5::1"),
			netip.AddrPortFrom(topo.HostTunnelV6, 5351), "-6"},
		{"IPv4", netip.MustParsePrefix("10.77.0.0/16"), netip.MustParsePrefix("10.77.5.0/24"),
			netip.MustParseAddr("10.77.100.1"), netip.MustParseAddr("10.77.5.1"),
			netip.AddrPortFrom(topo.HostTunnelV4, 5351), "-4"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, a := range []netip.Addr{tc.fromA, tc.fromB} {
				topo.Client.MustRun(t, "ip", "addr", "add", netip.PrefixFrom(a, a.BitLen()).String(), "dev", topo.ClientIf, "nodad")
			}
			via := topo.ClientV6
			if tc.outer.Addr().Is4() {
				via = topo.ClientV4
			}
			topo.Host.MustRun(t, "ip", tc.family, "route", "add", tc.outer.String(), "via", via.String(), "dev", topo.HostLANIf)
			owners := []pinhole.Owner{{ID: "wg:A", Prefixes: []netip.Prefix{tc.outer}}}
			if err := b.SetOwners(owners, []netip.Prefix{tc.hole}); err != nil {
				t.Fatal(err)
			}
			if err := b.Healthy(); err != nil {
				t.Fatalf("Healthy: %v", err)
			}
			chainA := pinhole.OwnerChains(owners)["wg:A"]
			got, err := b.Owners()
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range got {
				if r.Prefix.Overlaps(tc.hole) {
					t.Errorf("owner maps hold %v (%s), which overlaps the hole %v: %v", r.Prefix, r.Chain, tc.hole, got)
				}
			}

			srv := countUDP(t, topo.Host, tc.dst)
			const flood = 300
			if n, _ := sendRoundRobin(t, topo.Client, []netip.Addr{tc.fromB}, tc.dst, flood, srv); n > bug4Burst+10 {
				t.Errorf("%d from B's hole: socket got %d, want its per-source burst (%d) and rate", flood, n, bug4Burst)
			}
			if n, _ := sendRoundRobin(t, topo.Client, []netip.Addr{tc.fromA}, tc.dst, bug4Burst/2, srv); n != bug4Burst/2 {
				t.Errorf("%d from A after B's flood from the hole: socket got %d, want all (B drained A's bucket)", bug4Burst/2, n)
			}
			if out := nftList(t, topo.Host, "chain", "inet", "pcpd", chainA); strings.Count(out, "counter packets 0 ") != 2 {
				t.Errorf("A's owner chain counted drops for B's datagrams:\n%s", out)
			}
		})
	}
}

// TestOwnerMeterSpoofBug4: datagrams with sources in an owner's prefix that
// arrive on an interface the host does not route that prefix through
// (here the WAN; the raw chain runs before rp_filter and the admin's input
// rules) are dropped by the owner chain's reverse-path rule and counted
// there: they reach no socket and drain neither the owner's bucket nor
// the per-source bucket of the /64 (IPv4: the address) they claim. The
// victim's own datagrams, on the interface the host routes its prefix
// through, all still get through. Without the check a spoofer on the WAN
// held the victim to its rate.
func TestOwnerMeterSpoofBug4(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	b := bug4Backend(t, topo.Host)
	serveTunnel(t, b, topo)
	owners := []pinhole.Owner{{ID: "static:victim", Prefixes: []netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}}}
	if err := b.SetOwners(owners, nil); err != nil {
		t.Fatal(err)
	}
	chain := pinhole.OwnerChains(owners)["static:victim"]
	// The spoofer on the Internet side reaches the serving addresses via
	// the host's WAN, from addresses of the victim's (as it may: nothing
	// checks sources on the way).
	topo.Internet.MustRun(t, "ip", "route", "add", topo.HostTunnelV4.String()+"/32", "via", topo.HostPublicV4.String())
	spoofed := 0
	for _, tc := range []struct {
		name           string
		spoof, victim  netip.Addr
		dst            netip.AddrPort
		victimAttempts int
	}{
		// Another address of the victim's /64: its per-source bucket
		// is the victim's too.
		{"IPv6", netip.MustParseAddr("2001:db8:1:2::99"), topo.ClientV6, netip.AddrPortFrom(topo.HostTunnelV6, 5351), bug4Burst / 2},
		{"IPv4", topo.ClientV4, topo.ClientV4, netip.AddrPortFrom(topo.HostTunnelV4, 5351), bug4Burst / 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			topo.Internet.MustRun(t, "ip", "addr", "add", netip.PrefixFrom(tc.spoof, tc.spoof.BitLen()).String(), "dev", "lo", "nodad")
			srv := countUDP(t, topo.Host, tc.dst)
			const flood = 300
			if n, _ := sendRoundRobin(t, topo.Internet, []netip.Addr{tc.spoof}, tc.dst, flood, srv); n != 0 {
				t.Errorf("%d spoofed from %v via the WAN: socket got %d, want none", flood, tc.spoof, n)
			}
			spoofed += flood
			if n, _ := sendRoundRobin(t, topo.Client, []netip.Addr{tc.victim}, tc.dst, tc.victimAttempts, srv); n != int64(tc.victimAttempts) {
				t.Errorf("%d from the victim %v after %d spoofed from its prefix via the WAN: socket got %d, want all", tc.victimAttempts, tc.victim, flood, n)
			}
			out := nftList(t, topo.Host, "chain", "inet", "pcpd", chain)
			if want := fmt.Sprintf("fib saddr . iif oif 0 counter packets %d ", spoofed); !strings.Contains(out, want) {
				t.Errorf("owner chain should count %d spoofed datagrams (%q):\n%s", spoofed, want, out)
			}
			if !strings.Contains(out, "burst 100 packets counter packets 0 ") {
				t.Errorf("owner chain's limit dropped some:\n%s", out)
			}
		})
	}
}
