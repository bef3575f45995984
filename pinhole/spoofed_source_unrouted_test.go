package pinhole_test

import (
	"net/netip"
	"regexp"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestGuardDropsSpoofedSourceRoutedViaWAN (review of the guards'
// reverse-path rule, 2026-12-04, h/revspoof): "fib saddr . iif oif 0"
// only asks whether the host routes the source back out of the interface
// it came in on. A protected prefix the host has no route of its own for
// falls to the default route, through the WAN, and a datagram from the WAN
// claiming it then passes the rule: the arrival interface IS the route
// back. That happens whenever a protected prefix is not routed through
// its served interface, e.g. the whole --wireguard-gone-grace window
// (default 1 m): the WireGuard interface is gone and its routes with it,
// but its peers keep owning, so their AllowedIPs stay in @protected, and a
// datagram from the WAN spoofing such a peer reaches another client's
// pinhole (IPv6) or NAPT mapping (IPv4; rp_filter=1 passes it too, for the
// same reason) as if from that peer. A protected source can only be
// genuine on a served interface; arriving on the WAN it is spoofed,
// whatever the route lookup says. Fixed on h/fixspoof2 (the guards' rule
// "saddr @protected iifname != @serving_ifs counter drop"); the steps
// below show that it keys on the arrival interface: with the WAN served,
// the same datagram passes.
func TestGuardDropsSpoofedSourceRoutedViaWAN(t *testing.T) {
	gone6, spoofed6 := netip.MustParsePrefix("2001:db8:1:3::/64"), netip.MustParseAddr("2001:db8:1:3::77")
	gone4, spoofed4 := netip.MustParsePrefix("10.101.0.0/24"), netip.MustParseAddr("10.101.0.77")
	for _, tc := range []struct {
		name string
		v4   bool
	}{
		{"ipv6 pinhole", false},
		{"ipv4 NAPT, rp_filter=1", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			topo := netlab.NewTopology(t, netlab.TopologyOptions{})
			b := newBackend(t, topo.Host, pinhole.Config{})
			// The host's default routes, through the WAN, as any router's.
			topo.Host.MustRun(t, "ip", "-6", "route", "add", "default", "via", topo.InternetV6.String(), "dev", topo.HostWANIf)
			topo.Host.MustRun(t, "ip", "route", "add", "default", "via", topo.InternetV4.String(), "dev", topo.HostWANIf)
			topo.Host.MustRun(t, "sh", "-c", "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 1 > $f; done")
			// gone6/gone4: a peer's AllowedIPs whose interface (and routes)
			// are gone, still owned for the grace.
			if err := b.SetProtected([]netip.Prefix{topo.ClientPrefix6, gone6, topo.ClientPrefix4, gone4}); err != nil {
				t.Fatal(err)
			}
			dst, real, spoofed, rx := spoofTarget(t, topo, b, tc.v4, spoofed6, spoofed4)
			if err := eventuallyOneWay(t, topo.Internet, real, dst, rx); err != nil {
				t.Fatalf("a datagram from %v through %v: %v", real, dst, err)
			}
			guard := map[bool]string{false: "guard6", true: "guard4"}[tc.v4]
			// Before any SetServed (serving_ifs empty), pcpd serving the
			// tunnel only, then (fix, h/fixspoof2) the WAN served too: the
			// prefix is then reached through an interface pcpd serves, as
			// a client prefix routed through a gateway on a served LAN in
			// static mode, and its datagrams pass (the rule keys on the
			// arrival interface, not on the source alone).
			for _, step := range []struct {
				served []string
				passes bool
			}{
				{nil, false},
				{[]string{topo.HostLANIf}, false},
				{[]string{topo.HostLANIf, topo.HostWANIf}, true},
			} {
				if step.served != nil {
					setServed(t, b, step.served, topo.HostTunnelV6, topo.HostTunnelV4)
				}
				if got := oneWay(t, topo.Internet, spoofed, dst, rx); got != step.passes {
					t.Errorf("serving %q: a datagram from the WAN claiming %v (protected, no route but the default through %s) arrived through %v: %v, want %v\n%s",
						step.served, spoofed, topo.HostWANIf, dst, got, step.passes, nftList(t, topo.Host, "chain", "inet", "pcpd", guard))
				}
			}
			if out := nftList(t, topo.Host, "chain", "inet", "pcpd", guard); !regexp.MustCompile(`iifname != @serving_ifs counter packets [1-9]`).MatchString(out) {
				t.Errorf("the serving-interface rule counted no drop:\n%s", out)
			}
		})
	}
}
