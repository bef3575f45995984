package pinhole_test

import (
	"errors"
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestNAPT4HairpinKeepsExternalSource: two clients of pcpd on two served
// interfaces (Client behind lan0, a host behind lan1), each with NAPT
// mappings. A new flow from one client's mapped port to the other's
// public endpoint (hairpinning: both learnt their public endpoints by PCP
// and exchanged them, as peer-to-peer applications do) is DNAT-ed to the
// other client and must reach it from the sender's public endpoint too
// (RFC 4787 REQ-9 a, RFC 5382 REQ-8: hairpinning behaviour "external
// source IP address and port"; RFC 6886 §3.9: outbound flows from the
// mapped port leave as the external port). It did before d42eb88; since,
// `oifname @serving_ifs return` also skips the SNAT of a flow that came
// through a mapping's DNAT: the receiver sees the sender's internal
// address, which its socket, connected to the public endpoint, drops (and
// on one LAN its replies go straight back, bypassing the reverse DNAT).
// Both directions, standalone and attached; a table laid out by d42eb88
// fails Healthy and Setup writes the rule back.
func TestNAPT4HairpinKeepsExternalSource(t *testing.T) {
	for _, attached := range []bool{false, true} {
		name, table, chain := "standalone", "pcpd", "postrouting"
		if attached {
			name, table, chain = "attached", "filter", "pcpd_postrouting"
		}
		t.Run(name, func(t *testing.T) {
			topo, peer, peerAddr, b := servedLAN1(t, "revedgepeer", attached, []netip.Prefix{netip.MustParsePrefix("10.100.1.2/32")})

			type mapping struct{ in, pub netip.AddrPort }
			m := func(a netip.Addr, port uint16) mapping {
				return mapping{netip.AddrPortFrom(a, port), netip.AddrPortFrom(topo.HostPublicV4, 10000+port)}
			}
			// Each round its own mappings: a flow keeps its conntrack
			// binding until idle.
			var ops []pinhole.Op
			for _, base := range []uint16{5000, 5010} {
				for _, x := range []mapping{m(topo.ClientV4, base), m(topo.ClientV4, base+1), m(peerAddr, base+2), m(peerAddr, base+3)} {
					ops = append(ops, install(pinhole.Pinhole{Protocol: udp, InternalAddr: x.in.Addr(), InternalPort: x.in.Port(),
						ExternalAddr: x.pub.Addr(), ExternalPort: x.pub.Port()}, time.Minute))
				}
			}
			apply(t, b, ops...)

			check := func(step string, base uint16) {
				t.Helper()
				for _, tc := range []struct {
					what     string
					from     *netlab.NS
					src, dst mapping
					to       *netlab.NS
				}{
					{"lan0 client → lan1 client's public endpoint", topo.Client, m(topo.ClientV4, base), m(peerAddr, base+2), peer},
					{"lan1 client → lan0 client's public endpoint", peer, m(peerAddr, base+3), m(topo.ClientV4, base+1), topo.Client},
				} {
					got, err := seenVia(t, tc.from, tc.src.in, tc.dst.pub, tc.to, tc.dst.in)
					if err != nil {
						t.Fatalf("%s, %s: %s → %s: nothing reached %s: %v", step, tc.what, tc.src.in, tc.dst.pub, tc.dst.in, err)
					}
					if got != tc.src.pub {
						t.Errorf("%s, %s: %s → %s (DNAT-ed to %s): the receiver saw %v, want the sender's public endpoint %v (RFC 4787 REQ-9)\n%s",
							step, tc.what, tc.src.in, tc.dst.pub, tc.dst.in, got, tc.src.pub, nftList(t, topo.Host, "chain", "inet", table, chain))
					}
				}
			}
			check("fresh layout", 5000)

			// A table laid out by d42eb88 (its rule returned for every
			// flow to a served interface): Healthy reports it, Setup
			// writes the rule back.
			out := topo.Host.MustRun(t, "nft", "-a", "list", "chain", "inet", table, chain)
			h := regexp.MustCompile(`oifname @\S*serving_ifs .*return # handle (\d+)`).FindStringSubmatch(out)
			if h == nil {
				t.Fatalf("no serving_ifs rule in %s:\n%s", chain, out)
			}
			topo.Host.MustRun(t, "nft", "replace", "rule", "inet", table, chain, "handle", h[1],
				"oifname", "@"+strings.TrimSuffix(chain, "postrouting")+"serving_ifs", "return")
			if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
				t.Fatalf("Healthy = %v over d42eb88's postrouting, want ErrUnhealthy", err)
			}
			if err := b.Setup(); err != nil {
				t.Fatalf("Setup: %v", err)
			}
			if err := b.Healthy(); err != nil {
				t.Fatalf("Healthy after Setup: %v", err)
			}
			check("after Setup", 5010)
			nftList(t, topo.Host, "ruleset") // listable
			if attached {
				if err := b.Teardown(); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}
