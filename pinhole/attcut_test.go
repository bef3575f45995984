package pinhole_test

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// attCutRuleset is an admin's ruleset for the attached cut tests
// (attcut.go): adminRuleset's default-drop forward chain, which accepts
// established flows before it jumps to pcpd, plus the admin's own
// traffic to the client: a port the admin opens itself (IPv6 7350,
// before "jump pcpd") and a port forward of the admin's own (the
// public address's 18000 to the client's IPv4 8000, DNAT-ed before
// pcpd's NAT chain); and every forwarded flow labelled with a low bit
// (5) of the admin's, as connlabel.conf users number theirs.
const attCutRuleset = `table inet filter {
	chain pcpd {
	}

	chain pcpd2 {
	}

	chain admin_nat {
		type nat hook prerouting priority dstnat - 10; policy accept;
		ip daddr HOSTPUB tcp dport 18000 dnat ip to CLIENT4:8000
	}

	chain forward {
		type filter hook forward priority filter; policy drop;
		ct label set 5
		ct state established,related accept
		iifname "lan0" accept
		ip6 daddr CLIENT6 tcp dport 7350 accept
		jump pcpd
		jump pcpd2
	}
}
`

// attachedCut is the three-namespace topology with attCutRuleset on Host
// and pcpd attached to it (chain pcpd), guarding Client's prefixes.
func attachedCut(t *testing.T) (*netlab.Topology, *pinhole.Backend) {
	t.Helper()
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	loadNft(t, topo.Host, strings.NewReplacer("HOSTPUB", topo.HostPublicV4.String(), "CLIENT4", topo.ClientV4.String(),
		"CLIENT6", topo.ClientV6.String()).Replace(attCutRuleset))
	b := newBackend(t, topo.Host, pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd"})
	serveTunnel(t, b, topo)
	if err := b.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
		t.Fatal(err)
	}
	return topo, b
}

// attFlow is a flow of the attached cut tests and whether it must end.
type attFlow struct {
	name string
	f    *echoFlow
	cut  bool
}

// checkAttFlows echoes over every flow: a cut one must be dropped (a
// timeout), every other must carry data.
func checkAttFlows(t *testing.T, ns *netlab.NS, step string, flows []attFlow) {
	t.Helper()
	for _, fl := range flows {
		wait := okWait
		if fl.cut {
			wait = failWait
		}
		checkFlowCut(t, ns, "filter", step, fl.name, fl.f, fl.cut, wait)
	}
}

// TestAttachedCutsFlowAtExpiry (issue 9, attached; attcut.go): beneath
// an admin's forward chain that accepts established flows before it
// jumps to pcpd, the established flows through an IPv6 pinhole, an IPv6
// redirect and an IPv4 NAPT (NAT-PMP) mapping, TCP and UDP, end when the
// kernel times their elements out with pcpd gone (its Backend closed,
// nobody deleting anything): the remote's next packet is dropped. The
// admin's own flows go on: one the admin's rule opened to the client's
// port, one through the admin's own port forward, and the client's own
// outbound one (the admin's "iifname lan0 accept"), all carrying the
// admin's low label bit as pcpd's do. On main (no cut in attached mode)
// the six "cut" flows carry data after expiry (each row fails: "still
// carries data").
func TestAttachedCutsFlowAtExpiry(t *testing.T) {
	for _, proto := range []uint8{tcp, udp} {
		t.Run(protoName(proto), func(t *testing.T) {
			topo, b := attachedCut(t)
			pin := pinhole.Pinhole{Protocol: proto, InternalAddr: topo.ClientV6, InternalPort: 7300}
			redir := pinhole.Pinhole{Protocol: proto, InternalAddr: topo.ClientV6, InternalPort: 7343, ExternalPort: 7380}
			napt := pinhole.Pinhole{Protocol: proto, InternalAddr: topo.ClientV4, InternalPort: 7301,
				ExternalAddr: topo.HostPublicV4, ExternalPort: 17301}
			apply(t, b, install(pin, 2*time.Second), install(redir, 2*time.Second), install(napt, 2*time.Second))
			in := func(p pinhole.Pinhole) netip.AddrPort { return netip.AddrPortFrom(p.InternalAddr, p.InternalPort) }
			r6 := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(topo.InternetV6, port) }
			r4 := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(topo.InternetV4, port) }
			flows := []attFlow{
				{name: "IPv6 pinhole", cut: true, f: openEcho(t, proto, topo.Client, topo.Internet, r6(47300), in(pin))},
				{name: "IPv6 redirect", cut: true, f: openEchoVia(t, proto, topo.Client, in(redir), topo.Internet, r6(47380),
					netip.AddrPortFrom(topo.ClientV6, redir.ExternalPort))},
				{name: "IPv4 NAPT", cut: true, f: openEchoVia(t, proto, topo.Client, in(napt), topo.Internet, r4(47301),
					netip.AddrPortFrom(napt.ExternalAddr, napt.ExternalPort))},
				{name: "client's own outbound", f: openEcho(t, proto, topo.Internet, topo.Client,
					netip.AddrPortFrom(topo.ClientV6, 7302), r6(47302))},
			}
			if proto == tcp {
				flows = append(flows,
					attFlow{name: "admin's own open port", f: openEcho(t, tcp, topo.Client, topo.Internet, r6(47350),
						netip.AddrPortFrom(topo.ClientV6, 7350))},
					attFlow{name: "admin's own port forward", f: openEchoVia(t, tcp, topo.Client, netip.AddrPortFrom(topo.ClientV4, 8000),
						topo.Internet, r4(48000), netip.AddrPortFrom(topo.HostPublicV4, 18000))})
			}
			checkAttFlows(t, topo.Host, "live", append([]attFlow(nil), uncut(flows)...))
			b.Close() // pcpd dead
			if err := netlab.Eventually(10*time.Second, func() error {
				if out := nftList(t, topo.Host, "table", "inet", "filter"); strings.Contains(out, "expires") {
					return errors.New("elements left")
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			checkAttFlows(t, topo.Host, "expired, pcpd dead", flows)
			for _, c := range []string{"pcpd_recheck6", "pcpd_recheck_nat"} {
				if out := nftList(t, topo.Host, "chain", "inet", "filter", c); !regexp.MustCompile(`counter packets [1-9]`).MatchString(out) {
					t.Errorf("%s counted no drop:\n%s", c, out)
				}
			}
		})
	}
}

// uncut is flows, all expected to carry data (the check before expiry).
func uncut(flows []attFlow) []attFlow {
	out := make([]attFlow, len(flows))
	for i, f := range flows {
		f.cut = false
		out[i] = f
	}
	return out
}

// TestAttachedCutsRemovedFlows (attcut.go): attached, a delete ends the
// flows no element admits any longer at once, and only those: an IPv6
// pinhole's flow with an all-ports pinhole of the address live goes on
// until that one goes too; a NAPT mapping's flow with a PEER-like
// filtered mapping of its endpoint goes on until both are deleted. A
// second pcpd attached to the same table (chain pcpd2, so another label
// bit: 90 and 120) keeps its own flows through all of it, and the
// first's flows through the second's deletes: with one bit for both
// (attachedLabel returning 90), each one's pcpd_cut drops the other's
// flows, and the first flow fails its first round trip.
// The flows' conntrack entries stay (no walk at this level). On main
// every step's "cut" flow carries data.
func TestAttachedCutsRemovedFlows(t *testing.T) {
	topo, b := attachedCut(t)
	b2 := newBackend(t, topo.Host, pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd2"})
	serveTunnel(t, b2, topo)
	if err := b2.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
		t.Fatal(err)
	}
	pub := topo.HostPublicV4
	pin := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: 7400}
	allPorts := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6}
	napt := pinhole.Pinhole{Protocol: udp, InternalAddr: topo.ClientV4, InternalPort: 7401, ExternalAddr: pub, ExternalPort: 17401}
	peer := napt
	peer.RemotePrefix, peer.RemotePort = netip.PrefixFrom(topo.InternetV4, 32), 47401
	pin2 := pinhole.Pinhole{Protocol: udp, InternalAddr: topo.ClientV6, InternalPort: 7410}
	napt2 := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV4, InternalPort: 7411, ExternalAddr: pub, ExternalPort: 17411}
	apply(t, b, install(pin, time.Hour), install(allPorts, time.Hour), install(napt, time.Hour), install(peer, time.Hour))
	apply(t, b2, install(pin2, time.Hour), install(napt2, time.Hour))
	in := func(p pinhole.Pinhole) netip.AddrPort { return netip.AddrPortFrom(p.InternalAddr, p.InternalPort) }
	at := func(p pinhole.Pinhole) netip.AddrPort { return netip.AddrPortFrom(p.ExternalAddr, p.ExternalPort) }
	flows := []attFlow{
		{name: "IPv6 pinhole", f: openEcho(t, tcp, topo.Client, topo.Internet, netip.AddrPortFrom(topo.InternetV6, 47400), in(pin))},
		{name: "NAPT with a PEER", f: openEchoVia(t, udp, topo.Client, in(napt), topo.Internet, netip.AddrPortFrom(topo.InternetV4, 47401), at(napt))},
		{name: "pcpd2's IPv6 pinhole", f: openEcho(t, udp, topo.Client, topo.Internet, netip.AddrPortFrom(topo.InternetV6, 47410), in(pin2))},
		{name: "pcpd2's NAPT", f: openEchoVia(t, tcp, topo.Client, in(napt2), topo.Internet, netip.AddrPortFrom(topo.InternetV4, 47411), at(napt2))},
	}
	for _, step := range []struct {
		b    *pinhole.Backend
		d    pinhole.Pinhole
		cuts string
	}{
		{b, pin, ""},
		{b, allPorts, "IPv6 pinhole"},
		{b, napt, ""},
		{b, peer, "NAPT with a PEER"},
		{b2, pin2, "pcpd2's IPv6 pinhole"},
		{b2, napt2, "pcpd2's NAPT"},
	} {
		apply(t, step.b, del(step.d))
		var now []attFlow
		for i := range flows {
			if flows[i].name == step.cuts {
				flows[i].cut = true
				now = append(now, flows[i])
			} else if !flows[i].cut {
				now = append(now, flows[i])
			}
		}
		checkAttFlows(t, topo.Host, fmt.Sprintf("%v deleted", step.d), now)
	}
	out := topo.Host.MustRun(t, "cat", "/proc/net/nf_conntrack")
	for _, port := range []int{7400, 17401, 7410, 17411} {
		if !strings.Contains(out, fmt.Sprintf("dport=%d ", port)) {
			t.Errorf("no conntrack entry of the flow to port %d left:\n%s", port, out)
		}
	}
}

// TestAttachedCutLayout (attcut.go): nft lists pcpd_cut and the label
// rules as attcut.go says, with the table's and chain's own bit;
// CutsFlows is true for every kind; Healthy takes pcpd_cut's rule altered
// or the chain deleted as damage and Setup repairs it; and Teardown,
// with labelled flows live, leaves the admin's ruleset byte for byte.
// The fallbacks: a kernel refusing labels gets the attached layout of
// before (no pcpd_cut, no label, CutsFlows false), one refusing natcut's
// map lookups a pcpd_cut of the pinhole rule alone (CutsFlows false for
// the DNAT kinds), and a Setup over pcpd_guard6's and pcpd_prerouting's
// rules unlabelled (an upgrade from main) leaves CutsFlows false for the
// Backend's life; Teardown leaves the admin's ruleset after each. On
// main CutsFlows is false and there is no pcpd_cut.
func TestAttachedCutLayout(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	loadNft(t, topo.Host, adminRuleset)
	admin := nftList(t, topo.Host, "ruleset")
	cfg := pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd"}
	v6 := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: 7500}
	r6 := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: 7543, ExternalPort: 7580}
	m4 := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV4, InternalPort: 7501, ExternalAddr: topo.HostPublicV4, ExternalPort: 17501}
	cuts := func(step string, b *pinhole.Backend, pin, dnat bool) {
		t.Helper()
		for _, c := range []struct {
			p    pinhole.Pinhole
			want bool
		}{{v6, pin}, {r6, dnat}, {m4, dnat}} {
			if got := b.CutsFlows(c.p); got != c.want {
				t.Errorf("%s: CutsFlows(%v) = %v, want %v", step, c.p, got, c.want)
			}
		}
	}
	tornDown := func(step string, b *pinhole.Backend) {
		t.Helper()
		if err := b.Teardown(); err != nil {
			t.Fatalf("%s: Teardown: %v", step, err)
		}
		if diff := cmp.Diff(admin, nftList(t, topo.Host, "ruleset")); diff != "" {
			t.Errorf("%s: ruleset after Teardown (-admin's +now):\n%s", step, diff)
		}
	}

	b := newBackend(t, topo.Host, cfg)
	if err := b.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
		t.Fatal(err)
	}
	serveTunnel(t, b, topo)
	out := nftList(t, topo.Host, "table", "inet", "filter")
	for _, want := range []string{
		"chain pcpd_cut {\n\t\ttype filter hook prerouting priority mangle; policy accept;",
		"ct label 90 ct direction original ct status dnat ct state established,new goto pcpd_recheck_nat",
		"ct label 90 ct direction original ct state established goto pcpd_recheck6",
		"ip6 daddr . meta l4proto . th dport @pcpd_pin6 ct label set 90 accept",
		"ip daddr . meta l4proto . th dport @pcpd_napt4 ct label set 90 dnat ip to",
		"chain pcpd_recheck6 {",
		"ip6 daddr @pcpd_pin6_addr accept",
		"chain pcpd_recheck_nat {",
		"ip daddr . meta l4proto . th dport @pcpd_napt4 accept",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("nft does not list %q:\n%s", want, out)
		}
	}
	if g := nftList(t, topo.Host, "chain", "inet", "filter", "pcpd_guard6"); strings.Contains(g, "recheck") {
		t.Errorf("pcpd_guard6 re-checks too (standalone's rule):\n%s", g)
	}
	cuts("fresh", b, true, true)
	for _, tamper := range [][]string{
		{"sh", "-c", `h=$(nft -a list chain inet filter pcpd_cut | sed -n 's/.*goto pcpd_recheck6 # handle //p'); nft replace rule inet filter pcpd_cut handle $h ct label 90 accept`},
		{"sh", "-c", `nft flush chain inet filter pcpd_cut; nft delete chain inet filter pcpd_cut`},
	} {
		topo.Host.MustRun(t, tamper...)
		if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
			t.Errorf("Healthy = %v after %q", err, tamper[2])
		}
		if err := b.Setup(); err != nil {
			t.Fatal(err)
		}
		if err := b.Healthy(); err != nil {
			t.Fatalf("Healthy after Setup: %v", err)
		}
	}
	// Labelled flows live: Teardown still gives the admin's ruleset back.
	apply(t, b, install(v6, time.Hour), install(m4, time.Hour))
	openEcho(t, tcp, topo.Client, topo.Internet, netip.AddrPortFrom(topo.InternetV6, 47500), netip.AddrPortFrom(v6.InternalAddr, v6.InternalPort))
	openEchoVia(t, tcp, topo.Client, netip.AddrPortFrom(m4.InternalAddr, m4.InternalPort), topo.Internet,
		netip.AddrPortFrom(topo.InternetV4, 47501), netip.AddrPortFrom(m4.ExternalAddr, m4.ExternalPort))
	tornDown("labelled layout", b)

	fallback := func(name string, refuse func(*pinhole.Backend)) *pinhole.Backend {
		t.Helper()
		conn, err := topo.Host.NftConn()
		if err != nil {
			t.Fatal(err)
		}
		cfg := cfg
		cfg.Routes = nsRoutes(t, topo.Host)
		fb, err := pinhole.New(conn, cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(fb.Close)
		refuse(fb)
		if err := fb.Setup(); err != nil {
			t.Fatalf("%s: Setup: %v", name, err)
		}
		// The flows labelled above outlive the Teardown: a layout made
		// anew over them is disarmed until Arm (arm.go), which the
		// server calls once its restore is done.
		if err := fb.Arm(); err != nil {
			t.Fatalf("%s: Arm: %v", name, err)
		}
		if err := fb.Healthy(); err != nil {
			t.Errorf("%s: Healthy: %v", name, err)
		}
		return fb
	}
	fb := fallback("labels refused", pinhole.RefuseLabels)
	if out := nftList(t, topo.Host, "table", "inet", "filter"); strings.Contains(out, "ct label") || strings.Contains(out, "pcpd_cut") || strings.Contains(out, "recheck") {
		t.Errorf("labels refused: label or cut rules in the layout:\n%s", out)
	}
	cuts("labels refused", fb, false, false)
	tornDown("labels refused", fb)

	fb = fallback("natcut refused", pinhole.RefuseNATCut)
	out = nftList(t, topo.Host, "table", "inet", "filter")
	if strings.Contains(out, "pcpd_recheck_nat") || strings.Contains(out, "ct status dnat ct state established,new") ||
		!strings.Contains(out, "ct label 90 ct direction original ct state established goto pcpd_recheck6") {
		t.Errorf("natcut refused: want pcpd_cut with the pinhole rule alone:\n%s", out)
	}
	cuts("natcut refused", fb, true, false)
	tornDown("natcut refused", fb)

	// An upgrade: the attached layout of main (no label), then this one.
	fb = fallback("main's layout", pinhole.RefuseLabels)
	nb := newBackend(t, topo.Host, cfg)
	cuts("upgrade over main's layout", nb, false, false)
	if out := nftList(t, topo.Host, "table", "inet", "filter"); !strings.Contains(out, "goto pcpd_recheck6") {
		t.Errorf("upgrade: no pcpd_cut:\n%s", out)
	}
	cuts("restart over the labelled layout", newBackend(t, topo.Host, cfg), true, true)
	tornDown("upgrade", nb)
}

// pinAndNAPT installs, for an hour, an IPv6 pinhole to TCP port port and
// a NAPT mapping of UDP port+1 (external port+10001), and opens a flow
// from the internet through each (remote ports 40000 above them).
func pinAndNAPT(t *testing.T, topo *netlab.Topology, b *pinhole.Backend, port uint16) (pin, napt pinhole.Pinhole, flows []attFlow) {
	t.Helper()
	pin = pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: port}
	napt = pinhole.Pinhole{Protocol: udp, InternalAddr: topo.ClientV4, InternalPort: port + 1, ExternalAddr: topo.HostPublicV4, ExternalPort: port + 10001}
	apply(t, b, install(pin, time.Hour), install(napt, time.Hour))
	flows = []attFlow{
		{name: "IPv6 pinhole", f: openEcho(t, tcp, topo.Client, topo.Internet, netip.AddrPortFrom(topo.InternetV6, port+40000),
			netip.AddrPortFrom(pin.InternalAddr, pin.InternalPort))},
		{name: "IPv4 NAPT", f: openEchoVia(t, udp, topo.Client, netip.AddrPortFrom(napt.InternalAddr, napt.InternalPort), topo.Internet,
			netip.AddrPortFrom(topo.InternetV4, port+40001), netip.AddrPortFrom(napt.ExternalAddr, napt.ExternalPort))},
	}
	return pin, napt, flows
}
