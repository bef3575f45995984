package pinhole_test

import (
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestCutsFlowsRestartAfterUpgrade (review h/revnatcut, finding 4; as
// TestNATCutRestartAfterUpgrade for the DNAT kinds): a flow a pinhole
// admitted through guard6's unlabelled admission rule (a table laid out
// before cutflows.go) outlives the upgrade's first Setup, which finds the
// rule unlabelled (CutsFlows false: the server waits for its walk), and
// then a second pcpd start: its Setup finds the labelled guard6 the first
// wrote, and CutsFlows was true again while the unlabelled flow lived, so
// the pinhole's delete was answered without the walk and the flow carried
// data after it. Now the first Setup of a Backend over an existing table
// also asks conntrack (pinFlowsUnlabelled): a forwarded, non-ICMPv6,
// not DNAT-ed IPv6 flow to a protected address without flowLabel keeps
// CutsFlows false; once no such flow is left, the next start cuts again.
// Before the fix the "second start" row says true.
func TestCutsFlowsRestartAfterUpgrade(t *testing.T) {
	for _, proto := range []uint8{tcp, udp} {
		t.Run(protoName(proto), func(t *testing.T) {
			topo, b := guardedTopology(t, pinhole.Config{})
			client := netip.AddrPortFrom(topo.ClientV6, 7301)
			remote := netip.AddrPortFrom(topo.InternetV6, 47301)
			p := pinhole.Pinhole{Protocol: proto, InternalAddr: client.Addr(), InternalPort: client.Port()}
			cuts := func(step string, nb *pinhole.Backend, want bool) {
				t.Helper()
				if got := nb.CutsFlows(p); got != want {
					t.Errorf("%s: CutsFlows = %v, want %v", step, got, want)
				}
			}
			unlabelAdmission(t, topo.Host, "pin6") // the table as main laid it out
			apply(t, b, install(p, time.Hour))
			f := openEcho(t, proto, topo.Client, topo.Internet, remote, client)
			cuts("upgrade", newBackend(t, topo.Host, pinhole.Config{}), false)
			nb := newBackend(t, topo.Host, pinhole.Config{})
			cuts("second start, the unlabelled flow alive", nb, false)
			if markedChecked(t, topo.Host, "recheck6") {
				t.Error("second start: recheck6 marked checked with an unlabelled flow alive")
			}
			apply(t, nb, del(p))
			if err := f.echo(okWait); err != nil {
				t.Errorf("the unlabelled flow: %v; want it to go on (only the walk ends it: the server must wait for it)", err)
			}
			if err := topo.Host.Do(func() error { return netlink.ConntrackTableFlush(netlink.ConntrackTable) }); err != nil {
				t.Fatal(err)
			}
			cuts("third start, no unlabelled flow left", newBackend(t, topo.Host, pinhole.Config{}), true)
			if !markedChecked(t, topo.Host, "recheck6") {
				t.Error("third start: recheck6 not marked checked")
			}
		})
	}
}

// TestCutsFlowsRestartSparesOtherFlows: the conntrack check of a start
// (pinFlowsUnlabelled) counts only the flows guard6's admission rules
// would have admitted: each row is one conntrack entry (made over
// ctnetlink) in the namespace of a labelled table, and a start's
// CutsFlows must stay true for all but the unlabelled pinhole flows.
// ICMPv6 flows (the echo rule, errors), the client's own outbound flows,
// the host's own flows to and from a client (the host's LAN address lies
// in the client's protected prefix here) and DNAT-ed ones (redirects,
// accepted by "ct status dnat") never pass an admission rule.
func TestCutsFlowsRestartSparesOtherFlows(t *testing.T) {
	topo, _ := guardedTopology(t, pinhole.Config{})
	client, remote := topo.ClientV6, topo.InternetV6
	host := topo.HostTunnelV6 // 2001:db8:1:2::1, in ClientPrefix6
	if !topo.ClientPrefix6.Contains(host) {
		t.Fatalf("the host's LAN address %v is not in %v: the host-flow rows test nothing", host, topo.ClientPrefix6)
	}
	ap := netip.AddrPortFrom
	const seen = 2 | 4 // IPS_SEEN_REPLY | IPS_ASSURED
	label := func(bit int) []byte { l := make([]byte, 16); l[bit/8] = 1 << (bit % 8); return l }
	for _, tc := range []struct {
		name string
		e    ctEntry
		cuts bool
	}{
		{"remote to client, unlabelled", ctEntry{proto: tcp, src: ap(remote, 40000), dst: ap(client, 80), status: seen}, false},
		{"remote to client, unlabelled, not replied yet", ctEntry{proto: udp, src: ap(remote, 40000), dst: ap(client, 80)}, false},
		{"remote to client, flowLabel", ctEntry{proto: tcp, src: ap(remote, 40000), dst: ap(client, 80), status: seen, labels: label(127)}, true},
		{"remote to client, ICMPv6 echo", ctEntry{proto: 58, src: ap(remote, 0), dst: ap(client, 0), status: seen}, true},
		{"client to remote (its own)", ctEntry{proto: tcp, src: ap(client, 40000), dst: ap(remote, 80), status: seen}, true},
		{"client to the host's LAN address", ctEntry{proto: udp, src: ap(client, 40000), dst: ap(host, 5351), status: seen}, true},
		{"the host's LAN address to client", ctEntry{proto: tcp, src: ap(host, 40000), dst: ap(client, 22), status: seen}, true},
		{"remote to elsewhere", ctEntry{proto: tcp, src: ap(remote, 40000), dst: ap(netip.MustParseAddr("2001:db8:9::1"), 80), status: seen}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := topo.Host.Do(func() error { return netlink.ConntrackTableFlush(netlink.ConntrackTable) }); err != nil {
				t.Fatal(err)
			}
			ctFill(t, topo.Host, 1, func(int) ctEntry { return tc.e })
			unmarkChecked(t, topo.Host, "recheck6") // else the start does not ask
			p := pinhole.Pinhole{Protocol: tcp, InternalAddr: client, InternalPort: 80}
			if got := newBackend(t, topo.Host, pinhole.Config{}).CutsFlows(p); got != tc.cuts {
				t.Errorf("CutsFlows = %v, want %v", got, tc.cuts)
			}
		})
	}
}

// TestStartChecksConntrackOnlyUnmarked (BENCHMARKS.md item 49): a Setup
// that knows no unlabelled flow is alive (a new table here) marks the last
// rule of recheck6 and of recheck_nat with a comment, and a start over
// marked chains with labelled rules does not read conntrack: an unlabelled
// remote-to-client entry (made over ctnetlink: no rule could have let it
// in after the mark) leaves CutsFlows true. Without recheck6's mark the
// start reads conntrack, finds it (false) and writes no mark; recheck_nat
// keeps its own. Once conntrack holds no such flow, the next start cuts
// and marks again.
func TestStartChecksConntrackOnlyUnmarked(t *testing.T) {
	topo, _ := guardedTopology(t, pinhole.Config{})
	p := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: 80}
	for _, chain := range []string{"recheck6", "recheck_nat"} {
		if !markedChecked(t, topo.Host, chain) {
			t.Fatalf("a new table: %s not marked checked", chain)
		}
	}
	ctFill(t, topo.Host, 1, func(int) ctEntry {
		return ctEntry{proto: tcp, src: netip.AddrPortFrom(topo.InternetV6, 40000), dst: netip.AddrPortFrom(topo.ClientV6, 80), status: 2 | 4}
	})
	if !newBackend(t, topo.Host, pinhole.Config{}).CutsFlows(p) {
		t.Error("marked: CutsFlows = false; want true (no conntrack read)")
	}
	unmarkChecked(t, topo.Host, "recheck6")
	if newBackend(t, topo.Host, pinhole.Config{}).CutsFlows(p) {
		t.Error("unmarked, an unlabelled flow: CutsFlows = true; want false")
	}
	if markedChecked(t, topo.Host, "recheck6") || !markedChecked(t, topo.Host, "recheck_nat") {
		t.Errorf("after a start that found an unlabelled pinhole flow: recheck6 marked %v (want false), recheck_nat %v (want true)",
			markedChecked(t, topo.Host, "recheck6"), markedChecked(t, topo.Host, "recheck_nat"))
	}
	if err := topo.Host.Do(func() error { return netlink.ConntrackTableFlush(netlink.ConntrackTable) }); err != nil {
		t.Fatal(err)
	}
	if !newBackend(t, topo.Host, pinhole.Config{}).CutsFlows(p) {
		t.Error("no unlabelled flow left: CutsFlows = false")
	}
	if !markedChecked(t, topo.Host, "recheck6") {
		t.Error("no unlabelled flow left: recheck6 not marked again")
	}
}

// markedRE finds a rule marked checked (pinhole's checkedMark) in a
// chain listed with handles.
var markedRE = regexp.MustCompile(`\n\s*([^\n]*?) comment "pcpd: no flow [^"]*" # handle (\d+)`)

// markedChecked reports whether pcpd's chain has a rule marked checked.
func markedChecked(t testing.TB, ns *netlab.NS, chain string) bool {
	t.Helper()
	return markedRE.MatchString(ns.MustRun(t, "nft", "-a", "list", "chain", "inet", "pcpd", chain))
}

// unmarkChecked rewrites chain's marked rule, if any, without the mark (a
// layout an earlier pcpd wrote).
func unmarkChecked(t testing.TB, ns *netlab.NS, chain string) {
	t.Helper()
	out := ns.MustRun(t, "nft", "-a", "list", "chain", "inet", "pcpd", chain)
	m := markedRE.FindStringSubmatch(out)
	if m == nil {
		return
	}
	ns.MustRun(t, "sh", "-c", "nft replace rule inet pcpd "+chain+" handle "+m[2]+" "+strings.TrimSpace(m[1]))
}

// TestCutsFlowsAfterDamageRepair: guard6 flushed (damage) lets a flow to
// a pinhole's port in through the forward chain's accept, unlabelled.
// Healthy reports the damage and a Setup repairs the layout: that Setup
// reads conntrack again, whatever recheck6's mark says (recheckFlows), so
// CutsFlows stays false while the flow lives (it goes on after the
// pinhole's delete: only the walk ends it), no mark is written and the
// next start reads conntrack too. Without the re-read the repair left
// CutsFlows true (the first Setup had asked), wrote the mark, and the
// next start trusted it: both said true.
func TestCutsFlowsAfterDamageRepair(t *testing.T) {
	topo, b, client, p := guardedPinhole(t, 7302)
	topo.Host.MustRun(t, "nft", "flush", "chain", "inet", "pcpd", "guard6")
	f := openEcho(t, tcp, topo.Client, topo.Internet, netip.AddrPortFrom(topo.InternetV6, 47302), client)
	if err := b.Healthy(); err == nil {
		t.Fatal("Healthy = nil with guard6 flushed")
	}
	if err := b.Setup(); err != nil {
		t.Fatal(err)
	}
	if b.CutsFlows(p) {
		t.Error("repaired, a flow the damaged guard6 let in alive: CutsFlows = true, want false")
	}
	if markedChecked(t, topo.Host, "recheck6") {
		t.Error("repaired: recheck6 marked checked with an unlabelled flow alive")
	}
	if newBackend(t, topo.Host, pinhole.Config{}).CutsFlows(p) {
		t.Error("the next start: CutsFlows = true, want false")
	}
	apply(t, b, del(p))
	if err := f.echo(okWait); err != nil {
		t.Errorf("the unlabelled flow: %v; want it to go on (only the walk ends it)", err)
	}
}

// TestCutsFlowsAfterDamageWhileDown (review h/revops): as
// TestCutsFlowsAfterDamageRepair, but guard6 is flushed while no pcpd
// runs (the Backend closed, the table kept as a stop keeps it), so no
// Healthy saw the damage: a flow let in unlabelled through the flushed
// guard6 is alive at the next start, over a recheck6 still marked
// checked by the Setup before the stop.
func TestCutsFlowsAfterDamageWhileDown(t *testing.T) {
	topo, b, client, p := guardedPinhole(t, 7303)
	b.Close()
	if !markedChecked(t, topo.Host, "recheck6") {
		t.Fatal("recheck6 not marked checked before the stop")
	}
	topo.Host.MustRun(t, "nft", "flush", "chain", "inet", "pcpd", "guard6")
	f := openEcho(t, tcp, topo.Client, topo.Internet, netip.AddrPortFrom(topo.InternetV6, 47303), client)
	b2 := newBackend(t, topo.Host, pinhole.Config{})
	if b2.CutsFlows(p) {
		t.Error("a start over a guard6 flushed while down, a flow it let in unlabelled alive: CutsFlows = true, want false")
	}
	if markedChecked(t, topo.Host, "recheck6") {
		t.Error("recheck6 still marked checked with an unlabelled flow alive")
	}
	_ = f
}
