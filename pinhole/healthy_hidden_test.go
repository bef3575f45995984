package pinhole_test

import (
	"errors"
	"fmt"
	"net/netip"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
	"golang.org/x/sys/unix"
)

// TestHealthyHiddenExpression (review6 F1, pre-existing, not fixed by
// a409d66's value-for-value compare): the nftables library (v0.3.0) skips
// the expressions it cannot decode ("rt", "socket", "osf", "xfrm",
// "byteorder", "tproxy", "dup", "last", "inner", ...) when it lists a
// rule, so Healthy compares what is left. An "rt ip nexthop" load put in
// front of guard6's final drop breaks the rule for every IPv6 packet (the
// kernel's nft_rt_get_eval: NFT_BREAK when the family is not IPv4): the
// drop is gone, unsolicited traffic reaches the protected client, and the
// listing, without the rt expression, is exactly what Setup wrote.
func TestHealthyHiddenExpression(t *testing.T) {
	topo, b := guardedTopology(t, pinhole.Config{})
	defer b.Teardown()
	dst := netip.AddrPortFrom(topo.ClientV6, 7000)
	serve(t, topo.Client, udp, dst)
	mustNotReach(t, "intact guard", topo.Internet, udp, netip.Addr{}, dst)

	conn, table, chain, rules := chainRules(t, topo.Host, "guard6")
	last := rules[len(rules)-1]
	if len(last.Exprs) != 1 {
		t.Fatalf("guard6's last rule is not a bare verdict: %#v", last.Exprs)
	}
	conn.ReplaceRule(&nftables.Rule{Table: table, Chain: chain, Handle: last.Handle, Exprs: []expr.Any{
		&expr.Rt{Register: unix.NFT_REG_1, Key: expr.RtNexthop4},
		&expr.Verdict{Kind: expr.VerdictDrop},
	}})
	if err := conn.Flush(); err != nil {
		t.Fatalf("replace guard6's drop: %v", err)
	}
	if err := reach(topo.Internet, udp, netip.Addr{}, dst, okWait); err != nil {
		t.Logf("the tampered guard still drops (%v); the check below is what matters", err)
	} else {
		t.Logf("the tampered guard6 lets unsolicited traffic through to %v", dst)
	}
	if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
		t.Errorf("Healthy = %v after guard6's drop got a hidden \"rt ip nexthop\" in front (listed by nft as:\n%s)",
			err, nftList(t, topo.Host, "chain", "inet", "pcpd", "guard6"))
	}
}

// TestHealthyTableDormant (review6 F2, pre-existing): "nft add table inet
// pcpd { flags dormant; }" unregisters every base chain of pcpd's table:
// the guards, the DNAT and the request meter are all off, while every
// chain, set and rule is still listed as Setup wrote it. Healthy looks
// the table up but never at its flags, so it reports the table healthy.
// Setup's AddTable (flags 0) would wake it.
func TestHealthyTableDormant(t *testing.T) {
	topo, b := guardedTopology(t, pinhole.Config{})
	defer b.Teardown()
	dst := netip.AddrPortFrom(topo.ClientV6, 7000)
	serve(t, topo.Client, udp, dst)
	mustNotReach(t, "intact guard", topo.Internet, udp, netip.Addr{}, dst)

	topo.Host.MustRun(t, "nft", "add", "table", "inet", "pcpd", "{ flags dormant; }")
	if err := reach(topo.Internet, udp, netip.Addr{}, dst, okWait); err != nil {
		t.Logf("the dormant table still drops (%v)", err)
	} else {
		t.Logf("the dormant table lets unsolicited traffic through to %v", dst)
	}
	if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
		t.Fatalf("Healthy = %v with pcpd's table dormant", err)
	}
	if err := b.Setup(); err != nil {
		t.Fatal(err)
	}
	if err := b.Healthy(); err != nil {
		t.Errorf("after Setup: Healthy = %v", err)
	}
	mustNotReach(t, "after Setup", topo.Internet, udp, netip.Addr{}, dst)
}

// TestOwnerChainHiddenExpression (review6 F1, owner chains): an "rt"
// load in front of an owner chain's limit breaks the rule in the raw
// prerouting hook (no route yet: NFT_BREAK), so the owner's flood is no
// longer limited, while the chain lists as written. Healthy must report
// it (ErrOwnerMeter), RepairOwners must rewrite it (not keep it as
// intact), and learnListed must never take it as the listing.
func TestOwnerChainHiddenExpression(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	b := meteredTunnel(t, topo, nil)
	defer b.Teardown()
	owners := []pinhole.Owner{{ID: "static:x", Prefixes: []netip.Prefix{netip.MustParsePrefix("10.77.0.0/16")}}}
	if err := b.SetOwners(owners, nil); err != nil {
		t.Fatal(err)
	}
	if err := b.Healthy(); err != nil {
		t.Fatalf("Healthy on an intact table: %v", err)
	}
	name := pinhole.OwnerChains(owners)["static:x"]
	hide := func() {
		t.Helper()
		conn, table, chain, rules := chainRules(t, topo.Host, name)
		last := rules[len(rules)-2] // the limit; then goto control_meter
		if _, ok := last.Exprs[0].(*expr.Limit); !ok {
			t.Fatalf("%s's last rule but one is not the limit: %#v", chain.Name, last.Exprs)
		}
		conn.ReplaceRule(&nftables.Rule{Table: table, Chain: chain, Handle: last.Handle,
			Exprs: append([]expr.Any{&expr.Rt{Register: unix.NFT_REG_1, Key: expr.RtClassid}}, last.Exprs...)})
		if err := conn.Flush(); err != nil {
			t.Fatalf("replace %s's limit: %v", chain.Name, err)
		}
	}
	hide()
	if err := b.Healthy(); !errors.Is(err, pinhole.ErrOwnerMeter) {
		t.Fatalf("Healthy = %v after %s's limit got a hidden \"rt classid\" in front, want ErrOwnerMeter", err, name)
	}
	if err := b.RepairOwners(); err != nil {
		t.Fatal(err)
	}
	if err := b.Healthy(); err != nil {
		t.Errorf("after RepairOwners: Healthy = %v (the hidden expression kept as intact?)\n%s", err,
			nftList(t, topo.Host, "chain", "inet", "pcpd", name))
	}
}

// TestHealthyEntryChainUnhooked (review6 F3, pre-existing): Healthy finds
// pcpd's chains by name only. The forward chain deleted and made again
// as a regular chain (no hook) with the same rules is never run: every
// guard is off, yet every chain is present and lists what Setup wrote.
// The chains' type, hook, priority and policy must be compared too.
func TestHealthyEntryChainUnhooked(t *testing.T) {
	topo, b := guardedTopology(t, pinhole.Config{})
	defer b.Teardown()
	dst := netip.AddrPortFrom(topo.ClientV6, 7000)
	serve(t, topo.Client, udp, dst)
	mustNotReach(t, "intact guard", topo.Internet, udp, netip.Addr{}, dst)

	conn, table, entry, rules := chainRules(t, topo.Host, "forward")
	conn.FlushChain(entry)
	conn.DelChain(entry)
	regular := conn.AddChain(&nftables.Chain{Table: table, Name: "forward"})
	for _, r := range rules {
		conn.AddRule(&nftables.Rule{Table: table, Chain: regular, Exprs: r.Exprs})
	}
	if err := conn.Flush(); err != nil {
		t.Fatalf("unhook forward: %v", err)
	}
	if err := reach(topo.Internet, udp, netip.Addr{}, dst, okWait); err != nil {
		t.Logf("the unhooked entry chain still drops (%v)", err)
	} else {
		t.Logf("with forward unhooked, unsolicited traffic reaches %v", dst)
	}
	if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
		t.Fatalf("Healthy = %v with the forward chain a regular chain:\n%s", err, nftList(t, topo.Host, "chain", "inet", "pcpd", "forward"))
	}
	if err := b.Setup(); err != nil {
		t.Fatalf("Setup (the repair): %v", err)
	}
	if err := b.Healthy(); err != nil {
		t.Errorf("after Setup: Healthy = %v", err)
	}
	mustNotReach(t, "after Setup", topo.Internet, udp, netip.Addr{}, dst)
}

// chainRules is a connection to ns's nftables and the rules of chain name
// of pcpd's table (at least one), for a test to tamper with.
func chainRules(t *testing.T, ns *netlab.NS, name string) (*nftables.Conn, *nftables.Table, *nftables.Chain, []*nftables.Rule) {
	t.Helper()
	conn, err := ns.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	table := &nftables.Table{Name: "pcpd", Family: nftables.TableFamilyINet}
	chain := &nftables.Chain{Table: table, Name: name}
	rules, err := conn.GetRules(table, chain)
	if err != nil || len(rules) == 0 {
		t.Fatalf("rules of %s: %d, %v", name, len(rules), err)
	}
	return conn, table, chain, rules
}

// TestHealthyRuleReplacedMidCheckL3 (review8, review7's L3): Healthy
// dumps the table's expression counts once, then reads each chain's rules;
// a rule whose handle the count dump did not see was taken as intact
// (rawrules.go: "the next read tells"). A tamper that re-creates guard6's
// drop with a hidden "rt ip nexthop" under a new handle (a rule added
// after it and the old one deleted, one transaction: the chain never
// lacks it), over and over, is such a rule at every check, so it passed
// every check for as long as it kept going while unsolicited traffic
// reached the client. Kept going, it is also gone again by the time
// getRules dumps the chain once more. One replaced in place keeps its
// handle: the count dump's figure is the intact rule's, so this check
// passes it, and the next one (the tamper no longer between its dumps)
// must not.
func TestHealthyRuleReplacedMidCheckL3(t *testing.T) {
	hidden := []expr.Any{&expr.Rt{Register: unix.NFT_REG_1, Key: expr.RtNexthop4}, &expr.Verdict{Kind: expr.VerdictDrop}}
	for _, c := range []struct {
		name             string
		newHandle, churn bool
	}{
		{"re-created under a new handle", true, false},
		{"re-created over and over", true, true},
		{"replaced in place", false, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			topo, b := guardedTopology(t, pinhole.Config{})
			defer b.Teardown()
			if err := b.Healthy(); err != nil {
				t.Fatalf("Healthy on an intact table: %v", err)
			}
			conn, table, chain, _ := chainRules(t, topo.Host, "guard6")
			recreate := func() error {
				rules, err := conn.GetRules(table, chain)
				if err != nil || len(rules) == 0 {
					return fmt.Errorf("rules of guard6: %d, %w", len(rules), err)
				}
				last := rules[len(rules)-1]
				if c.newHandle {
					conn.AddRule(&nftables.Rule{Table: table, Chain: chain, Position: last.Handle, Exprs: hidden})
					if err := conn.DelRule(last); err != nil {
						return err
					}
				} else {
					conn.ReplaceRule(&nftables.Rule{Table: table, Chain: chain, Handle: last.Handle, Exprs: hidden})
				}
				return conn.Flush()
			}
			stop, churned := make(chan struct{}), make(chan error, 1)
			tamper := func() {
				if err := recreate(); err != nil {
					t.Fatalf("tamper with guard6's drop: %v", err)
				}
				if !c.churn {
					close(churned)
					return
				}
				go func() {
					for {
						select {
						case <-stop:
							churned <- nil
							return
						default:
						}
						if err := recreate(); err != nil {
							churned <- err
							return
						}
					}
				}()
			}
			err := pinhole.CheckRulesReplacedMidway(b, tamper)
			if c.newHandle && !errors.Is(err, pinhole.ErrUnhealthy) {
				t.Errorf("check = %v with guard6's drop re-created with a hidden expression between its dumps (listed as:\n%s)",
					err, nftList(t, topo.Host, "chain", "inet", "pcpd", "guard6"))
			}
			if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
				t.Errorf("the next Healthy = %v, want ErrUnhealthy", err)
			}
			close(stop)
			if err := <-churned; err != nil {
				t.Fatalf("tamper with guard6's drop: %v", err)
			}
		})
	}
}
