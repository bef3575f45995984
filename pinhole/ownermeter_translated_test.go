package pinhole_test

import (
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestOwnerMeterTranslatedSources (issue 9, review h/revp64 finding 3):
// with Meter.Unowned (pcpd: the translation prefixes), a source inside
// one, in an owner's prefix, misses the kernel's owners6 map and is
// charged to the unowned bucket, as the policy makes it nobody's; the
// owner's other sources still map to its chain. Owner A holds
// 64:ff9b::/64 (a client given the NAT64 prefix's /64, or the WireGuard
// peer that is the gateway), owner C a /48 holding an operator's NSP
// (--nat64-prefix). The kernel's own lookup (nft get element) places
// each source; a flood from the two translated sources is dropped by the
// unowned chain's limit and by neither owner's, and C's own requests
// still all get through. Without the cut, the translated sources mapped
// to A's and C's chains, and their flood used up A's and C's budgets.
func TestOwnerMeterTranslatedSources(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	pfx, addr := netip.MustParsePrefix, netip.MustParseAddr
	nsp := pfx("2001:db8:77:64::/96")
	b := newBackend(t, topo.Host, pinhole.Config{Meter: pinhole.Meter{Rate: bug4Rate, Burst: bug4Burst, Ports: []uint16{5351}, Size: 2,
		OwnerRate: bug4OwnerRate, OwnerBurst: bug4OwnerBurst, UnownedRate: bug4OwnerRate, UnownedBurst: bug4OwnerBurst,
		Unowned: []netip.Prefix{pfx("64:ff9b::/96"), pfx("64:ff9b:1::/48"), pfx("::/96"), nsp}}})
	serveTunnel(t, b, topo)
	pfxA, pfxC := pfx("64:ff9b::/64"), pfx("2001:db8:77::/48")
	var (
		xlatA = addr("64:ff9b::c633:6402")        // 198.51.100.2 through the well-known prefix
		ownA  = addr("64:ff9b::1:0:1")            // A's, beside 64:ff9b::/96
		xlatC = addr("2001:db8:77:64::c633:6402") // 198.51.100.2 through the NSP
		ownC  = addr("2001:db8:77:100::1")        // C's, another /64
		edgeC = addr("2001:db8:77:64:0:1::")      // C's, just past the NSP
		lastX = addr("2001:db8:77:64::ffff:ffff") // the NSP's last address
		dst   = netip.AddrPortFrom(topo.HostTunnelV6, 5351)
	)
	for _, a := range []netip.Addr{xlatA, ownA, xlatC, ownC} {
		topo.Client.MustRun(t, "ip", "addr", "add", a.String()+"/128", "dev", topo.ClientIf, "nodad")
	}
	for _, p := range []netip.Prefix{pfxA, pfxC} {
		topo.Host.MustRun(t, "ip", "-6", "route", "add", p.String(), "via", topo.ClientV6.String(), "dev", topo.HostLANIf)
	}
	owners := []pinhole.Owner{{ID: "wg:A", Prefixes: []netip.Prefix{pfxA}}, {ID: "static:C", Prefixes: []netip.Prefix{pfxC}}}
	if err := b.SetOwners(owners, nil); err != nil {
		t.Fatal(err)
	}
	if err := b.Healthy(); err != nil {
		t.Fatalf("Healthy: %v", err)
	}
	chains := pinhole.OwnerChains(owners)

	// The kernel's lookup of each source in owners6.
	for _, tc := range []struct {
		src   netip.Addr
		chain string // "": a miss, the unowned bucket
	}{
		{xlatA, ""}, {addr("64:ff9b::"), ""}, {addr("64:ff9b::ffff:ffff"), ""}, {ownA, chains["wg:A"]}, {addr("64:ff9b::1:0:0"), chains["wg:A"]},
		{xlatC, ""}, {nsp.Addr(), ""}, {lastX, ""}, {ownC, chains["static:C"]}, {edgeC, chains["static:C"]}, {addr("2001:db8:77:63:ffff:ffff:ffff:ffff"), chains["static:C"]},
	} {
		out, err := topo.Host.Run("nft", "get", "element", "inet", "pcpd", "owners6", "{", tc.src.String(), "}")
		switch {
		case tc.chain == "" && err == nil:
			t.Errorf("owners6 holds the translated source %v (want a miss, the unowned bucket):\n%s", tc.src, out)
		case tc.chain != "" && (err != nil || !strings.Contains(out, "jump "+tc.chain)):
			t.Errorf("owners6 lookup of %v: want jump %s, got %v:\n%s", tc.src, tc.chain, err, out)
		}
	}

	// A flood from both translated sources: charged to the unowned
	// bucket, not to A's or C's.
	srv := countUDP(t, topo.Host, dst)
	const flood = 300
	sendRoundRobin(t, topo.Client, []netip.Addr{xlatA, xlatC}, dst, flood, srv)
	for _, id := range []string{"wg:A", "static:C"} {
		if out := nftList(t, topo.Host, "chain", "inet", "pcpd", chains[id]); !strings.Contains(out, fmt.Sprintf("burst %d packets counter packets 0 ", bug4OwnerBurst)) {
			t.Errorf("%s's owner chain's limit dropped datagrams of the translated sources' flood:\n%s", id, out)
		}
	}
	out := nftList(t, topo.Host, "chain", "inet", "pcpd", "unowned")
	m := regexp.MustCompile(`limit rate over .* counter packets (\d+) `).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("unowned chain has no limit counter:\n%s", out)
	}
	if n, _ := strconv.Atoi(m[1]); n < flood {
		t.Errorf("unowned chain's limit dropped %d of the %d translated datagrams, want at least %d (their burst is %d):\n%s", n, 2*flood, flood, bug4OwnerBurst, out)
	}
	// C's own requests: all through (another /64, its bucket untouched).
	if n, _ := sendRoundRobin(t, topo.Client, []netip.Addr{ownC}, dst, bug4Burst/2, srv); n != bug4Burst/2 {
		t.Errorf("%d from C's own %v after the translated flood: socket got %d, want all", bug4Burst/2, ownC, n)
	}
}
