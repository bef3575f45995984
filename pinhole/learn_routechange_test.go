package pinhole_test

import (
	"errors"
	"net/netip"
	"regexp"
	"slices"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestFollowRoutesLearnsTamper (review4 F1): FollowRoutes replaces an owner
// chain's reverse-path rule when the chain has a fib rule and the right
// rule count, without checking the other rules, and then learnListed
// reads the whole chain back and keeps it as the form Healthy compares
// with when its interfaces' listing is new: a limit rule tampered with
// (same expression kinds, other values) between two checks, followed by a
// route change, is learnt and passes Healthy from then on. With a second
// owner on the same interfaces, its intact chain no longer matches the
// learnt (tampered) form: every check repairs it (and resets its bucket).
func TestFollowRoutesLearnsTamper(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	lan, wan := ifIndex(t, topo.Host, topo.HostLANIf), ifIndex(t, topo.Host, topo.HostWANIf)
	limitHandle := regexp.MustCompile(`limit rate over [^\n]* # handle (\d+)`)
	for _, tc := range []struct {
		name   string
		alone  bool
		tamper []string // after "nft replace rule inet pcpd <chain> handle <limit>"
	}{
		{"rate, alone", true, []string{"limit", "rate", "over", "1000000/second", "burst", "400", "packets", "counter", "drop"}},
		{"verdict, alone", true, []string{"limit", "rate", "over", "200/second", "burst", "400", "packets", "counter", "accept"}},
		{"rate, with a neighbour", false, []string{"limit", "rate", "over", "1000000/second", "burst", "400", "packets", "counter", "drop"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			routes := &heldRoutes{ifs: []int{lan}}
			b := meteredTunnel(t, topo, routes)
			defer b.Teardown()
			owners := []pinhole.Owner{
				{ID: "static:x", Prefixes: []netip.Prefix{netip.MustParsePrefix("10.77.0.0/16")}},
				{ID: "static:y", Prefixes: []netip.Prefix{netip.MustParsePrefix("10.78.0.0/16")}},
			}
			tampered := "static:x"
			if c := pinhole.OwnerChains(owners); c["static:y"] < c["static:x"] {
				tampered = "static:y" // the first chain FollowRoutes replaces, so learns from
			}
			if tc.alone {
				owners = slices.DeleteFunc(owners, func(o pinhole.Owner) bool { return o.ID != tampered })
			}
			if err := b.SetOwners(owners, nil); err != nil {
				t.Fatal(err)
			}
			if err := b.Healthy(); err != nil {
				t.Fatalf("Healthy on an intact table: %v", err)
			}
			chain := pinhole.OwnerChains(owners)[tampered]
			m := limitHandle.FindStringSubmatch(topo.Host.MustRun(t, "nft", "-a", "list", "chain", "inet", "pcpd", chain))
			if m == nil {
				t.Fatalf("no limit rule in %s", chain)
			}
			topo.Host.MustRun(t, append([]string{"nft", "replace", "rule", "inet", "pcpd", chain, "handle", m[1]}, tc.tamper...)...)
			// The route moves (to interfaces whose listing is not learnt
			// yet) before the next check; the server follows it, then
			// checks (checkFirewall: FollowRoutes, then Healthy).
			routes.set(lan, wan)
			if err := b.FollowRoutes(); err != nil {
				t.Fatal(err)
			}
			err := b.Healthy()
			if !errors.Is(err, pinhole.ErrOwnerMeter) {
				t.Fatalf("Healthy after a tampered limit rule and a route change = %v, want ErrOwnerMeter\n%s",
					err, nftList(t, topo.Host, "chain", "inet", "pcpd", chain))
			}
			for round := range 3 {
				if err := b.RepairOwners(); err != nil {
					t.Fatal(err)
				}
				if err := b.Healthy(); err != nil {
					t.Errorf("round %d: Healthy after RepairOwners: %v", round, err)
				}
			}
		})
	}
}
