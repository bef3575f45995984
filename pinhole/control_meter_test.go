package pinhole_test

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestUpgradeOwnerChainsReturnR9 (review9 U1): a table laid out by main's
// pcpd (before the one-lookup owner meter) has owner chains that end with
// their limit and return to control_local. This version's Setup rewrites
// control_local ("... vmap @owners6; ip saddr vmap @owners4; goto
// unowned") but leaves the owner chains to the owner meter's write after
// it (SetOwners, RepairOwners). Until then an owned datagram that its
// owner's bucket passed returns to control_local and falls through to
// "goto unowned": charged to its owner and to the shared unowned bucket
// both (property: never both). After Setup, before any SetOwners, every
// owner chain present must already go on to control_meter.
func TestUpgradeOwnerChainsReturnR9(t *testing.T) {
	ns := netlab.NewNS(t, "upgr9")
	cfg := pinhole.Config{Meter: pinhole.Meter{Rate: 200}}
	b := newBackend(t, ns, cfg)
	owners := []pinhole.Owner{{ID: "wg:a", Prefixes: []netip.Prefix{
		netip.MustParsePrefix("2001:db8:100::/40"), netip.MustParsePrefix("10.1.0.0/16")}},
		{ID: "wg:b", Prefixes: []netip.Prefix{netip.MustParsePrefix("2001:db8:200::/40")}}}
	if err := b.SetOwners(owners, nil); err != nil {
		t.Fatalf("SetOwners: %v", err)
	}
	chain, flushed := pinhole.OwnerChains(owners)["wg:a"], pinhole.OwnerChains(owners)["wg:b"]
	// main's layout (as main's Setup and SetOwners write it, checked with
	// main's binary): the owner chain without the goto, unowned without
	// it, control_local with the inverted lookups, no control_meter.
	for _, cmd := range [][]string{
		{"flush", "chain", "inet", "pcpd", "control_local"},
		{"add", "rule", "inet", "pcpd", "control_local", "udp", "dport", "5351", "ip6", "saddr", "vmap", "@owners6"},
		{"add", "rule", "inet", "pcpd", "control_local", "udp", "dport", "5351", "ip", "saddr", "vmap", "@owners4"},
		{"add", "rule", "inet", "pcpd", "control_local", "udp", "dport", "5351", "ip6", "saddr", "!=", "@owners6", "jump", "unowned"},
		{"add", "rule", "inet", "pcpd", "control_local", "udp", "dport", "5351", "ip", "saddr", "!=", "@owners4", "jump", "unowned"},
		{"add", "rule", "inet", "pcpd", "control_local", "udp", "dport", "5351", "update", "@meter4", "{", "ip", "saddr", "timeout", "10s", "limit", "rate", "over", "200/second", "burst", "200", "packets", "}", "drop"},
		{"add", "rule", "inet", "pcpd", "control_local", "notrack"},
		{"flush", "chain", "inet", "pcpd", "unowned"},
		{"add", "rule", "inet", "pcpd", "unowned", "limit", "rate", "over", "400/second", "burst", "400", "packets", "counter", "drop"},
		{"flush", "chain", "inet", "pcpd", chain},
		{"add", "rule", "inet", "pcpd", chain, "fib", "saddr", ".", "iif", "oif", "0", "counter", "drop"},
		{"add", "rule", "inet", "pcpd", chain, "limit", "rate", "over", "400/second", "burst", "400", "packets", "counter", "drop"},
		// One flushed, as a run without the meter leaves it: it must
		// not become a bare goto (its owner unlimited) either.
		{"flush", "chain", "inet", "pcpd", flushed},
		{"delete", "chain", "inet", "pcpd", "control_meter"},
	} {
		ns.MustRun(t, append([]string{"nft"}, cmd...)...)
	}
	// The new binary's start: a new Backend, Setup, and nothing else yet.
	newBackend(t, ns, cfg)
	out := nftList(t, ns, "chain", "inet", "pcpd", chain)
	if !strings.Contains(out, "goto control_meter\n\t}") {
		t.Fatalf("after Setup over main's table, owner chain %s returns to control_local (its datagrams fall through to goto unowned, charged twice):\n%s\ncontrol_local:\n%s",
			chain, out, nftList(t, ns, "chain", "inet", "pcpd", "control_local"))
	}
	if out := nftList(t, ns, "chain", "inet", "pcpd", flushed); strings.Contains(out, "goto") {
		t.Fatalf("after Setup, the flushed owner chain %s passes its owner on unlimited:\n%s", flushed, out)
	}
}

// TestControlMeterTamperR9 (review9): the tampers with the one-lookup
// owner meter beyond a missing goto that would let a request skip the
// per-source meter or notrack, or charge it to the wrong bucket, are
// noticed and repaired.
func TestControlMeterTamperR9(t *testing.T) {
	ns := netlab.NewNS(t, "tamp9")
	b := newBackend(t, ns, pinhole.Config{Meter: pinhole.Meter{Rate: 200}, Routes: noRoutes{}})
	pfx := "2001:db8:100::/40"
	if err := b.SetOwners([]pinhole.Owner{{ID: "wg:a", Prefixes: []netip.Prefix{netip.MustParsePrefix(pfx)}}}, nil); err != nil {
		t.Fatalf("SetOwners: %v", err)
	}
	if err := b.Healthy(); err != nil {
		t.Fatalf("Healthy: %v", err)
	}
	chain := pinhole.OwnerChains([]pinhole.Owner{{ID: "wg:a"}})["wg:a"]
	meter := func(last ...string) [][]string {
		return [][]string{{"flush", "chain", "inet", "pcpd", "control_meter"},
			{"add", "rule", "inet", "pcpd", "control_meter", "update", "@meter6", "{", "ip6", "saddr", "&", "ffff:ffff:ffff:ffff::", "timeout", "10s", "limit", "rate", "over", "200/second", "burst", "200", "packets", "}", "drop"},
			{"add", "rule", "inet", "pcpd", "control_meter", "update", "@meter4", "{", "ip", "saddr", "timeout", "10s", "limit", "rate", "over", "200/second", "burst", "200", "packets", "}", "drop"},
			append([]string{"add", "rule", "inet", "pcpd", "control_meter"}, last...)}
	}
	for _, tc := range []struct {
		name string
		nft  [][]string
	}{
		// notrack then return: back to control_local's goto unowned.
		{"control_meter's accept made return", append(meter("notrack"), []string{"add", "rule", "inet", "pcpd", "control_meter", "return"})},
		{"control_meter's accept made continue", append(meter("notrack"), []string{"add", "rule", "inet", "pcpd", "control_meter", "continue"})},
		{"control_meter's accept before notrack", append(meter("accept"), []string{"add", "rule", "inet", "pcpd", "control_meter", "notrack"})},
		{"control_meter's per-source rules after accept", [][]string{{"insert", "rule", "inet", "pcpd", "control_meter", "accept"}}},
		{"owner's element jumps to control_meter", [][]string{{"delete", "element", "inet", "pcpd", "owners6", "{", pfx, "}"},
			{"add", "element", "inet", "pcpd", "owners6", "{", pfx, ":", "jump", "control_meter", "}"}}},
		{"owner's element jumps to unowned", [][]string{{"delete", "element", "inet", "pcpd", "owners6", "{", pfx, "}"},
			{"add", "element", "inet", "pcpd", "owners6", "{", pfx, ":", "jump", "unowned", "}"}}},
		{"owner's element accepts", [][]string{{"delete", "element", "inet", "pcpd", "owners6", "{", pfx, "}"},
			{"add", "element", "inet", "pcpd", "owners6", "{", pfx, ":", "accept", "}"}}},
		{"owner chain's goto made jump", [][]string{{"flush", "chain", "inet", "pcpd", chain},
			{"add", "rule", "inet", "pcpd", chain, "fib", "saddr", ".", "iif", "oif", "0", "counter", "drop"},
			{"add", "rule", "inet", "pcpd", chain, "limit", "rate", "over", "400/second", "burst", "400", "packets", "counter", "drop"},
			{"add", "rule", "inet", "pcpd", chain, "jump", "control_meter"}}},
		{"owner chain goes to unowned", [][]string{{"flush", "chain", "inet", "pcpd", chain},
			{"add", "rule", "inet", "pcpd", chain, "fib", "saddr", ".", "iif", "oif", "0", "counter", "drop"},
			{"add", "rule", "inet", "pcpd", chain, "limit", "rate", "over", "400/second", "burst", "400", "packets", "counter", "drop"},
			{"add", "rule", "inet", "pcpd", chain, "goto", "unowned"}}},
		{"unowned goes to an owner", [][]string{{"flush", "chain", "inet", "pcpd", "unowned"},
			{"add", "rule", "inet", "pcpd", "unowned", "limit", "rate", "over", "400/second", "burst", "400", "packets", "counter", "drop"},
			{"add", "rule", "inet", "pcpd", "unowned", "goto", chain}}},
		{"a rule before control_meter's", [][]string{{"insert", "rule", "inet", "pcpd", "control_meter", "ip6", "saddr", "2001:db8::/32", "accept"}}},
	} {
		t.Run(tc.name, func(t *testing.T) { tamperNoticedAndRepaired(t, ns, b, tc.name, tc.nft) })
	}
}

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
	// One shell runs the nft commands in turn, each its own transaction
	// as before (an `ip netns exec` each took ~4 s for the 119).
	script := []string{"set -e"}
	for _, cmd := range cmds {
		script = append(script, "nft '"+strings.Join(cmd, "' '")+"'")
	}
	ns.MustRun(t, "sh", "-c", strings.Join(script, "\n"))
	onward := func(step string) {
		t.Helper()
		// One listing of the table, each owner chain's block cut out of
		// it as `nft list chain` prints it (37 listings took ~4 s a step).
		table := nftList(t, ns, "table", "inet", "pcpd")
		for id, chain := range chains {
			out := ""
			if i := strings.Index(table, "\tchain "+chain+" {\n"); i >= 0 {
				if j := strings.Index(table[i:], "\n\t}"); j >= 0 {
					out = table[i : i+j+len("\n\t}")]
				}
			}
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
