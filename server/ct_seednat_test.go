package server

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/policy"
)

// labelCutter is a FlowCutter whose DNAT rules label with bit (labels:
// whether they label at all): a NATLabeller.
type labelCutter struct {
	cutterFunc
	bit    int
	labels bool
}

func (c labelCutter) NATLabel() (int, bool) { return c.bit, c.labels }

// labelBitmap is the kernel's 128-bit label bitmap with bits set.
func labelBitmap(bits ...int) []byte {
	b := make([]byte, 16)
	for _, n := range bits {
		b[n/8] |= 1 << (n % 8)
	}
	return b
}

// TestSeedNATPriorLabelledOnly (root, a namespace of its own; issue 9,
// review h/revprio's left): with a firewall that labels its DNAT-ed
// flows (NATLabeller), a KeepConnections start records the former
// targets of the flows carrying that label only: pcpd's own NAPT and
// redirect flows, not an admin's DNAT-ed flows (unlabelled: a port
// forward, to the same public endpoint as pcpd's flow or to another),
// nor another table's pcpd's (another bit). An endpoint with pcpd's
// flow and the admin's is not "several" (a retake would walk every
// flow to it). A firewall whose DNAT rules label nothing: nothing
// recorded (CutsFlows is false for the DNAT kinds, no retarget walk).
// Before, every DNAT-ed flow, both rows: "seeded [192.0.2.1:5000/6→
// 10.0.0.2:80 192.0.2.1:5001/6→several 192.0.2.1:7000/6→192.0.2.1:8080
// 192.0.2.1:7001/17→10.0.0.3:53 [2001:db8:1::2]:8080/6→
// [2001:db8:1::2]:443]".
func TestSeedNATPriorLabelledOnly(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "seednatlb")
	// Labels are kept only once a rule of the namespace sets one.
	ns.MustRun(t, "nft", "add table inet seednat; add chain inet seednat c; add rule inet seednat c ct label set 126")
	ap := netip.MustParseAddrPort
	const seen = 2 | 4
	own, other := labelBitmap(126), labelBitmap(100)
	entries := []netlab.ConntrackEntry{
		// pcpd's: an IPv4 NAPT flow, an IPv6 redirect (an admin's own
		// label bit 3 beside it).
		{Proto: protoTCP, Src: ap("203.0.113.1:40000"), Dst: ap("192.0.2.1:5000"), DNAT: ap("10.0.0.2:80"), Status: seen, Labels: own},
		{Proto: protoTCP, Src: ap("[2001:db8:ff::1]:40000"), Dst: ap("[2001:db8:1::2]:8080"), DNAT: ap("[2001:db8:1::2]:443"), Status: seen, Labels: labelBitmap(3, 126)},
		// pcpd's flow and an admin's forward's to one endpoint.
		{Proto: protoTCP, Src: ap("203.0.113.1:40001"), Dst: ap("192.0.2.1:5001"), DNAT: ap("10.0.0.2:81"), Status: seen, Labels: own},
		{Proto: protoTCP, Src: ap("203.0.113.1:40002"), Dst: ap("192.0.2.1:5001"), DNAT: ap("10.100.2.7:80"), Status: seen},
		// The admin's forward of another port, to a local service.
		{Proto: protoTCP, Src: ap("203.0.113.1:40003"), Dst: ap("192.0.2.1:7000"), DNAT: ap("192.0.2.1:8080"), Status: seen},
		// Another table's pcpd.
		{Proto: protoUDP, Src: ap("203.0.113.1:40004"), Dst: ap("192.0.2.1:7001"), DNAT: ap("10.0.0.3:53"), Status: seen, Labels: other},
	}
	netlab.FillConntrack(t, ns, len(entries), func(i int) netlab.ConntrackEntry { return entries[i] })
	tg := func(a string, proto uint8, port uint16) ctTarget {
		return ctTarget{addr: netip.MustParseAddr(a), proto: proto, port: port}
	}
	for _, c := range []struct {
		name   string
		labels bool
		want   map[ctTarget]natPrior
	}{
		{"labelled DNAT rules", true, map[ctTarget]natPrior{
			tg("192.0.2.1", protoTCP, 5000):     {to: ap("10.0.0.2:80")},
			tg("2001:db8:1::2", protoTCP, 8080): {to: ap("[2001:db8:1::2]:443")},
			tg("192.0.2.1", protoTCP, 5001):     {to: ap("10.0.0.2:81")},
		}},
		{"unlabelled DNAT rules", false, map[ctTarget]natPrior{}},
	} {
		t.Run(c.name, func(t *testing.T) {
			s := seedServer(t, ns)
			s.cutter = labelCutter{cutterFunc: s.cutter.(cutterFunc), bit: 126, labels: c.labels}
			s.mu.Lock()
			s.seedNATPrior()
			got := maps.Clone(s.natPrior)
			s.mu.Unlock()
			if got == nil {
				got = map[ctTarget]natPrior{}
			}
			for k, e := range got {
				got[k] = natPrior{to: e.to, many: e.many}
			}
			if !maps.Equal(got, c.want) {
				t.Errorf("seeded %s\nwant %s", priorsString(got), priorsString(c.want))
			}
		})
	}
}

// priorsString is m as "endpoint/proto→target" (… several), sorted.
func priorsString(m map[ctTarget]natPrior) string {
	var out []string
	for t, e := range m {
		to := e.to.String()
		if e.many {
			to = "several"
		}
		out = append(out, fmt.Sprintf("%v/%d→%s", t.dst(), t.proto, to))
	}
	slices.Sort(out)
	return "[" + strings.Join(out, " ") + "]"
}

// TestE2ESeedSparesAdminDNAT (root, namespaces; issue 9, review
// h/revprio's left): the host's admin forwards public port 40080 to a
// local service (a DNAT rule of their own at dstnat, another table) and a
// connection from the Internet goes through it; pcpd, with
// KeepConnections, restarts, and a client is then granted that public
// port by NAT-PMP (pcpd cannot read the forward's rule). The admin's connection
// must survive: the start's seed recorded only pcpd's own DNAT-ed flows
// (labelled), so the install's retarget walk has nothing of the admin's
// to end. With nf_conntrack_tcp_loose=0 an ended entry is not picked up
// again, so the connection shows the walk. Failed before: "the admin's
// forwarded connection after pcpd's restart and the client's mapping
// 198.51.100.1:40080: read tcp 198.51.100.2:47080->198.51.100.1:40080:
// read: connection reset by peer (tracked: <nil>)". pcpd's own
// (labelled) flows are still recorded: TestE2ERetargetedEndpointCutsOldFlow's
// restart row.
func TestE2ESeedSparesAdminDNAT(t *testing.T) {
	l := newLab(t, func(cfg *Config, _ *policy.Config) { cfg.KeepConnections = true })
	h, pub := l.topo.Host, l.topo.HostPublicV4
	const port = 40080
	public, svc := netip.AddrPortFrom(pub, port), netip.AddrPortFrom(pub, 8080)
	h.MustRun(t, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0")
	h.MustRun(t, "nft", "add table ip admin")
	h.MustRun(t, "nft", "add chain ip admin pre { type nat hook prerouting priority dstnat; }")
	// A concatenation: since h/adminports pcpd reserves the ports of the
	// forwards it can read, and a client is granted only what it cannot
	// (README --reserved-ports).
	h.MustRun(t, "nft", fmt.Sprintf("add rule ip admin pre ip daddr . tcp dport { %s . %d } dnat to %s", pub, port, svc))
	serveEcho(t, h, svc)
	src := netip.AddrPortFrom(l.topo.InternetV4, 47080)
	c := dialIn(t, l.topo.Internet, src, public)
	if err := echoOnce(c); err != nil {
		t.Fatalf("the admin's port forward: %v", err)
	}
	l.stop()
	l.start() // KeepConnections: the seed reads conntrack
	got := l.pmpMap(t, 9090, port, time.Hour)
	if got != public {
		t.Fatalf("NAT-PMP mapping of 9090 suggesting %d: granted %v", port, got)
	}
	if err := echoOnce(c); err != nil {
		t.Fatalf("the admin's forwarded connection after pcpd's restart and the client's mapping %v: %v (tracked: %v)", got, err, l.ctFlow(t, src, public))
	}
	if f := l.ctFlow(t, src, public); f == nil || f.Reverse.SrcPort != svc.Port() {
		t.Fatalf("the admin's forwarded flow's entry: %v", f)
	}
}
