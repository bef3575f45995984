package pinhole_test

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestAttachedCutBitSharedElsewhere (review h/revattcut, finding 1): the
// label bit is a hash of names (attachedLabel: 64-125; natLabelFor, a
// standalone table's other than "pcpd": 64-125 too), and a base chain
// that re-checks a bit sees every packet the host receives. An attached
// pcpd (table filter, chain pcpd_wan: bit 121) beside a standalone pcpd
// of table "natpmp" (bit 121), which guards nothing: the standalone's
// natcut sends every established flow carrying 121 to its own
// recheck_nat (it has no "ct status dnat" test), which admits none of the
// attached pcpd's flows, so the attached pcpd's live IPv6 pinhole and
// NAPT flows are dropped after their first round trip. Now a Setup that
// finds the bit used by a rule that is not its own (another pcpd's, or
// an admin's) lays out without the cut (natCut or the attached cut off:
// bitTaken), and both pcpds' flows carry data; the later one's deletes
// wait for the walk (CutsFlows false). On h/attcut the first echo of
// each flow times out.
func TestAttachedCutBitSharedElsewhere(t *testing.T) {
	for _, order := range []string{"attached first", "standalone first", "admin's rule, restart"} {
		t.Run(order, func(t *testing.T) {
			topo := netlab.NewTopology(t, netlab.TopologyOptions{})
			rs := strings.NewReplacer("chain pcpd {", "chain pcpd_wan {", "jump pcpd\n", "jump pcpd_wan\n",
				"HOSTPUB", topo.HostPublicV4.String(), "CLIENT4", topo.ClientV4.String(), "CLIENT6", topo.ClientV6.String()).Replace(attCutRuleset)
			loadNft(t, topo.Host, rs)
			cfg := pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd_wan"}
			var other *pinhole.Backend
			if order == "standalone first" {
				other = newBackend(t, topo.Host, pinhole.Config{Table: "natpmp"})
			}
			b := newBackend(t, topo.Host, cfg)
			serveTunnel(t, b, topo)
			if err := b.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
				t.Fatal(err)
			}
			switch order {
			case "attached first":
				other = newBackend(t, topo.Host, pinhole.Config{Table: "natpmp"})
			case "admin's rule, restart":
				// The admin labels its forwarded flows with bit 121 too,
				// and pcpd starts again over its labelled layout.
				topo.Host.MustRun(t, "nft", "insert", "rule", "inet", "filter", "forward", "ct", "label", "set", "121")
				b.Close()
				b = newBackend(t, topo.Host, cfg)
			}
			pin, napt, flows := pinAndNAPT(t, topo, b, 7600)
			flows = append(flows, []attFlow{
				{name: "admin's own open port", f: openEcho(t, tcp, topo.Client, topo.Internet, netip.AddrPortFrom(topo.InternetV6, 47650),
					netip.AddrPortFrom(topo.ClientV6, 7350))},
			}...)
			for i := range 3 {
				checkAttFlows(t, topo.Host, fmt.Sprintf("round %d", i+1), flows)
			}
			// Who yielded: the later one, whose CutsFlows is false.
			m4 := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV4, InternalPort: 1, ExternalAddr: topo.HostPublicV4, ExternalPort: 2}
			attCuts, otherCuts := b.CutsFlows(pin) && b.CutsFlows(napt), other != nil && other.CutsFlows(m4)
			wantAtt, wantOther := order == "attached first", order == "standalone first"
			if attCuts != wantAtt || otherCuts != wantOther {
				t.Errorf("CutsFlows: attached %v, natpmp %v; want %v, %v", attCuts, otherCuts, wantAtt, wantOther)
			}
			if out := nftList(t, topo.Host, "table", "inet", "filter"); !wantAtt && strings.Contains(out, "pcpd_wan_cut") {
				t.Errorf("the yielding attached pcpd left pcpd_wan_cut:\n%s", out)
			}
			if t.Failed() {
				t.Logf("%s", nftList(t, topo.Host, "ruleset"))
			}
			apply(t, b, del(pin), del(napt))
			if wantAtt {
				checkAttFlows(t, topo.Host, "deleted", []attFlow{{name: "IPv6 pinhole", f: flows[0].f, cut: true}})
			}
		})
	}
}

// TestAttachedStaleCutChainsRemoved (labelbit.go, queueStaleCutRemoval):
// a Setup whose layout has less of the cut than the table's (natcut
// refused, or the labels: as when the bit is taken at a restart) removes
// the chains it no longer writes, in the same transaction, and is
// healthy; pcpd_cut kept without its nat rule no longer points at
// pcpd_recheck_nat (which could not be deleted while it did: EBUSY).
func TestAttachedStaleCutChainsRemoved(t *testing.T) {
	for _, tc := range []struct {
		name   string
		refuse func(*pinhole.Backend)
		gone   []string
	}{
		{"natcut refused", pinhole.RefuseNATCut, []string{"pcpd_recheck_nat"}},
		{"labels refused", pinhole.RefuseLabels, []string{"pcpd_cut", "pcpd_recheck6", "pcpd_recheck_nat"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			topo := netlab.NewTopology(t, netlab.TopologyOptions{})
			loadNft(t, topo.Host, adminRuleset)
			cfg := pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd"}
			newBackend(t, topo.Host, cfg).Close()
			conn, err := topo.Host.NftConn()
			if err != nil {
				t.Fatal(err)
			}
			cfg.Routes = nsRoutes(t, topo.Host)
			b, err := pinhole.New(conn, cfg)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(b.Close)
			tc.refuse(b)
			if err := b.Setup(); err != nil {
				t.Fatalf("Setup: %v", err)
			}
			if err := b.Healthy(); err != nil {
				t.Errorf("Healthy: %v", err)
			}
			out := nftList(t, topo.Host, "table", "inet", "filter")
			for _, c := range tc.gone {
				if strings.Contains(out, "chain "+c+" ") {
					t.Errorf("chain %s left:\n%s", c, out)
				}
			}
		})
	}
}
