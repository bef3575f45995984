package pinhole_test

import (
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// natFlow is one established flow of the natcut tests and the elements
// whose delete ends it.
type natFlow struct {
	name  string
	f     *echoFlow
	ext   uint16 // the port its conntrack entry's original tuple goes to
	holds []pinhole.Pinhole
	cut   bool
}

// TestNATCutsRemovedMappingFlows (issue 9; natcut.go): an IPv6 port
// pinhole's flow, an IPv6 redirect's, TCP and UDP flows through IPv4 NAPT
// mappings, a flow through a NAPT mapping with a PEER-like filtered
// mapping of the same endpoint, and a hairpinned flow (the lan1 host to
// the client's public endpoint) are all alive together; the elements are
// deleted one by one, and after each delete exactly the flows it ended
// stop carrying data (the remote's next packet dropped), their conntrack
// entries still there (no walk at this level), while the others go on.
// On main (before natcut) every DNAT-ed flow carries data after its
// mapping's delete: the "redirect", "NAPT" and "hairpin" steps fail.
func TestNATCutsRemovedMappingFlows(t *testing.T) {
	topo, peer, peerAddr, b := servedLAN1(t, "dnatcutpeer", false, []netip.Prefix{netip.MustParsePrefix("10.100.1.2/32")})
	pub := topo.HostPublicV4
	remote4 := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(topo.InternetV4, port) }
	remote6 := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(topo.InternetV6, port) }
	napt := func(proto uint8, port uint16) pinhole.Pinhole {
		return pinhole.Pinhole{Protocol: proto, InternalAddr: topo.ClientV4, InternalPort: port, ExternalAddr: pub, ExternalPort: 10000 + port}
	}
	pin6 := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: 7400}
	redir := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: 7443, ExternalPort: 7480}
	naptTCP, naptUDP, naptPeered, hairpin := napt(tcp, 7500), napt(udp, 7501), napt(udp, 7502), napt(udp, 7503)
	peerOf := naptPeered
	peerOf.RemotePrefix, peerOf.RemotePort = netip.PrefixFrom(topo.InternetV4, 32), 47502
	var ops []pinhole.Op
	for _, p := range []pinhole.Pinhole{pin6, redir, naptTCP, naptUDP, naptPeered, peerOf, hairpin} {
		ops = append(ops, install(p, time.Hour))
	}
	apply(t, b, ops...)

	at := func(p pinhole.Pinhole) netip.AddrPort { return netip.AddrPortFrom(pub, p.ExternalPort) }
	in := func(p pinhole.Pinhole) netip.AddrPort { return netip.AddrPortFrom(p.InternalAddr, p.InternalPort) }
	flows := []*natFlow{
		{name: "IPv6 port pinhole", ext: 7400, holds: []pinhole.Pinhole{pin6},
			f: openEcho(t, tcp, topo.Client, topo.Internet, remote6(47400), in(pin6))},
		{name: "IPv6 redirect", ext: 7480, holds: []pinhole.Pinhole{redir},
			f: openEchoVia(t, tcp, topo.Client, in(redir), topo.Internet, remote6(47480), netip.AddrPortFrom(topo.ClientV6, 7480))},
		{name: "NAPT TCP", ext: 17500, holds: []pinhole.Pinhole{naptTCP},
			f: openEchoVia(t, tcp, topo.Client, in(naptTCP), topo.Internet, remote4(47500), at(naptTCP))},
		{name: "NAPT UDP", ext: 17501, holds: []pinhole.Pinhole{naptUDP},
			f: openEchoVia(t, udp, topo.Client, in(naptUDP), topo.Internet, remote4(47501), at(naptUDP))},
		{name: "NAPT UDP with a PEER of the endpoint", ext: 17502, holds: []pinhole.Pinhole{naptPeered, peerOf},
			f: openEchoVia(t, udp, topo.Client, in(naptPeered), topo.Internet, remote4(47502), at(naptPeered))},
		{name: "hairpin", ext: 17503, holds: []pinhole.Pinhole{hairpin},
			f: openEchoVia(t, udp, topo.Client, in(hairpin), peer, netip.AddrPortFrom(peerAddr, 7603), at(hairpin))},
	}
	for _, d := range []pinhole.Pinhole{pin6, redir, naptTCP, naptUDP, naptPeered, peerOf, hairpin} {
		apply(t, b, del(d))
		for _, fl := range flows {
			if fl.cut {
				continue
			}
			n := len(fl.holds)
			fl.holds = slices.DeleteFunc(fl.holds, func(h pinhole.Pinhole) bool { return h == d })
			ends := len(fl.holds) < n && len(fl.holds) == 0
			wait := okWait
			if ends {
				wait = failWait
			}
			checkFlowCut(t, topo.Host, "pcpd", fmt.Sprintf("%v deleted", d), fl.name, fl.f, ends, wait)
			if ends {
				fl.cut = true
				wantConntrackEntry(t, topo.Host, fl.name+": ", fl.ext)
			}
		}
	}
	if out := nftList(t, topo.Host, "chain", "inet", "pcpd", "recheck_nat"); !regexp.MustCompile(`counter packets [1-9]`).MatchString(out) {
		t.Errorf("recheck_nat counted no drop:\n%s", out)
	}
}

// TestNATCutsFlowAtExpiry (issue 9): a NAPT mapping's and a redirect's
// established flows end when the kernel times their elements out, with
// nobody deleting anything (pcpd dead). On main they go on for as long as
// the flows last.
func TestNATCutsFlowAtExpiry(t *testing.T) {
	for _, proto := range []uint8{tcp, udp} {
		t.Run(protoName(proto), func(t *testing.T) {
			topo, b := guardedTopology(t, pinhole.Config{})
			m := pinhole.Pinhole{Protocol: proto, InternalAddr: topo.ClientV4, InternalPort: 7700,
				ExternalAddr: topo.HostPublicV4, ExternalPort: 17700}
			r := pinhole.Pinhole{Protocol: proto, InternalAddr: topo.ClientV6, InternalPort: 7743, ExternalPort: 7780}
			apply(t, b, install(m, 2*time.Second), install(r, 2*time.Second))
			fm := openEchoVia(t, proto, topo.Client, netip.AddrPortFrom(m.InternalAddr, m.InternalPort), topo.Internet,
				netip.AddrPortFrom(topo.InternetV4, 47700), netip.AddrPortFrom(m.ExternalAddr, m.ExternalPort))
			fr := openEchoVia(t, proto, topo.Client, netip.AddrPortFrom(r.InternalAddr, r.InternalPort), topo.Internet,
				netip.AddrPortFrom(topo.InternetV6, 47780), netip.AddrPortFrom(topo.ClientV6, r.ExternalPort))
			waitNoElements(t, b)
			if err := fm.echo(failWait); err == nil {
				t.Errorf("the NAPT flow still carries data after its mapping expired")
			}
			if err := fr.echo(failWait); err == nil {
				t.Errorf("the redirect's flow still carries data after it expired")
			}
		})
	}
}

// unlabelDNAT rewrites the prerouting DNAT rule of map without its label
// (the layout before natcut.go).
func unlabelDNAT(t *testing.T, ns *netlab.NS, set string) {
	t.Helper()
	out := ns.MustRun(t, "nft", "-a", "list", "chain", "inet", "pcpd", "prerouting")
	m := regexp.MustCompile(`\n\s*\S[^\n]*@` + set + ` ct label set 126 (dnat [^\n]*map @` + set + `) # handle (\d+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no labelling DNAT rule of %s in prerouting:\n%s", set, out)
	}
	ns.MustRun(t, "sh", "-c", "nft replace rule inet pcpd prerouting handle "+m[2]+" "+m[1])
}

// TestNATCutLayout: nft lists natcut's rules as natcut.go says, and the
// whole table, listed, loads back (nft -f) into an empty namespace;
// CutsFlows is true for the DNAT kinds; Healthy takes natcut's rule or a
// DNAT rule's label altered as damage and Setup repairs it. A Setup over
// pcpd's DNAT rules without the label (an upgrade from main, or a rule an
// admin altered) leaves CutsFlows false for the DNAT kinds for the
// Backend's life, the IPv6 pinholes' still true, and a flow DNAT-ed
// before it is indeed not cut (the server must wait for its walk); a
// restart over the labelled layout keeps it true. Without
// translatesUnlabelled the "upgrade" rows say true (and the flow goes on).
func TestNATCutLayout(t *testing.T) {
	topo, b := guardedTopology(t, pinhole.Config{})
	out := nftList(t, topo.Host, "table", "inet", "pcpd")
	for _, want := range []string{
		"type filter hook prerouting priority mangle; policy accept;",
		"ct label 126 ct direction original ct state established,new goto recheck_nat",
		"ip daddr . meta l4proto . th dport @napt4 ct label set 126 dnat ip to ip daddr . meta l4proto . th dport map @napt4",
		"ip6 daddr . meta l4proto . th dport @redir6 ct label set 126 dnat ip6 to ip6 daddr . meta l4proto . th dport map @redir6",
		"chain recheck_nat {",
		"ip daddr . meta l4proto . th dport . ip saddr . th sport @napt4_filter accept",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("nft does not list %q:\n%s", want, out)
		}
	}
	// The table as listed loads back (nft -f) and lists the same, but
	// for the NAT rules of the three filtered maps, which nft 1.0.6 lists
	// and cannot read ("transport protocol mapping is only valid after
	// transport protocol match"), with the label or without (main's).
	var kept []string
	unreadable := regexp.MustCompile(`(dnat|snat) ip6? to .* map @(napt4_filter|redir6_filter|snat4_filter)$`)
	for _, l := range strings.Split(out, "\n") {
		if !unreadable.MatchString(l) {
			kept = append(kept, l)
		}
	}
	if len(kept) != len(strings.Split(out, "\n"))-3 {
		t.Errorf("%d rules left out of the load-back, want 3", len(strings.Split(out, "\n"))-len(kept))
	}
	back := strings.Join(kept, "\n")
	other := netlab.NewNS(t, "dnatcutld")
	if o, err := other.Run("sh", "-c", "nft -f - <<'EOF'\n"+back+"EOF\n"); err != nil {
		t.Errorf("the listed table does not load back: %v\n%s", err, o)
	} else if again, _ := other.Run("nft", "list", "table", "inet", "pcpd"); again != back {
		t.Errorf("the table loaded back lists otherwise:\n%s\nwant:\n%s", again, back)
	}
	m := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV4, InternalPort: 7800, ExternalAddr: topo.HostPublicV4, ExternalPort: 17800}
	r := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: 7843, ExternalPort: 7880}
	v6 := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: 80}
	cuts := func(step string, nb *pinhole.Backend, want bool) {
		t.Helper()
		for _, p := range []pinhole.Pinhole{m, r} {
			if got := nb.CutsFlows(p); got != want {
				t.Errorf("%s: CutsFlows(%v) = %v, want %v", step, p, got, want)
			}
		}
		if !nb.CutsFlows(v6) {
			t.Errorf("%s: CutsFlows(%v) = false", step, v6)
		}
	}
	cuts("fresh", b, true)
	tamperedThenRepaired(t, b, "a natcut rule changed", func() string { return nftList(t, topo.Host, "table", "inet", "pcpd") },
		func() { unlabelDNAT(t, topo.Host, "redir6") },
		func() { replaceRule(t, topo.Host, "natcut", "goto recheck_nat", "ct", "label", "126", "accept") })
	// The first tamper was a DNAT rule unlabelled: this Backend's
	// repair found it, and cuts no DNAT-ed flow from then on.
	cuts("repair of an unlabelled DNAT rule", b, false)
	cuts("restart over the labelled layout", newBackend(t, topo.Host, pinhole.Config{}), true)

	// An upgrade: the table as main laid it out (no DNAT label), a flow
	// DNAT-ed by it, then a new pcpd.
	unlabelDNAT(t, topo.Host, "napt4")
	apply(t, b, install(m, time.Hour))
	f := openEchoVia(t, tcp, topo.Client, netip.AddrPortFrom(m.InternalAddr, m.InternalPort), topo.Internet,
		netip.AddrPortFrom(topo.InternetV4, 47800), netip.AddrPortFrom(m.ExternalAddr, m.ExternalPort))
	nb := newBackend(t, topo.Host, pinhole.Config{})
	cuts("upgrade", nb, false)
	apply(t, nb, del(m))
	if err := f.echo(okWait); err != nil {
		t.Errorf("upgrade: the unlabelled flow: %v; want it to go on (the walk ends it, and the server waits for it)", err)
	}
}

// TestNATCutsUnrepliedStream: a one-way UDP stream from the remote
// through a NAPT mapping and through an IPv6 redirect (the client never
// answers: the flow stays "new") stops at the mapping's delete, its
// conntrack entry still there. Its packets are translated by the flow's
// binding without the NAT chain, and guard4's (guard6's) "ct status dnat
// accept" passed them: with natcut's rule matching "established" only,
// both rows fail (the datagram after the delete arrives).
func TestNATCutsUnrepliedStream(t *testing.T) {
	topo, b := guardedTopology(t, pinhole.Config{})
	for _, c := range []struct {
		name         string
		p            pinhole.Pinhole
		remote, dial netip.AddrPort
		ext          uint16
	}{
		{"NAPT", pinhole.Pinhole{Protocol: udp, InternalAddr: topo.ClientV4, InternalPort: 7900, ExternalAddr: topo.HostPublicV4, ExternalPort: 17900},
			netip.AddrPortFrom(topo.InternetV4, 47900), netip.AddrPortFrom(topo.HostPublicV4, 17900), 17900},
		{"redirect", pinhole.Pinhole{Protocol: udp, InternalAddr: topo.ClientV6, InternalPort: 7943, ExternalPort: 7980},
			netip.AddrPortFrom(topo.InternetV6, 47980), netip.AddrPortFrom(topo.ClientV6, 7980), 7980},
	} {
		t.Run(c.name, func(t *testing.T) {
			apply(t, b, install(c.p, time.Hour))
			rx := listenUDP(t, topo.Client, netip.AddrPortFrom(c.p.InternalAddr, c.p.InternalPort))
			tx := listenUDP(t, topo.Internet, c.remote)
			send := func(wait time.Duration) error {
				if _, err := tx.WriteToUDPAddrPort([]byte("x"), c.dial); err != nil {
					return err
				}
				rx.SetReadDeadline(time.Now().Add(wait))
				_, err := rx.Read(make([]byte, 8))
				return err
			}
			for i := range 3 { // the flow's first datagrams: labelled, then re-checked as "new"
				if err := send(okWait); err != nil {
					t.Fatalf("datagram %d through the live mapping: %v", i, err)
				}
			}
			apply(t, b, del(c.p))
			if err := send(failWait); err == nil {
				t.Errorf("the one-way stream goes on after its mapping's delete")
			}
			wantConntrackEntry(t, topo.Host, "", c.ext)
		})
	}
}

// TestNATCutRefused: on a kernel that refuses natcut's map lookups
// (EINVAL, as before Linux 6.5; simulated with a lookup the kernel
// refuses so), Setup lays out the table without natcut and its DNAT
// labels and succeeds, Healthy takes that layout as intact, NAPT still
// translates, and CutsFlows is false for the DNAT kinds (the server waits
// for its walk) but still true for IPv6 pinholes (guard6's labels stay).
// Without natCutRefusal's fallback Setup fails and pcpd cannot start.
func TestNATCutRefused(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	b := refusingBackend(t, topo.Host, pinhole.RefuseNATCut, "natcut refused")
	defer b.Teardown()
	serveTunnel(t, b, topo)
	if err := b.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
		t.Fatal(err)
	}
	if err := b.Healthy(); err != nil {
		t.Errorf("Healthy: %v", err)
	}
	out := nftList(t, topo.Host, "table", "inet", "pcpd")
	if strings.Contains(out, "label 126") || strings.Contains(out, "natcut") || strings.Contains(out, "recheck_nat") {
		t.Errorf("natcut's rules in the fallback layout:\n%s", out)
	}
	if !strings.Contains(out, "goto recheck6") {
		t.Errorf("guard6's re-check missing from the fallback layout:\n%s", out)
	}
	m := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV4, InternalPort: 7810, ExternalAddr: topo.HostPublicV4, ExternalPort: 17810}
	if b.CutsFlows(m) {
		t.Error("CutsFlows(NAPT) = true without natcut")
	}
	if !b.CutsFlows(pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: 80}) {
		t.Error("CutsFlows(pin6) = false")
	}
	serve(t, topo.Client, tcp, netip.AddrPortFrom(m.InternalAddr, m.InternalPort))
	apply(t, b, install(m, time.Minute))
	mustReach(t, "mapped", topo.Internet, tcp, netip.Addr{}, netip.AddrPortFrom(m.ExternalAddr, m.ExternalPort))
}
