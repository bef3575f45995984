package pinhole_test

import (
	"net"
	"net/netip"
	"regexp"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestGuardDropsSpoofedProtectedSource: the guards' reverse-path rule
// (layout: "ip6 saddr @protected6 fib saddr . iif oif 0 counter drop",
// and its IPv4 twin) drops a datagram from the WAN whose source claims an
// address of a protected prefix that the host routes through the LAN,
// through a pinhole (IPv6) and a NAPT mapping (IPv4, DNAT-ed before the
// guard, with the kernel's rp_filter=2, systemd's default, which passes
// it), standalone and attached (where the guards otherwise fall through to
// the admin's chain: the drop is pcpd's own). The Internet's own address
// passes the same mapping. Then the upgrade: a table laid out by an older
// pcpd has the guards without the rule (exactly these guards with it
// deleted); the spoofed datagram passes it, Healthy reports the guards as
// damaged, and Setup writes the rule back (the server test
// TestMappingDropsSpoofedOwnedSource has the WireGuard side: the real
// peer's own datagrams, client to client through the host, still pass).
func TestGuardDropsSpoofedProtectedSource(t *testing.T) {
	other6, spoofed6 := netip.MustParsePrefix("2001:db8:1:3::/64"), netip.MustParseAddr("2001:db8:1:3::77")
	other4, spoofed4 := netip.MustParsePrefix("10.100.0.64/26"), netip.MustParseAddr("10.100.0.77")
	for _, tc := range []struct {
		name     string
		attached bool
		v4       bool
	}{
		{"standalone ipv6 pinhole", false, false},
		{"standalone ipv4 NAPT", false, true},
		{"attached ipv6 pinhole", true, false},
		{"attached ipv4 NAPT", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			topo, b, table, guard := guardBed(t, tc.attached, tc.v4)
			// A second protected prefix behind the LAN, routed there as
			// the host routes every client's prefix (IPv4: lan0's /24
			// covers it), so that a route back exists and loose reverse
			// path passes a source in it from anywhere.
			topo.Host.MustRun(t, "ip", "-6", "route", "add", other6.String(), "dev", topo.HostLANIf)
			topo.Host.MustRun(t, "sh", "-c", "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 2 > $f; done")
			if err := b.SetProtected([]netip.Prefix{topo.ClientPrefix6, other6, topo.ClientPrefix4, other4}); err != nil {
				t.Fatal(err)
			}
			dst, real, spoofed, rx := spoofTarget(t, topo, b, tc.v4, spoofed6, spoofed4)
			arrives := func(src netip.Addr) bool { return oneWay(t, topo.Internet, src, dst, rx) }
			check := func(step string, spoofPasses bool) {
				t.Helper()
				if err := eventuallyOneWay(t, topo.Internet, real, dst, rx); err != nil {
					t.Fatalf("%s: a datagram from %v through %v: %v", step, real, dst, err)
				}
				if got := arrives(spoofed); got != spoofPasses {
					t.Fatalf("%s: a datagram from the WAN claiming %v (a protected address routed through %s) arrived through %v: %v, want %v\n%s",
						step, spoofed, topo.HostLANIf, dst, got, spoofPasses, nftList(t, topo.Host, "chain", "inet", table, guard))
				}
			}
			check("fresh layout", false)
			if out := nftList(t, topo.Host, "chain", "inet", table, guard); !regexp.MustCompile(`saddr @\S+ fib saddr \. iif oif 0 counter packets [1-9]`).MatchString(out) {
				t.Errorf("the reverse-path rule counted no drop:\n%s", out)
			}

			// An older pcpd's guards: these without the rules (the route
			// lookup's, and the serving interfaces' of h/fixspoof2).
			for _, g := range []string{"guard6", "guard4"} {
				if tc.attached {
					g = "pcpd_" + g
				}
				deleteRule(t, topo.Host, table, g, `fib saddr \. iif oif 0 .*`)
				deleteRule(t, topo.Host, table, g, `iifname != @\S*serving_ifs .*`)
			}
			check("older layout", true)
			tamperNoticedAndRepaired(t, topo.Host, b, "the guards without the reverse-path rule", nil)
			check("after Setup", false)
		})
	}
}

// oneWay sends a few UDP datagrams from src in ns to dst and reports
// whether one of them reached rx (datagrams of earlier calls, which carry
// another payload, are skipped). The source may be spoofed: no answer is
// expected.
func oneWay(t *testing.T, ns *netlab.NS, src netip.Addr, dst netip.AddrPort, rx *net.UDPConn) bool {
	t.Helper()
	from, err := ns.SendUDPFrom(src, dst, rx, failWait/3)
	if err != nil {
		t.Fatal(err)
	}
	return from.IsValid()
}

// guardBed is a topology with pcpd's backend set up standalone (its own
// table "pcpd") or attached to an admin's "filter" table, and the name of
// the table and of the guard chain of the family (v4: IPv4's).
func guardBed(t *testing.T, attached, v4 bool) (topo *netlab.Topology, b *pinhole.Backend, table, guard string) {
	t.Helper()
	topo = netlab.NewTopology(t, netlab.TopologyOptions{})
	cfg, table, guard := pinhole.Config{}, "pcpd", "guard6"
	if attached {
		loadNft(t, topo.Host, adminRuleset)
		cfg, table, guard = pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd"}, "filter", "pcpd_guard6"
	}
	if v4 {
		guard = strings.Replace(guard, "6", "4", 1)
	}
	return topo, newBackend(t, topo.Host, cfg), table, guard
}
