package pinhole_test

import (
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
// a pinhole, standalone and attached, and through an IPv4 NAPT mapping
// (DNAT-ed before the guard) with accept_local=1; the Internet's own
// address passes. With accept_local=0, the default, the kernel's routing
// drops the IPv4 one itself as martian (the last case checks that it
// does, whatever the guard). Then the upgrade: an older pcpd's guard (the
// rule deleted) passes the spoof, Healthy says so, and Setup writes the
// rule back. Without the rule (h/peerend's probe) the spoofed datagram of
// the first three cases arrived on the fresh layout.
func TestGuardDropsHostOwnSource(t *testing.T) {
	own6 := netip.MustParseAddr("2001:db8:1:9::1") // the host's, on lan0, in no protected prefix
	for _, tc := range []struct {
		name        string
		attached    bool
		v4          bool
		acceptLocal bool // net.ipv4.conf.*.accept_local=1 on the host
	}{
		{"standalone ipv6 pinhole", false, false, false},
		{"attached ipv6 pinhole", true, false, false},
		{"standalone ipv4 NAPT, accept_local", false, true, true},
		{"standalone ipv4 NAPT, the kernel drops it", false, true, false},
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
			if tc.acceptLocal {
				topo.Host.MustRun(t, "sh", "-c", "for f in /proc/sys/net/ipv4/conf/*/accept_local; do echo 1 > $f; done")
			}
			check("fresh layout", false)
			if tc.v4 && !tc.acceptLocal {
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
			tamperNoticedAndRepaired(t, topo.Host, b, "the guard without the local-source rule", nil)
			check("after Setup", false)
		})
	}
}
