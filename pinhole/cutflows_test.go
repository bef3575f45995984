package pinhole_test

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// An established flow for the cut tests: an echo server in one namespace
// and a connected socket in the other, from a fixed source.
type echoFlow struct {
	c net.Conn
}

// openEcho serves an echo (TCP or UDP) on dst in srv and connects to it
// from src in cli; one round trip makes the flow established.
func openEcho(t *testing.T, proto uint8, srv, cli *netlab.NS, src, dst netip.AddrPort) *echoFlow {
	t.Helper()
	return openEchoVia(t, proto, srv, dst, cli, src, dst)
}

// openEchoVia is openEcho with the echo served on listen and dialled at
// dst (a DNAT between them).
func openEchoVia(t *testing.T, proto uint8, srv *netlab.NS, listen netip.AddrPort, cli *netlab.NS, src, dst netip.AddrPort) *echoFlow {
	t.Helper()
	network := map[uint8]string{tcp: "tcp", udp: "udp"}[proto]
	if err := srv.Do(func() error {
		if proto == tcp {
			ln, err := net.Listen(network, listen.String())
			if err != nil {
				return err
			}
			t.Cleanup(func() { ln.Close() })
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					t.Cleanup(func() { c.Close() })
					go io.Copy(c, c)
				}
			}()
			return nil
		}
		pc, err := net.ListenPacket(network, listen.String())
		if err != nil {
			return err
		}
		t.Cleanup(func() { pc.Close() })
		go func() {
			buf := make([]byte, 64)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				pc.WriteTo(buf[:n], from)
			}
		}()
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	f := &echoFlow{}
	if err := cli.Do(func() (err error) {
		var local net.Addr = net.TCPAddrFromAddrPort(src)
		if proto == udp {
			local = net.UDPAddrFromAddrPort(src)
		}
		d := net.Dialer{Timeout: 2 * time.Second, LocalAddr: local}
		f.c, err = d.Dial(network, dst.String())
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.c.Close() })
	if err := f.echo(okWait); err != nil {
		t.Fatalf("%s %v → %v: first round trip: %v", protoName(proto), src, dst, err)
	}
	return f
}

// echo sends a byte and reads it back within wait.
func (f *echoFlow) echo(wait time.Duration) error {
	f.c.SetDeadline(time.Now().Add(wait))
	if _, err := f.c.Write([]byte("x")); err != nil {
		return err
	}
	_, err := io.ReadFull(f.c, make([]byte, 1))
	return err
}

// TestGuardCutsRemovedPinholeFlows (issue 8, issue 9; cutflows.go): once
// a pinhole's element is deleted, the next packet from the remote of an
// established TCP or UDP flow it admitted is dropped by the guard itself,
// its conntrack entry still there (nobody flushed it: at this level there
// is no conntrack walk). A flow that another live element admits (an
// all-ports pinhole of the address, a PEER-like filtered pinhole of the
// same endpoint) goes on, as do the client's own outbound flow from the
// pinhole's port and a flow that began unlabelled (the admission rules
// without the label, as before this layout). On main (the guard's
// "ct state established,related accept" for every flow) the two "cut"
// rows fail: the flow passes after the delete.
func TestGuardCutsRemovedPinholeFlows(t *testing.T) {
	const port, rport = 7100, 47100
	for _, tc := range []struct {
		name  string
		proto uint8
		// also: pinholes installed beside the deleted one, which stay.
		also       func(client, remote netip.AddrPort) []pinhole.Pinhole
		outbound   bool // the flow is the client's own, from the pinhole's port
		unlabelled bool // the flow began with the admission rules unlabelled
		cut        bool
	}{
		{name: "TCP, pinhole deleted", proto: tcp, cut: true},
		{name: "UDP, pinhole deleted", proto: udp, cut: true},
		{name: "TCP, all-ports pinhole of the address live", proto: tcp,
			also: func(c, _ netip.AddrPort) []pinhole.Pinhole {
				return []pinhole.Pinhole{{Protocol: tcp, InternalAddr: c.Addr()}}
			}},
		{name: "UDP, filtered pinhole of the endpoint (a PEER) live", proto: udp,
			also: func(c, r netip.AddrPort) []pinhole.Pinhole {
				return []pinhole.Pinhole{{Protocol: udp, InternalAddr: c.Addr(), InternalPort: c.Port(),
					RemotePrefix: netip.PrefixFrom(r.Addr(), 128), RemotePort: r.Port()}}
			}},
		{name: "UDP, all-protocols pinhole of the address live", proto: udp,
			also: func(c, _ netip.AddrPort) []pinhole.Pinhole {
				return []pinhole.Pinhole{{InternalAddr: c.Addr()}}
			}},
		{name: "TCP, the client's own outbound flow", proto: tcp, outbound: true},
		{name: "TCP, a flow from before the label rules", proto: tcp, unlabelled: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			topo, b := guardedTopology(t, pinhole.Config{})
			client := netip.AddrPortFrom(topo.ClientV6, port)
			remote := netip.AddrPortFrom(topo.InternetV6, rport)
			p := pinhole.Pinhole{Protocol: tc.proto, InternalAddr: client.Addr(), InternalPort: client.Port()}
			ops := []pinhole.Op{install(p, time.Hour)}
			var also []pinhole.Pinhole
			if tc.also != nil {
				also = tc.also(client, remote)
			}
			for _, q := range also {
				ops = append(ops, install(q, time.Hour))
			}
			apply(t, b, ops...)
			if tc.unlabelled {
				unlabelAdmission(t, topo.Host, "pin6")
			}
			var f *echoFlow
			if tc.outbound {
				f = openEcho(t, tc.proto, topo.Internet, topo.Client, client, remote)
			} else {
				f = openEcho(t, tc.proto, topo.Client, topo.Internet, remote, client)
			}
			if tc.unlabelled {
				if err := b.Setup(); err != nil { // the labelled layout again
					t.Fatal(err)
				}
			}
			apply(t, b, del(p))
			checkFlowCut(t, topo.Host, "pcpd", "its pinhole deleted", protoName(tc.proto), f, tc.cut, failWait)
			if tc.cut {
				// Cut in the ruleset: the flow's entry is still there.
				wantConntrackEntry(t, topo.Host, "", port)
			}
		})
	}
}

// unlabelAdmission rewrites guard6's admission rule of set without its
// "ct label set" (the layout before cutflows.go).
func unlabelAdmission(t *testing.T, ns *netlab.NS, set string) {
	t.Helper()
	out := ns.MustRun(t, "nft", "-a", "list", "chain", "inet", "pcpd", "guard6")
	m := regexp.MustCompile(`\n\s*(\S[^\n]*@` + set + `) ct label set 127 (?:accept|goto admit6) # handle (\d+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no labelling admission rule of %s in guard6:\n%s", set, out)
	}
	ns.MustRun(t, "nft", "replace", "rule", "inet", "pcpd", "guard6", "handle", m[2], m[1], "accept")
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestGuardCutsFlowAtExpiry (issue 9: no pinhole outlives its lease): an
// established flow through a pinhole ends when the kernel times its
// element out, with nobody deleting anything (pcpd dead): once the
// element is gone from the set, the remote's next packet is dropped. On
// main it passes for as long as the flow lasts.
func TestGuardCutsFlowAtExpiry(t *testing.T) {
	for _, proto := range []uint8{tcp, udp} {
		t.Run(protoName(proto), func(t *testing.T) {
			topo, b := guardedTopology(t, pinhole.Config{})
			client := netip.AddrPortFrom(topo.ClientV6, 7200)
			p := pinhole.Pinhole{Protocol: proto, InternalAddr: client.Addr(), InternalPort: client.Port()}
			apply(t, b, install(p, 2*time.Second))
			f := openEcho(t, proto, topo.Client, topo.Internet, netip.AddrPortFrom(topo.InternetV6, 47200), client)
			waitNoElements(t, b)
			if err := f.echo(failWait); err == nil {
				t.Errorf("the flow still carries data after its pinhole expired")
			}
		})
	}
}

// TestCutLayoutListed: nft lists the label rules as pcpd's comments say
// (an operator reads them in "nft list ruleset"); Healthy takes any of them
// altered (the label set dropped from an admission rule, the re-check's
// goto turned into an accept) as damage, and Setup repairs it.
// Attached, its own layout and bit (attcut.go, TestAttachedCutLayout).
func TestCutLayoutListed(t *testing.T) {
	topo, b := guardedTopology(t, pinhole.Config{})
	out := nftList(t, topo.Host, "table", "inet", "pcpd")
	for _, want := range []string{
		"ct direction original ct state established ct label 127 goto recheck6",
		"ip6 daddr . meta l4proto . th dport @pin6 ct label set 127 goto admit6",
		"ip6 daddr . ip6 saddr @pin6_addr_filter ct label set 127 goto admit6",
		"chain admit6 {", // flowed.go
		"add @flowed6 { ip6 daddr } accept",
		"counter packets 0 bytes 1099511627776 accept", // counterBase (h/flowtrust)
		"chain recheck6 {",
		"ip6 daddr @pin6_addr accept",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("nft does not list %q:\n%s", want, out)
		}
	}
	v6 := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: 80}
	for _, c := range []struct {
		p    pinhole.Pinhole
		cuts bool
	}{
		{v6, true},
		{pinhole.Pinhole{InternalAddr: topo.ClientV6}, true},
		// natcut.go
		{pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: 80, ExternalPort: 8080}, true},
		{pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV4, InternalPort: 80, ExternalAddr: topo.HostPublicV4, ExternalPort: 8080}, true},
	} {
		if got := b.CutsFlows(c.p); got != c.cuts {
			t.Errorf("CutsFlows(%v) = %v, want %v", c.p, got, c.cuts)
		}
	}
	tamperedThenRepaired(t, b, "a label rule changed", func() string { return nftList(t, topo.Host, "chain", "inet", "pcpd", "guard6") },
		func() { unlabelAdmission(t, topo.Host, "pin6_proto") },
		func() {
			replaceRule(t, topo.Host, "guard6", "goto recheck6",
				"ct", "direction", "original", "ct", "state", "established", "ct", "label", "127", "accept")
		})
	loadNft(t, topo.Host, adminRuleset)
	a := newBackend(t, topo.Host, pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd"})
	if !a.CutsFlows(v6) {
		t.Error("attached: CutsFlows = false")
	}
	if out := nftList(t, topo.Host, "table", "inet", "filter"); strings.Contains(out, "ct label 127") || strings.Contains(out, "ct label set 127") || strings.Contains(out, "flowed6") {
		t.Errorf("attached: standalone's label bit written:\n%s", out)
	}
}

// TestCutLabelsRefused: on a kernel that refuses the label rules
// (EOPNOTSUPP, as without CONFIG_NF_CONNTRACK_LABELS; simulated with a
// ct set the kernel refuses so), Setup lays out the guard without them
// and succeeds, Healthy takes that layout as intact, and CutsFlows is
// false for every pinhole (the server then waits for its walk).
func TestCutLabelsRefused(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	b := refusingBackend(t, topo.Host, pinhole.RefuseLabels, "the labels refused")
	defer b.Teardown()
	if err := b.Healthy(); err != nil {
		t.Errorf("Healthy: %v", err)
	}
	if out := nftList(t, topo.Host, "table", "inet", "pcpd"); strings.Contains(out, "ct label") || strings.Contains(out, "recheck6") {
		t.Errorf("label rules in the fallback layout:\n%s", out)
	}
	if b.CutsFlows(pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: 80}) {
		t.Error("CutsFlows = true without the label rules")
	}
}

// TestCutsFlowsAfterUnlabelledLayout (review h/revctcut): a Setup that
// finds guard6 admitting through a pinhole set without the label (a table
// laid out by a pcpd before cutflows.go: an upgrade; or an admission rule
// an admin altered, which Healthy's repair rewrites) leaves CutsFlows
// false: the flows those rules admitted are unlabelled, the re-check never
// drops them, and the server must wait for its walk before it answers
// their mapping's delete. With h/ctcut's Setup CutsFlows was true after
// the upgrade and the repair: the flow of the "upgrade" row carried data
// after its delete, whose reply no longer waited for the walk. A restart
// over an intact labelled layout and a fresh table keep it true.
func TestCutsFlowsAfterUnlabelledLayout(t *testing.T) {
	for _, tc := range []struct {
		name string
		// then: what happens to the table of b (labelled, a flow open)
		// before the Setup whose CutsFlows is looked at.
		then func(t *testing.T, topo *netlab.Topology, b *pinhole.Backend) *pinhole.Backend
		cuts bool
	}{
		{name: "restart over the labelled layout", cuts: true,
			then: func(t *testing.T, topo *netlab.Topology, _ *pinhole.Backend) *pinhole.Backend {
				return newBackend(t, topo.Host, pinhole.Config{})
			}},
		{name: "upgrade: table laid out without the labels",
			then: func(t *testing.T, topo *netlab.Topology, _ *pinhole.Backend) *pinhole.Backend {
				unlabelAdmission(t, topo.Host, "pin6")
				return nil // the flow is opened unlabelled below
			}},
		{name: "upgrade: table laid out with no label rule (fallback layout)",
			then: func(t *testing.T, topo *netlab.Topology, b *pinhole.Backend) *pinhole.Backend {
				// A table the fallback laid out (it refuses a labelled
				// one as not its own), its pinhole installed again.
				if err := b.Teardown(); err != nil {
					t.Fatal(err)
				}
				old := refusingBackend(t, topo.Host, pinhole.RefuseLabels, "the labels refused")
				defer old.Close()
				serveTunnel(t, old, topo)
				if err := old.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
					t.Fatal(err)
				}
				apply(t, old, install(pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: 7300}, time.Hour))
				return nil
			}},
		{name: "repair of an admission rule altered",
			then: func(t *testing.T, topo *netlab.Topology, b *pinhole.Backend) *pinhole.Backend {
				unlabelAdmission(t, topo.Host, "pin6_filter")
				if err := b.Setup(); err != nil {
					t.Fatal(err)
				}
				return b
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			topo, b, client, p := guardedPinhole(t, 7300)
			remote := netip.AddrPortFrom(topo.InternetV6, 47300)
			nb := tc.then(t, topo, b)
			f := openEcho(t, tcp, topo.Client, topo.Internet, remote, client)
			if nb == nil { // the upgrade: the new pcpd's Backend
				nb = newBackend(t, topo.Host, pinhole.Config{})
			}
			if got := nb.CutsFlows(p); got != tc.cuts {
				t.Errorf("CutsFlows = %v, want %v", got, tc.cuts)
			}
			apply(t, nb, del(p))
			if err := f.echo(failWait); err == nil && nb.CutsFlows(p) {
				t.Errorf("CutsFlows = true, and the flow carries data after its pinhole's delete")
			}
		})
	}
}
