package pinhole_test

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestNAPT4SNATOnlyTowardsWAN: the SNAT companion of an IPv4 NAPT mapping
// (two-way NAPT, RFC 6886 §3.9) translates a new outbound flow from the
// mapped internal address and port only when it leaves through an
// interface pcpd does not serve (the WAN): the Internet sees the external
// address and port, while a host behind another served interface (lan1:
// another client, a served LAN) sees the client's own address and port,
// unfiltered and filtered mappings alike, standalone and attached. Then
// the upgrade: a table laid out by an older pcpd (postrouting without the
// serving_ifs rule) translates the flow to lan1 too, Healthy reports the
// chain as damaged, and Setup writes the rule back; the ruleset stays
// listable throughout. Fails without the rule: lan1's host sees
// 198.51.100.1 and the mapping's external port.
func TestNAPT4SNATOnlyTowardsWAN(t *testing.T) {
	for _, attached := range []bool{false, true} {
		name, table, chain := "standalone", "pcpd", "postrouting"
		if attached {
			name, table, chain = "attached", "filter", "pcpd_postrouting"
		}
		t.Run(name, func(t *testing.T) {
			topo, peer, peerAddr, b := servedLAN1(t, "edgepeer", attached, nil)

			in := netip.AddrPortFrom(topo.ClientV4, 5000)
			pub := netip.AddrPortFrom(topo.HostPublicV4, 15000)
			p := pinhole.Pinhole{Protocol: udp, InternalAddr: in.Addr(), InternalPort: in.Port(),
				ExternalAddr: pub.Addr(), ExternalPort: pub.Port()}
			inF := netip.AddrPortFrom(topo.ClientV4, 5001)
			pubF := netip.AddrPortFrom(topo.HostPublicV4, 15001)
			f := pinhole.Pinhole{Protocol: udp, InternalAddr: inF.Addr(), InternalPort: inF.Port(),
				ExternalAddr: pubF.Addr(), ExternalPort: pubF.Port(),
				// The filter admits both remotes: only the interface
				// tells them apart.
				RemotePrefix: netip.MustParsePrefix("0.0.0.0/0")}
			apply(t, b, install(p, time.Minute), install(f, time.Minute))

			// Each check a new flow: another reflector port each time
			// (a flow keeps its conntrack binding until idle).
			port := uint16(7100)
			check := func(step string, lanSNAT bool) {
				t.Helper()
				for _, m := range []struct {
					what    string
					in, pub netip.AddrPort
				}{{"unfiltered", in, pub}, {"filtered", inF, pubF}} {
					port++
					if got, err := seenFrom(t, topo, m.in, port); err != nil || got != m.pub {
						t.Fatalf("%s, %s %s → %s: the Internet (wan0) saw %v (%v), want %v", step, m.what, m.in, m.pub, got, err, m.pub)
					}
					port++
					want := m.in
					if lanSNAT {
						want = m.pub
					}
					to := netip.AddrPortFrom(peerAddr, port)
					if got, err := seenVia(t, topo.Client, m.in, to, peer, to); err != nil || got != want {
						t.Fatalf("%s, %s %s → %s: the host behind served lan1 saw %v (%v), want %v\n%s", step, m.what, m.in, m.pub, got, err, want,
							nftList(t, topo.Host, "chain", "inet", table, chain))
					}
				}
			}
			check("fresh layout", false)
			nftList(t, topo.Host, "ruleset") // listable

			// An older pcpd's postrouting: this one without the rule.
			deleteRule(t, topo.Host, table, chain, `oifname @\S*serving_ifs .*return `)
			check("older layout", true)
			if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
				t.Fatalf("Healthy = %v over postrouting without the serving_ifs rule, want ErrUnhealthy", err)
			}
			if err := b.Setup(); err != nil {
				t.Fatalf("Setup: %v", err)
			}
			if err := b.Healthy(); err != nil {
				t.Fatalf("Healthy after Setup: %v", err)
			}
			check("after Setup", false)
			nftList(t, topo.Host, "ruleset")
			if attached {
				if err := b.Teardown(); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

// servedLAN1 is the bed of the SNAT tests: the topology plus a second
// served side, lan1, towards a host at 10.100.1.2 in its own namespace
// (as another WireGuard peer, or a host on a served LAN), and a backend
// (attached inside adminRuleset, or standalone) protecting the client's
// prefixes and extra, serving the client's side and lan1.
func servedLAN1(t *testing.T, name string, attached bool, extra []netip.Prefix) (*netlab.Topology, *netlab.NS, netip.Addr, *pinhole.Backend) {
	t.Helper()
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	peer := netlab.NewNS(t, name)
	if err := netlab.Veth(topo.Host, "lan1", peer, "eth0"); err != nil {
		t.Fatal(err)
	}
	topo.Host.MustRun(t, "ip", "addr", "add", "10.100.1.1/24", "dev", "lan1")
	peer.MustRun(t, "ip", "addr", "add", "10.100.1.2/24", "dev", "eth0")
	peer.MustRun(t, "ip", "route", "add", "default", "via", "10.100.1.1")
	peerAddr := netip.MustParseAddr("10.100.1.2")

	cfg := pinhole.Config{}
	if attached {
		loadNft(t, topo.Host, adminRuleset) // its forward chain accepts what lan0 sends
		cfg = pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd"}
	}
	b := newBackend(t, topo.Host, cfg)
	if err := b.SetProtected(append([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}, extra...)); err != nil {
		t.Fatal(err)
	}
	setServed(t, b, []string{topo.HostLANIf, "lan1"}, topo.HostTunnelV4, netip.MustParseAddr("10.100.1.1"))
	return topo, peer, peerAddr, b
}
