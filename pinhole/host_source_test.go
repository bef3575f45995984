package pinhole_test

import (
	"errors"
	"net/netip"
	"regexp"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestGuardDropsHostOwnSource: the guard's local-source rule (layout:
// "fib saddr type local counter drop" in guard6) drops a datagram from
// the WAN whose source is one of the host's own addresses (one of no
// protected prefix, which the protected-source rules leave alone) through
// a pinhole, standalone and attached; the Internet's own address passes.
// IPv4 needs no rule: the kernel's routing drops a local source arriving
// on the WAN as martian (accept_local=0, the default) after the NAPT
// mapping's DNAT, and the case checks that it does. Then the upgrade: an
// older pcpd's guard6 (the rule deleted) passes the spoof, Healthy says
// so, and Setup writes the rule back. Without the rule (h/peerend's
// probe) the IPv6 cases' spoofed datagram arrived on the fresh layout.
func TestGuardDropsHostOwnSource(t *testing.T) {
	own6 := netip.MustParseAddr("2001:db8:1:9::1") // the host's, on lan0, in no protected prefix
	for _, tc := range []struct {
		name     string
		attached bool
		v4       bool
	}{
		{"standalone ipv6 pinhole", false, false},
		{"attached ipv6 pinhole", true, false},
		{"standalone ipv4 NAPT (the kernel drops it)", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			topo := netlab.NewTopology(t, netlab.TopologyOptions{})
			cfg, table, guard := pinhole.Config{}, "pcpd", "guard6"
			if tc.attached {
				loadNft(t, topo.Host, adminRuleset)
				cfg, table, guard = pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd"}, "filter", "pcpd_guard6"
			}
			if tc.v4 {
				guard = strings.Replace(guard, "6", "4", 1)
			}
			b := newBackend(t, topo.Host, cfg)
			serveTunnel(t, b, topo)
			topo.Host.MustRun(t, "ip", "addr", "add", own6.String()+"/128", "dev", topo.HostLANIf, "nodad")
			if err := b.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
				t.Fatal(err)
			}
			// IPv4: the host's LAN address, outside the client's /32.
			dst, real, spoofed, rx := spoofTarget(t, topo, b, tc.v4, own6, topo.HostTunnelV4)
			check := func(step string, spoofPasses bool) {
				t.Helper()
				if err := eventuallyOneWay(t, topo.Internet, real, dst, rx); err != nil {
					t.Fatalf("%s: a datagram from %v through %v: %v", step, real, dst, err)
				}
				if got := oneWay(t, topo.Internet, spoofed, dst, rx); got != spoofPasses {
					t.Fatalf("%s: a datagram from the WAN claiming the host's own %v arrived through %v: %v, want %v\n%s",
						step, spoofed, dst, got, spoofPasses, nftList(t, topo.Host, "chain", "inet", table, guard))
				}
			}
			check("fresh layout", false)
			if tc.v4 {
				return
			}
			ruleRE := regexp.MustCompile(`fib saddr type local counter packets ([0-9]+) .*# handle (\d+)`)
			out := topo.Host.MustRun(t, "nft", "-a", "list", "chain", "inet", table, guard)
			m := ruleRE.FindStringSubmatch(out)
			if m == nil || m[1] == "0" {
				t.Fatalf("the local-source rule is missing or counted no drop:\n%s", out)
			}
			topo.Host.MustRun(t, "nft", "delete", "rule", "inet", table, guard, "handle", m[2])
			check("older layout", true)
			if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
				t.Fatalf("Healthy = %v over guard6 without the local-source rule, want ErrUnhealthy", err)
			}
			if err := b.Setup(); err != nil {
				t.Fatalf("Setup: %v", err)
			}
			if err := b.Healthy(); err != nil {
				t.Fatalf("Healthy after Setup: %v", err)
			}
			check("after Setup", false)
		})
	}
}
