package pinhole_test

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/vishvananda/netlink"
)

const (
	tcp = 6
	udp = 17
)

// Traffic checks: a dropped SYN or datagram shows as a timeout, so a
// negative check costs failWait.
const (
	okWait   = 3 * time.Second
	failWait = 700 * time.Millisecond
)

// deleteRule deletes from ns the rule of chain in the inet table whose
// listed line re matches up to its handle (re is followed by "# handle
// N"), as an older pcpd's layout lacks it; fatal when none matches.
func deleteRule(t testing.TB, ns *netlab.NS, table, chain, re string) {
	t.Helper()
	out := ns.MustRun(t, "nft", "-a", "list", "chain", "inet", table, chain)
	m := regexp.MustCompile(re + `# handle (\d+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no rule matching %s in %s:\n%s", re, chain, out)
	}
	ns.MustRun(t, "nft", "delete", "rule", "inet", table, chain, "handle", m[1])
}

// listenUDP listens on addr in ns; the socket is closed at the end of t.
func listenUDP(t testing.TB, ns *netlab.NS, addr netip.AddrPort) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	if err := ns.Do(func() (err error) {
		c, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(addr))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// newBackend runs Setup for a Backend aimed at ns, whose routes it asks
// (unless cfg.Routes says otherwise; noRoutes for none).
func newBackend(t testing.TB, ns *netlab.NS, cfg pinhole.Config) *pinhole.Backend {
	t.Helper()
	conn, err := ns.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Routes == nil {
		cfg.Routes = nsRoutes(t, ns)
	}
	b, err := pinhole.New(conn, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	if err := b.Setup(); err != nil {
		t.Fatalf("Setup: %v", err)
	}
	return b
}

// setServed tells b that pcpd serves on addrs through ifaces (as the
// server's listener does): the control chains meter and untrack the
// datagrams to pcpd's port on them arriving on ifaces or loopback, and no
// others (notrack.go).
func setServed(t testing.TB, b *pinhole.Backend, ifaces []string, addrs ...netip.Addr) {
	t.Helper()
	if err := b.SetServed(addrs, ifaces); err != nil {
		t.Fatalf("SetServed: %v", err)
	}
}

// serveTunnel: pcpd serves on Host's addresses towards Client, as it does
// on a WireGuard interface, through the tunnel and the WAN interface: the
// owner meter's tests send spoofed sources from the WAN as from another
// interface pcpd serves (a datagram from an interface pcpd does not serve
// skips the meter: TestServingInterfacesOnlyL1).
func serveTunnel(t testing.TB, b *pinhole.Backend, topo *netlab.Topology) {
	t.Helper()
	setServed(t, b, []string{topo.HostLANIf, topo.HostWANIf}, topo.HostTunnelV6, topo.HostTunnelV4)
}

// meteredTunnel is a Backend on topo's Host serving the tunnel, with the
// owner meter the reverse-path and owner-chain tests use (200/s, burst
// 400, port 5351) and routes as the reverse-path rule's route source (nil:
// the Backend's default).
func meteredTunnel(t testing.TB, topo *netlab.Topology, routes pinhole.Routes) *pinhole.Backend {
	t.Helper()
	b := newBackend(t, topo.Host, pinhole.Config{Routes: routes,
		Meter: pinhole.Meter{Rate: 200, Burst: 400, Ports: []uint16{5351}}})
	serveTunnel(t, b, topo)
	return b
}

// guardedTopology is the three-namespace topology with pcpd's standalone
// table on Host guarding Client's prefixes, serving on Host's tunnel
// addresses.
func guardedTopology(t testing.TB, cfg pinhole.Config) (*netlab.Topology, *pinhole.Backend) {
	t.Helper()
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	b := newBackend(t, topo.Host, cfg)
	serveTunnel(t, b, topo)
	if err := b.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
		t.Fatalf("SetProtected: %v", err)
	}
	return topo, b
}

func apply(t testing.TB, b *pinhole.Backend, ops ...pinhole.Op) {
	t.Helper()
	if err := b.Apply(ops); err != nil {
		t.Fatalf("Apply: %v", err)
	}
}

func install(p pinhole.Pinhole, d time.Duration) pinhole.Op {
	return pinhole.Op{Kind: pinhole.Install, Pinhole: p, Timeout: d}
}

func del(p pinhole.Pinhole) pinhole.Op { return pinhole.Op{Kind: pinhole.Delete, Pinhole: p} }

// filtered22 is c6's TCP port 22 pinhole from the remote prefix pfx (a
// pin6_filter element).
func filtered22(pfx string) pinhole.Pinhole {
	return pinhole.Pinhole{Protocol: tcp, InternalAddr: c6, InternalPort: 22, ExternalAddr: c6, ExternalPort: 22,
		RemotePrefix: netip.MustParsePrefix(pfx)}
}

// reach tries one connection (TCP: connect and read the greeting; UDP: an
// echo round trip) from ns to addr, optionally from a given source address.
func reach(ns *netlab.NS, proto uint8, src netip.Addr, addr netip.AddrPort, timeout time.Duration) error {
	network := "tcp"
	if proto == udp {
		network = "udp"
	}
	return ns.Probe(network, netip.AddrPortFrom(src, 0), addr.String(), timeout)
}

// serve starts the TCP greeter or UDP echo server in ns on addr.
func serve(t *testing.T, ns *netlab.NS, proto uint8, addr netip.AddrPort) {
	t.Helper()
	if proto == tcp {
		ns.ServeTCP(t, addr.String())
	} else {
		ns.ServeUDPEcho(t, addr.String())
	}
}

func mustReach(t *testing.T, what string, ns *netlab.NS, proto uint8, src netip.Addr, addr netip.AddrPort) {
	t.Helper()
	if err := netlab.Eventually(okWait, func() error { return reach(ns, proto, src, addr, time.Second) }); err != nil {
		t.Fatalf("%s: %s from %v to %s: want reachable, got %v", what, protoName(proto), src, addr, err)
	}
}

func mustNotReach(t *testing.T, what string, ns *netlab.NS, proto uint8, src netip.Addr, addr netip.AddrPort) {
	t.Helper()
	if err := reach(ns, proto, src, addr, failWait); err == nil {
		t.Fatalf("%s: %s from %v to %s: want blocked, got through", what, protoName(proto), src, addr)
	}
}

func protoName(p uint8) string {
	switch p {
	case tcp:
		return "TCP"
	case udp:
		return "UDP"
	}
	return fmt.Sprint(p)
}

func nftList(t testing.TB, ns *netlab.NS, args ...string) string {
	t.Helper()
	out, err := ns.Run(append([]string{"nft", "list"}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// nsRoutes asks ns's routes (pinhole.NetlinkRoutes' lookups, unwatched:
// the tests that use it change routes and follow at once).
func nsRoutes(t testing.TB, ns *netlab.NS) pinhole.Routes {
	t.Helper()
	h, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	nl, err := netlink.NewHandleAt(h)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nl.Close)
	return pinhole.UnwatchedRoutes(nl)
}

// noRoutes knows no routes: every owned datagram's route is looked up
// (pinhole.Config.Routes nil, in a test that needs a Routes).
type noRoutes struct{}

func (noRoutes) Interfaces(netip.Prefix) ([]int, error) { return nil, nil }

// ifIndex is the index of ns's interface name.
func ifIndex(t testing.TB, ns *netlab.NS, name string) int {
	t.Helper()
	var i int
	if err := ns.Do(func() error {
		ifi, err := net.InterfaceByName(name)
		if err == nil {
			i = ifi.Index
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return i
}

// tamperNoticedAndRepaired runs the nft commands on ns (a tamper named
// name), then wants Healthy to report ErrUnhealthy and, after Setup, the
// table healthy again.
func tamperNoticedAndRepaired(t *testing.T, ns *netlab.NS, b *pinhole.Backend, name string, cmds [][]string) {
	t.Helper()
	for _, cmd := range cmds {
		ns.MustRun(t, append([]string{"nft"}, cmd...)...)
	}
	if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
		t.Fatalf("Healthy after %s: %v, want ErrUnhealthy", name, err)
	}
	if err := b.Setup(); err != nil {
		t.Fatal(err)
	}
	if err := b.Healthy(); err != nil {
		t.Fatalf("Healthy after %s and Setup: %v", name, err)
	}
}

// spoofTarget installs a UDP pinhole to the client's port 7000 (IPv6), or
// a NAPT mapping from the host's public port 17000 to it (v4), gives the
// Internet the spoofed address (spoofed6 or spoofed4) besides its own, and
// listens on the client's port (closed at the end of t). It returns where
// the Internet sends to, the Internet's real address, the spoofed one and
// the client's socket, as oneWay takes them.
func spoofTarget(t *testing.T, topo *netlab.Topology, b *pinhole.Backend, v4 bool, spoofed6, spoofed4 netip.Addr) (dst netip.AddrPort, real, spoofed netip.Addr, rx *net.UDPConn) {
	t.Helper()
	client, dst, real, spoofed := topo.ClientV6, netip.AddrPortFrom(topo.ClientV6, 7000), topo.InternetV6, spoofed6
	p := pinhole.Pinhole{Protocol: udp, InternalAddr: client, InternalPort: 7000}
	if v4 {
		client, dst, real, spoofed = topo.ClientV4, netip.AddrPortFrom(topo.HostPublicV4, 17000), topo.InternetV4, spoofed4
		p = pinhole.Pinhole{Protocol: udp, InternalAddr: client, InternalPort: 7000, ExternalAddr: topo.HostPublicV4, ExternalPort: 17000}
	}
	apply(t, b, install(p, time.Minute))
	topo.Internet.MustRun(t, "ip", "addr", "add", netip.PrefixFrom(spoofed, spoofed.BitLen()).String(), "dev", "eth0", "nodad")
	return dst, real, spoofed, listenUDP(t, topo.Client, netip.AddrPortFrom(client, 7000))
}

// eventuallyOneWay waits (okWait at the most) for a oneWay from src in ns
// to dst to reach rx.
func eventuallyOneWay(t *testing.T, ns *netlab.NS, src netip.Addr, dst netip.AddrPort, rx *net.UDPConn) error {
	t.Helper()
	return netlab.Eventually(okWait, func() error {
		if !oneWay(t, ns, src, dst, rx) {
			return errors.New("nothing arrived")
		}
		return nil
	})
}

// Helpers shared by the flow-cut tests (cutflows, natcut, attcut).

// guardedPinhole is guardedTopology with a TCP pinhole of the client's
// port installed for an hour; it returns the client's endpoint and the
// pinhole too.
func guardedPinhole(t *testing.T, port uint16) (*netlab.Topology, *pinhole.Backend, netip.AddrPort, pinhole.Pinhole) {
	t.Helper()
	topo, b := guardedTopology(t, pinhole.Config{})
	client := netip.AddrPortFrom(topo.ClientV6, port)
	p := pinhole.Pinhole{Protocol: tcp, InternalAddr: client.Addr(), InternalPort: client.Port()}
	apply(t, b, install(p, time.Hour))
	return topo, b, client, p
}

// checkUnlabelledCut reads CutsFlows and recheck6's mark, deletes p's
// pinhole and echoes over f, a connection let in unlabelled (no cut rule
// drops it): if it still carries data, neither may have said the cut
// holds. how ends the CutsFlows failure's "CutsFlows true " (when, and
// which connection: "after the repair, yet the connection let in ...").
func checkUnlabelledCut(t *testing.T, ns *netlab.NS, b *pinhole.Backend, p pinhole.Pinhole, f *echoFlow, how string) {
	t.Helper()
	cuts, marked := b.CutsFlows(p), markedChecked(t, ns, "recheck6")
	apply(t, b, del(p))
	err := f.echo(failWait)
	if err == nil && cuts {
		t.Error("CutsFlows true " + how + " carries data after its pinhole's delete")
	}
	if err == nil && marked {
		t.Error("recheck6 marked checked with a connection let in unlabelled alive (a later start trusts the mark)")
	}
	t.Logf("CutsFlows %v, marked %v, echo after the delete: %v", cuts, marked, err)
}

// setupSparesThenCuts is a repair's Setup, re-install and Arm over f, a
// connection labelled through p's pinhole whose element is gone: f must
// go on through the Setup (the cut laid out disarmed), then, armed, be
// cut after p's delete. repaired names the state in the first failure.
func setupSparesThenCuts(t *testing.T, b *pinhole.Backend, p pinhole.Pinhole, f *echoFlow, repaired string) {
	t.Helper()
	if err := b.Setup(); err != nil {
		t.Fatal(err)
	}
	if err := f.echo(okWait); err != nil {
		t.Errorf("%s, its pinhole not yet re-installed: the connection: %v (Armed %v), want it to go on", repaired, err, b.Armed())
	}
	apply(t, b, install(p, time.Hour)) // the re-install
	if err := b.Arm(); err != nil {
		t.Fatal(err)
	}
	b.VerifySetup()
	if !b.Armed() || !b.CutsFlows(p) {
		t.Errorf("re-installed and armed: Armed %v, CutsFlows %v", b.Armed(), b.CutsFlows(p))
	}
	if err := f.echo(okWait); err != nil {
		t.Errorf("armed: the connection: %v", err)
	}
	apply(t, b, del(p))
	if err := f.echo(failWait); !isTimeout(err) {
		t.Errorf("armed, pinhole deleted: the connection: %v, want a timeout (cut)", err)
	}
}

// checkFlowCut echoes over f within wait: a cut flow must be dropped (a
// timeout), any other must carry data. A failure names step and the
// flow, and lists ns's inet table (where the cut rules are).
func checkFlowCut(t *testing.T, ns *netlab.NS, table, step, name string, f *echoFlow, cut bool, wait time.Duration) {
	t.Helper()
	err := f.echo(wait)
	switch {
	case cut && err == nil:
		t.Errorf("%s: the %s flow still carries data:\n%s", step, name, nftList(t, ns, "table", "inet", table))
	case cut && !isTimeout(err):
		t.Errorf("%s: the %s flow: %v, want a timeout (dropped)", step, name, err)
	case !cut && err != nil:
		t.Errorf("%s: the %s flow: %v, want it to go on", step, name, err)
	}
}

// wantConntrackEntry wants ns's conntrack table to hold an entry with
// destination port port (a cut flow's entry is left: no walk at this
// level); what prefixes the failure.
func wantConntrackEntry(t *testing.T, ns *netlab.NS, what string, port uint16) {
	t.Helper()
	if out := ns.MustRun(t, "cat", "/proc/net/nf_conntrack"); !strings.Contains(out, fmt.Sprintf("dport=%d ", port)) {
		t.Errorf("%sno conntrack entry of the flow left:\n%s", what, out)
	}
}

// waitNoElements waits up to 10 s for b to list no element (the kernel
// timed them all out).
func waitNoElements(t *testing.T, b *pinhole.Backend) {
	t.Helper()
	if err := netlab.Eventually(10*time.Second, func() error {
		es, err := b.List()
		if err != nil {
			return err
		}
		if len(es) > 0 {
			return fmt.Errorf("%d elements left", len(es))
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// refusingBackend is a Backend on ns whose kernel refuses part of the
// layout (refuse: pinhole.RefuseLabels, pinhole.RefuseNATCut), set up;
// what names the refusal in Setup's failure. The caller tears it down.
func refusingBackend(t *testing.T, ns *netlab.NS, refuse func(*pinhole.Backend), what string) *pinhole.Backend {
	t.Helper()
	conn, err := ns.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	b, err := pinhole.New(conn, pinhole.Config{Routes: nsRoutes(t, ns)})
	if err != nil {
		t.Fatal(err)
	}
	refuse(b)
	if err := b.Setup(); err != nil {
		t.Fatalf("Setup with %s: %v", what, err)
	}
	return b
}

// replaceRule replaces the rule of chain in ns's inet pcpd table whose
// listed line re matches up to its handle (re is followed by " # handle
// N") with rule; fatal when none matches.
func replaceRule(t *testing.T, ns *netlab.NS, chain, re string, rule ...string) {
	t.Helper()
	out := ns.MustRun(t, "nft", "-a", "list", "chain", "inet", "pcpd", chain)
	m := regexp.MustCompile(re + ` # handle (\d+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no %s in %s:\n%s", re, chain, out)
	}
	ns.MustRun(t, append([]string{"nft", "replace", "rule", "inet", "pcpd", chain, "handle", m[1]}, rule...)...)
}

// tamperedThenRepaired runs each tamper, then wants Healthy to report
// ErrUnhealthy (listing what list returns if not) and, after Setup, the
// table healthy again.
func tamperedThenRepaired(t *testing.T, b *pinhole.Backend, what string, list func() string, tampers ...func()) {
	t.Helper()
	for _, tamper := range tampers {
		tamper()
		if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
			t.Errorf("Healthy = %v after %s:\n%s", err, what, list())
		}
		if err := b.Setup(); err != nil {
			t.Fatal(err)
		}
		if err := b.Healthy(); err != nil {
			t.Fatalf("Healthy after Setup: %v", err)
		}
	}
}

// layoutMode is a layout a test runs a Backend in: standalone, or
// attached to an admin's table (whose prefix its objects then carry).
type layoutMode struct {
	name, table, prefix string
	cfg                 pinhole.Config
}

// bothModes are the standalone and attached layouts.
var bothModes = []layoutMode{
	{"standalone", "pcpd", "", pinhole.Config{Routes: noRoutes{}}},
	{"attached", "filter", "pcpd_", pinhole.Config{Routes: noRoutes{}, Table: "filter", Attached: true, Chain: "pcpd"}},
}

// backendIn makes a namespace and a Backend in it laid out as mode (the
// admin's ruleset loaded first when attached).
func backendIn(t *testing.T, name string, mode layoutMode) (*netlab.NS, *pinhole.Backend) {
	t.Helper()
	ns := netlab.NewNS(t, name)
	if mode.cfg.Attached {
		loadNft(t, ns, adminRuleset)
	}
	return ns, newBackend(t, ns, mode.cfg)
}
