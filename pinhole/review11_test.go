package pinhole_test

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestUpgradeOwnerChainsBatchesR11 (review11, 36181d3/ab515ff): the
// upgrade's goto control_meter over more owner chains than one batch
// (ownerChainBatch), then a second Setup (the repair after tamper), the
// owner meter's write, FollowRoutes and a third Setup: every owner chain
// holds exactly one goto, each Healthy passes (no repair loop), and the
// owner chains keep the shape the owner meter writes.
func TestUpgradeOwnerChainsBatchesR11(t *testing.T) {
	ns := netlab.NewNS(t, "upgr11")
	cfg := pinhole.Config{Meter: pinhole.Meter{Rate: 200}}
	b := newBackend(t, ns, cfg)
	var owners []pinhole.Owner
	for i := range 37 {
		owners = append(owners, pinhole.Owner{ID: fmt.Sprintf("wg:p%d", i), Prefixes: []netip.Prefix{
			netip.MustParsePrefix(fmt.Sprintf("2001:db8:%x::/48", 0x100+i)), netip.MustParsePrefix(fmt.Sprintf("10.%d.0.0/16", i))}})
	}
	if err := b.SetOwners(owners, nil); err != nil {
		t.Fatalf("SetOwners: %v", err)
	}
	chains := pinhole.OwnerChains(owners)
	// main's layout (TestUpgradeOwnerChainsReturnR9).
	cmds := [][]string{
		{"flush", "chain", "inet", "pcpd", "control_local"},
		{"add", "rule", "inet", "pcpd", "control_local", "udp", "dport", "5351", "ip6", "saddr", "vmap", "@owners6"},
		{"add", "rule", "inet", "pcpd", "control_local", "udp", "dport", "5351", "ip", "saddr", "vmap", "@owners4"},
		{"add", "rule", "inet", "pcpd", "control_local", "udp", "dport", "5351", "ip6", "saddr", "!=", "@owners6", "jump", "unowned"},
		{"add", "rule", "inet", "pcpd", "control_local", "udp", "dport", "5351", "ip", "saddr", "!=", "@owners4", "jump", "unowned"},
		{"add", "rule", "inet", "pcpd", "control_local", "notrack"},
		{"flush", "chain", "inet", "pcpd", "unowned"},
		{"add", "rule", "inet", "pcpd", "unowned", "limit", "rate", "over", "400/second", "burst", "400", "packets", "counter", "drop"},
	}
	for _, chain := range chains {
		cmds = append(cmds, []string{"flush", "chain", "inet", "pcpd", chain},
			[]string{"add", "rule", "inet", "pcpd", chain, "fib", "saddr", ".", "iif", "oif", "0", "counter", "drop"},
			[]string{"add", "rule", "inet", "pcpd", chain, "limit", "rate", "over", "400/second", "burst", "400", "packets", "counter", "drop"})
	}
	cmds = append(cmds, []string{"delete", "chain", "inet", "pcpd", "control_meter"})
	for _, cmd := range cmds {
		ns.MustRun(t, append([]string{"nft"}, cmd...)...)
	}
	onward := func(step string) {
		t.Helper()
		for id, chain := range chains {
			out := nftList(t, ns, "chain", "inet", "pcpd", chain)
			if n := strings.Count(out, "goto control_meter"); n != 1 || !strings.Contains(out, "goto control_meter\n\t}") {
				t.Fatalf("%s: owner %s's chain has %d goto control_meter (want 1, last):\n%s", step, id, n, out)
			}
		}
	}
	nb := newBackend(t, ns, cfg)
	onward("after the upgrade's Setup")
	if err := nb.Setup(); err != nil {
		t.Fatalf("second Setup: %v", err)
	}
	onward("after a second Setup")
	if err := nb.SetOwners(owners, nil); err != nil {
		t.Fatalf("SetOwners: %v", err)
	}
	onward("after SetOwners")
	for i, step := range []func() error{nb.Healthy, nb.FollowRoutes, nb.Healthy, nb.Setup, nb.Healthy, nb.RepairOwners, nb.Healthy} {
		if err := step(); err != nil {
			t.Fatalf("step %d after the upgrade: %v", i, err)
		}
	}
	onward("after repairs")
}
