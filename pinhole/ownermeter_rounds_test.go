package pinhole_test

import (
	"errors"
	"net/netip"
	"regexp"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestOwnerMeterHealthyRounds (review S2, the other half): Healthy
// compares each owner chain's rules with what the Backend expects the
// kernel to list. A healthy table, with traffic between the checks (the
// counters and the limit's bucket in use), must pass check after check,
// for every reverse-path mode and for owners of every shape (routed
// through one interface or none, nested, adjacent, with a hole, at the
// top of the address space, IPv4-mapped), with no chain rewritten (its
// limit rule's handle kept: its bucket); and a real tamper must still be
// caught, and repaired by RepairOwners. "listed otherwise" stands for a
// kernel or nftables library that lists a field otherwise than the
// Backend predicts: before, every check found every chain "damaged", and
// each repair rewrote the chains whole (every owner's bucket reset every
// 5 s); now the Backend compares with the rules as the kernel listed them
// once written.
func TestOwnerMeterHealthyRounds(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	for _, tc := range []struct {
		name    string
		mode    pinhole.ReversePath
		otherly bool
	}{
		{"strict", pinhole.ReversePathStrict, false},
		{"loose", pinhole.ReversePathLoose, false},
		{"off", pinhole.ReversePathOff, false},
		{"strict, listed otherwise", pinhole.ReversePathStrict, true},
		{"off, listed otherwise", pinhole.ReversePathOff, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.otherly {
				defer pinhole.ListAsWritten()()
			}
			// Owner rate 10/s, burst 10: the traffic below overflows it.
			b := newBackend(t, topo.Host, pinhole.Config{Meter: pinhole.Meter{Rate: 5, Burst: 5, Ports: []uint16{5351}, ReversePath: tc.mode}})
			defer b.Teardown()
			serveTunnel(t, b, topo)
			owners := []pinhole.Owner{
				{ID: "a", Prefixes: []netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}},
				{ID: "b", Prefixes: []netip.Prefix{netip.MustParsePrefix("2001:db8:77::/48"), netip.MustParsePrefix("10.77.0.0/28")}},
				{ID: "c", Prefixes: []netip.Prefix{netip.MustParsePrefix("2001:db8:77:1::/64"), netip.MustParsePrefix("10.77.0.16/28")}},
				{ID: "d", Prefixes: []netip.Prefix{netip.MustParsePrefix("ffff:ff00::/24"), netip.MustParsePrefix("255.255.255.0/24"),
					netip.MustParsePrefix("::ffff:192.0.2.0/120")}},
			}
			holes := []netip.Prefix{netip.MustParsePrefix("2001:db8:77:2::/64")}
			if err := b.SetOwners(owners, holes); err != nil {
				t.Fatal(err)
			}
			chain := pinhole.OwnerChains(owners)["a"]
			limitHandle := regexp.MustCompile(`limit rate over [^\n]* # handle (\d+)`)
			handle := func() string {
				m := limitHandle.FindStringSubmatch(topo.Host.MustRun(t, "nft", "-a", "list", "chain", "inet", "pcpd", chain))
				if m == nil {
					t.Fatalf("no limit rule in %s", chain)
				}
				return m[1]
			}
			first := handle()
			dst := netip.AddrPortFrom(topo.HostTunnelV6, 5351)
			c := countUDP(t, topo.Host, dst)
			for round := range 4 {
				if got, _ := sendRoundRobin(t, topo.Client, []netip.Addr{topo.ClientV6}, dst, 40, c); got >= 40 {
					t.Fatalf("round %d: the owner's limit dropped none of 40", round)
				}
				if err := b.FollowRoutes(); err != nil {
					t.Fatalf("round %d: FollowRoutes: %v", round, err)
				}
				if err := b.Healthy(); err != nil {
					t.Fatalf("round %d: Healthy on an intact table: %v", round, err)
				}
				if err := b.SetOwners(owners, holes); err != nil {
					t.Fatal(err)
				}
				if h := handle(); h != first {
					t.Fatalf("round %d: the owner chain was rewritten (limit rule handle %s, was %s)", round, h, first)
				}
			}
			if d := b.MeterDrops(); d.OwnerRate == 0 {
				t.Errorf("MeterDrops %+v: the limit's drops were not counted", d)
			}
			for _, tamper := range [][]string{
				{"replace", "rule", "inet", "pcpd", chain, "handle", first, "limit", "rate", "over", "999/second", "burst", "10", "packets", "counter", "drop"},
				{"insert", "rule", "inet", "pcpd", chain, "accept"},
				{"flush", "chain", "inet", "pcpd", chain},
				{"delete", "element", "inet", "pcpd", "owners6", "{ 2001:db8:77:1::/64 }"},
			} {
				topo.Host.MustRun(t, append([]string{"nft"}, tamper...)...)
				if err := b.Healthy(); !errors.Is(err, pinhole.ErrOwnerMeter) {
					t.Errorf("nft %v: Healthy = %v, want the owner meter reported", tamper, err)
				}
				if err := b.RepairOwners(); err != nil {
					t.Fatalf("RepairOwners after nft %v: %v", tamper, err)
				}
				if err := b.Healthy(); err != nil {
					t.Errorf("Healthy after repairing nft %v: %v", tamper, err)
				}
				first = handle()
			}
		})
	}
}
