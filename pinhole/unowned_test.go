package pinhole_test

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// unownedDrops reads the unowned chain's drop counter from nft.
func unownedDrops(t *testing.T, ns *netlab.NS) int64 {
	t.Helper()
	return chainCounter(t, ns, "unowned", "limit rate over")
}

// TestUnownedMeterS4 (review S4): the sources no owner holds (outside
// every owner's prefix, or in a hole) share one kernel bucket, both
// families and every port together, Meter.UnownedRate. Before, only the
// per-source meter held them, so a flood from many unowned /64s (here the
// per-source sets are full, Size 2, as a large flood leaves them) reached
// pcpd's socket whole. An owner's datagrams are never charged to it: the
// owner's client is answered while the shared bucket is empty, and the
// unowned chain's counter does not move for them. Healthy reads the
// counter (MeterDrops), compares the chain and its jumps with what Setup
// wrote, and Setup repairs them.
func TestUnownedMeterS4(t *testing.T) {
	const (
		rate, burst               = 20, 40
		ownerRate, ownerBurst     = 20, 100
		unownedRate, unownedBurst = 10, 50
		perSource                 = 40 // datagrams from each of the flood's sources: at most the per-source burst
	)
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	b := newBackend(t, topo.Host, pinhole.Config{Meter: pinhole.Meter{Rate: rate, Burst: burst, Ports: []uint16{5351}, Size: 2,
		OwnerRate: ownerRate, OwnerBurst: ownerBurst, UnownedRate: unownedRate, UnownedBurst: unownedBurst}})
	serveTunnel(t, b, topo)

	sitePfx := netip.MustParsePrefix("2001:db8:77::/48")
	holePfx := netip.MustParsePrefix("2001:db8:77:9::/64") // owned by nobody inside the site's /48
	owned := netip.MustParseAddr("2001:db8:77:1::1")
	hole := netip.MustParseAddr("2001:db8:77:9::1")
	unowned4 := netip.MustParseAddr("10.100.0.77") // on the LAN, in no owner's prefix
	var flood []netip.Addr
	for i := range 8 {
		flood = append(flood, netip.MustParseAddr(fmt.Sprintf("2001:db8:99:%x::1", 0x100+i)))
	}
	for _, a := range append(append([]netip.Addr{}, flood...), owned, hole) {
		topo.Client.MustRun(t, "ip", "addr", "add", a.String()+"/128", "dev", topo.ClientIf, "nodad")
	}
	topo.Client.MustRun(t, "ip", "addr", "add", unowned4.String()+"/32", "dev", topo.ClientIf)
	topo.Host.MustRun(t, "ip", "-6", "route", "add", sitePfx.String(), "via", topo.ClientV6.String(), "dev", topo.HostLANIf)
	owners := []pinhole.Owner{{ID: "wg:site", Prefixes: []netip.Prefix{sitePfx, topo.ClientPrefix4}}}
	if err := b.SetOwners(owners, []netip.Prefix{holePfx}); err != nil {
		t.Fatalf("SetOwners: %v", err)
	}
	site := pinhole.OwnerChains(owners)["wg:site"]

	ruleset := nftList(t, topo.Host, "table", "inet", "pcpd")
	for _, want := range []string{
		"ip6 saddr vmap @owners6\n\t\tip saddr vmap @owners4\n\t\tgoto unowned\n\t}",
		fmt.Sprintf("chain unowned {\n\t\tlimit rate over %d/second burst %d packets counter packets 0 bytes 0 drop\n\t\tgoto control_meter\n\t}", unownedRate, unownedBurst),
		"chain control_meter {\n\t\tupdate @meter6",
	} {
		if !strings.Contains(ruleset, want) {
			t.Fatalf("ruleset lacks %q:\n%s", want, ruleset)
		}
	}
	if err := b.Healthy(); err != nil { // sets MeterDrops' base
		t.Fatalf("Healthy: %v", err)
	}

	dst := netip.AddrPortFrom(topo.HostTunnelV6, 5351)
	srv := countUDP(t, topo.Host, dst)
	srv4 := countUDP(t, topo.Host, netip.AddrPortFrom(topo.HostTunnelV4, 5351))

	// Eight unowned /64s, each within the per-source burst (and the
	// per-source sets full anyway), 320 together: held to the shared
	// bucket's burst and rate, the rest counted in the unowned chain.
	n, took := sendRoundRobin(t, topo.Client, flood, dst, perSource, srv)
	floodEnd := time.Now()
	t.Logf("flood of %d from %d unowned /64s in %v: socket got %d", perSource*len(flood), len(flood), took, n)
	if most := int64(unownedBurst + unownedRate*took.Seconds() + 10); n > most || n < unownedBurst {
		t.Errorf("flood of %d from %d unowned /64s in %v: socket got %d, want %d..%d", perSource*len(flood), len(flood), took, n, unownedBurst, most)
	}
	dropped := int64(perSource*len(flood)) - n
	if got := unownedDrops(t, topo.Host); got != dropped {
		t.Errorf("unowned chain counted %d drops, want %d", got, dropped)
	}
	// Right after: a source in the hole and an unowned IPv4 source share
	// the empty bucket (on its own, the per-source meter would let its
	// burst, 40, through).
	if n, _ := sendRoundRobin(t, topo.Client, []netip.Addr{hole}, dst, 30, srv); n > int64(unownedRate*time.Since(floodEnd).Seconds()+5) {
		t.Errorf("30 from %v in a hole after the flood: socket got %d %v after it, want the unowned rate", hole, n, time.Since(floodEnd))
	}
	if n, _ := sendRoundRobin(t, topo.Client, []netip.Addr{unowned4}, netip.AddrPortFrom(topo.HostTunnelV4, 5351), 30, srv4); n > int64(unownedRate*time.Since(floodEnd).Seconds()+5) {
		t.Errorf("30 from %v (IPv4, unowned) after the flood: socket got %d %v after it, want the unowned rate", unowned4, n, time.Since(floodEnd))
	}
	// The owner's client, meanwhile, is answered whole, from both
	// families, and charges nothing to the shared bucket.
	before := unownedDrops(t, topo.Host)
	if n, _ := sendRoundRobin(t, topo.Client, []netip.Addr{owned}, dst, burst/2, srv); n != burst/2 {
		t.Errorf("%d from the owner's %v with the unowned bucket empty: socket got %d, want all", burst/2, owned, n)
	}
	if n, _ := sendRoundRobin(t, topo.Client, []netip.Addr{topo.ClientV4}, netip.AddrPortFrom(topo.HostTunnelV4, 5351), burst/2, srv4); n != burst/2 {
		t.Errorf("%d from the owner's %v with the unowned bucket empty: socket got %d, want all", burst/2, topo.ClientV4, n)
	}
	// An owner's flood is its own chain's: the owner's bucket drops it,
	// the unowned chain counts none of it.
	var siteFlood []netip.Addr
	for i := range 4 {
		a := netip.MustParseAddr(fmt.Sprintf("2001:db8:77:%x::1", 0x100+i))
		topo.Client.MustRun(t, "ip", "addr", "add", a.String()+"/128", "dev", topo.ClientIf, "nodad")
		siteFlood = append(siteFlood, a)
	}
	if n, _ := sendRoundRobin(t, topo.Client, siteFlood, dst, perSource, srv); n >= int64(perSource*len(siteFlood)) {
		t.Errorf("the owner's flood of %d: socket got %d, want its owner's bucket to hold it", perSource*len(siteFlood), n)
	}
	if got := unownedDrops(t, topo.Host); got != before {
		t.Errorf("the owner's datagrams moved the unowned chain's counter from %d to %d", before, got)
	}
	if out := nftList(t, topo.Host, "chain", "inet", "pcpd", site); strings.Contains(out, "limit rate over 20/second burst 100 packets counter packets 0 ") {
		t.Errorf("the owner's chain dropped none of its flood:\n%s", out)
	}

	// Healthy folds the counter into MeterDrops.
	if err := b.Healthy(); err != nil {
		t.Fatalf("Healthy: %v", err)
	}
	if d := b.MeterDrops(); d.UnownedRate != uint64(before) {
		t.Errorf("MeterDrops %+v, want UnownedRate %d", d, before)
	}

	// Damage to the shared bucket: Healthy notices it, Setup repairs.
	for _, tc := range []struct {
		name string
		nft  [][]string
	}{
		{"unowned chain flushed", [][]string{{"flush", "chain", "inet", "pcpd", "unowned"}}},
		{"its limit raised", [][]string{{"flush", "chain", "inet", "pcpd", "unowned"},
			{"add", "rule", "inet", "pcpd", "unowned", "limit", "rate", "over", "100000/second", "burst", "50", "packets", "counter", "drop"}}},
		{"its drop made accept", [][]string{{"flush", "chain", "inet", "pcpd", "unowned"},
			{"add", "rule", "inet", "pcpd", "unowned", "limit", "rate", "over", "10/second", "burst", "50", "packets", "counter", "accept"}}},
		// Without it the unowned sources would skip the per-source meter.
		{"its goto control_meter gone", [][]string{{"flush", "chain", "inet", "pcpd", "unowned"},
			{"add", "rule", "inet", "pcpd", "unowned", "limit", "rate", "over", "10/second", "burst", "50", "packets", "counter", "drop"}}},
		{"control_local's goto unowned gone", [][]string{{"flush", "chain", "inet", "pcpd", "control_local"},
			{"add", "rule", "inet", "pcpd", "control_local", "ip6", "saddr", "@served6", "ip6", "saddr", "!=", "fe80::/10", "iif", "!=", "lo", "counter", "drop"},
			{"add", "rule", "inet", "pcpd", "control_local", "ip6", "saddr", "@served6", "iif", "!=", "lo", "fib", "saddr", ".", "iif", "type", "local", "counter", "drop"},
			{"add", "rule", "inet", "pcpd", "control_local", "ip", "saddr", "@served4", "iif", "!=", "lo", "counter", "drop"},
			{"add", "rule", "inet", "pcpd", "control_local", "iif", "lo", "limit", "rate", "over", "20/second", "burst", "40", "packets", "counter", "drop"},
			{"add", "rule", "inet", "pcpd", "control_local", "iif", "lo", "notrack", "accept"},
			{"add", "rule", "inet", "pcpd", "control_local", "ip6", "saddr", "vmap", "@owners6"},
			{"add", "rule", "inet", "pcpd", "control_local", "ip", "saddr", "vmap", "@owners4"}}},
	} {
		tamperNoticedAndRepaired(t, topo.Host, b, tc.name, tc.nft)
	}
	// Written whole by hand, as Setup writes them, both pass Healthy: the
	// cases above fail for the missing goto alone.
	for _, cmd := range [][]string{{"flush", "chain", "inet", "pcpd", "unowned"},
		{"add", "rule", "inet", "pcpd", "unowned", "limit", "rate", "over", "10/second", "burst", "50", "packets", "counter", "drop"},
		{"add", "rule", "inet", "pcpd", "unowned", "goto", "control_meter"},
		{"flush", "chain", "inet", "pcpd", "control_local"},
		{"add", "rule", "inet", "pcpd", "control_local", "ip6", "saddr", "@served6", "ip6", "saddr", "!=", "fe80::/10", "iif", "!=", "lo", "counter", "drop"},
		{"add", "rule", "inet", "pcpd", "control_local", "ip6", "saddr", "@served6", "iif", "!=", "lo", "fib", "saddr", ".", "iif", "type", "local", "counter", "drop"},
		{"add", "rule", "inet", "pcpd", "control_local", "ip", "saddr", "@served4", "iif", "!=", "lo", "counter", "drop"},
		{"add", "rule", "inet", "pcpd", "control_local", "iif", "lo", "limit", "rate", "over", "20/second", "burst", "40", "packets", "counter", "drop"},
		{"add", "rule", "inet", "pcpd", "control_local", "iif", "lo", "notrack", "accept"},
		{"add", "rule", "inet", "pcpd", "control_local", "ip6", "saddr", "vmap", "@owners6"},
		{"add", "rule", "inet", "pcpd", "control_local", "ip", "saddr", "vmap", "@owners4"},
		{"add", "rule", "inet", "pcpd", "control_local", "goto", "unowned"}} {
		topo.Host.MustRun(t, append([]string{"nft"}, cmd...)...)
	}
	if err := b.Healthy(); err != nil {
		t.Fatalf("Healthy after unowned and control_local were written by hand as Setup writes them: %v", err)
	}
}

// TestUnownedMeterLayout: the unowned chain (and control_meter) are part of
// the layout only with the owner meter (standalone, Rate set): a Backend
// without the meter removes the chains a metered run left (its owner
// chains going to control_meter), whether control_local stays (for
// notrack: it jumped to the chain, which could not be deleted before it was
// flushed) or goes too, and a metered one adds it back.
func TestUnownedMeterLayout(t *testing.T) {
	for _, tc := range []struct {
		name  string
		plain pinhole.Config
	}{
		{"notrack stays", pinhole.Config{}},
		{"control chains go", pinhole.Config{TrackControl: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := netlab.NewNS(t, "unowned")
			for round := range 2 {
				metered := newBackend(t, ns, pinhole.Config{Meter: pinhole.Meter{Rate: 200}})
				if out := nftList(t, ns, "table", "inet", "pcpd"); !strings.Contains(out, "chain unowned {\n\t\tlimit rate over 400/second burst 400 packets") {
					t.Fatalf("round %d, metered: no unowned chain at the owner meter's rate (2 × 200, burst 2 × 200):\n%s", round, out)
				}
				// An owner's chain goes to control_meter: the unmetered
				// Setup must flush it before it can delete control_meter.
				if err := metered.SetOwners([]pinhole.Owner{{ID: "wg:x", Prefixes: []netip.Prefix{netip.MustParsePrefix("2001:db8:5::/48")}}}, nil); err != nil {
					t.Fatalf("round %d, metered: SetOwners: %v", round, err)
				}
				if out := nftList(t, ns, "table", "inet", "pcpd"); !strings.Contains(out, "goto control_meter\n\t}\n\tchain owner_") &&
					!strings.Contains(out, "drop\n\t\tgoto control_meter\n\t}") {
					t.Fatalf("round %d, metered: no owner chain going to control_meter:\n%s", round, out)
				}
				if err := metered.Healthy(); err != nil {
					t.Fatalf("round %d, metered: Healthy: %v", round, err)
				}
				plain := newBackend(t, ns, tc.plain)
				if err := plain.Healthy(); err != nil {
					t.Fatalf("round %d, unmetered: Healthy: %v", round, err)
				}
				if out := nftList(t, ns, "table", "inet", "pcpd"); strings.Contains(out, "unowned") || strings.Contains(out, "control_meter") {
					t.Errorf("round %d: unmetered Setup left the unowned chain or control_meter:\n%s", round, out)
				}
			}
		})
	}
}
