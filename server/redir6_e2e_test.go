package server

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// oddRedir6 is the setup of TestE2EWatchUndoesOddRedir6Filter and
// TestE2EAuditOddRedir6Filter (h/redir6): two live leases (a filtered MAP
// c:443 from 2001:db8:eeee::/48, a pin6_filter element, and a filtered
// redirect c:8445 -> c:445 from the same /48, a redir6_filter one), then
// four elements added by hand in shapes pcpd never writes there, three to
// redir6_filter, which decoded (pinhole.kindOf) as pin6_filter pinholes:
//   - c:443 -> c:443 from the live /48 (equal ports): the live MAP's own
//     pinhole, so the watch and the audit took it for held and left it;
//   - c:444 -> c:444 from the internet's /48 (equal ports, no lease);
//   - c:0-65535 -> c:443 from the internet's /48 (every port of c
//     redirected to 443);
//
// and c:446 -> c:446 to redir6, which decoded as a pin6 pinhole.
//
// Their undo was a Delete in pin6_filter: each stayed, the last one
// admitting the internet to any port of c (the equal-port ones DNAT a
// flow to where it goes, which conntrack does not count as a DNAT: the
// guard's "ct status dnat accept" does not pass it). It returns the
// live pinholes, the elements added (set: nft's syntax) and the port
// reached through the all-ports one.
func oddRedir6(t *testing.T, l *lab) (live []pinhole.Pinhole, forged [][2]string, anyPort uint16) {
	c := l.topo.ClientV6
	for _, port := range []uint16{443, 444, 445} {
		l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c, port).String())
	}
	lp := netip.MustParsePrefix("2001:db8:eeee::/48")
	inet := netip.PrefixFrom(l.topo.InternetV6, 48).Masked()
	if resp := l.pcp(mapFiltered(c, 443, 0, lp, 1)); resp.Result != pcp.Success || resp.Map.ExternalPort != 443 {
		t.Fatalf("filtered MAP: %+v", resp)
	}
	if resp := l.pcp(mapFiltered(c, 445, 8445, lp, 2)); resp.Result != pcp.Success || resp.Map.ExternalPort != 8445 {
		t.Fatalf("filtered redirect MAP: %+v", resp)
	}
	live = []pinhole.Pinhole{
		{Protocol: 6, InternalAddr: c, InternalPort: 443, ExternalAddr: c, ExternalPort: 443, RemotePrefix: lp},
		{Protocol: 6, InternalAddr: c, InternalPort: 445, ExternalAddr: c, ExternalPort: 8445, RemotePrefix: lp},
	}
	forged = [][2]string{
		{"redir6_filter", fmt.Sprintf("%s . tcp . 443 . %s . 0-65535 : %s . 443", c, lp, c)},
		{"redir6_filter", fmt.Sprintf("%s . tcp . 444 . %s . 0-65535 : %s . 444", c, inet, c)},
		{"redir6_filter", fmt.Sprintf("%s . tcp . 0-65535 . %s . 0-65535 : %s . 443", c, inet, c)},
		{"redir6", fmt.Sprintf("%s . tcp . 446 : %s . 446", c, c)},
	}
	anyPort = 9999
	if l.reach(netip.AddrPortFrom(c, 444)) || l.reach(netip.AddrPortFrom(c, anyPort)) {
		t.Fatal("c:444 or c:9999 reachable from the internet before any tampering")
	}
	for _, f := range forged {
		l.topo.Host.MustRun(t, "nft", "add", "element", "inet", "pcpd", f[0], "{ "+f[1]+" }")
	}
	if l.srv.cfg.NoFirewallWatch && !l.reach(netip.AddrPortFrom(c, anyPort)) { // the watch may have undone it already
		t.Fatal("the all-ports element added by hand admits nothing: the test proves nothing")
	}
	return live, forged, anyPort
}

// oddRedir6Left is what of oddRedir6's forged elements the kernel still
// holds, and whether it lost the live redirect's element or the live
// MAP's (nil: all as it should be).
func oddRedir6Left(t *testing.T, l *lab, live []pinhole.Pinhole, forged [][2]string) error {
	if err := byHandLeft(t, l, forged); err != nil {
		return err
	}
	for _, p := range live {
		if at, held := l.kernelElem(p); !held || at > time.Hour {
			return fmt.Errorf("live %s held %v, %v left (want held, at most 1h)", p, held, at)
		}
	}
	return nil
}

// TestE2EWatchUndoesOddRedir6Filter (h/redir6): the watch removes
// oddRedir6's elements added by hand to redir6_filter, the live leases'
// elements left, and the internet no longer reaches c:444 nor c:9999.
// Before, 'still held (no lease): [...]' (all four) after 20s.
func TestE2EWatchUndoesOddRedir6Filter(t *testing.T) {
	l := watchLab(t)
	live, forged, anyPort := oddRedir6(t, l)
	l.marker(t, 7230)
	if err := netlab.Eventually(watchBound, func() error { return oddRedir6Left(t, l, live, forged) }); err != nil {
		t.Fatalf("elements of shapes pcpd never writes added by hand to redir6_filter and redir6: %v after %v", err, watchBound)
	}
	c := l.topo.ClientV6
	if l.reach(netip.AddrPortFrom(c, 444)) || l.reach(netip.AddrPortFrom(c, anyPort)) {
		t.Fatal("c:444 or c:9999 reachable from the internet after the undo")
	}
}

// TestE2EAuditOddRedir6Filter (h/redir6): with the watch off, one audit
// removes oddRedir6's elements, the live leases' elements left.
func TestE2EAuditOddRedir6Filter(t *testing.T) {
	l := watchLab(t, func(c *Config, _ *policy.Config) { c.NoFirewallWatch = true })
	live, forged, anyPort := oddRedir6(t, l)
	l.srv.auditFirewall(context.Background())
	if err := oddRedir6Left(t, l, live, forged); err != nil {
		t.Fatalf("audit: %v", err)
	}
	c := l.topo.ClientV6
	if l.reach(netip.AddrPortFrom(c, 444)) || l.reach(netip.AddrPortFrom(c, anyPort)) {
		t.Fatal("audit: c:444 or c:9999 reachable from the internet after the audit")
	}
}

// equalEdge is the setup of TestE2EWatchUndoesEqualEdgeOnLiveMapping and
// TestE2EAuditEqualEdgeOnLiveMapping (h/redir6): the equal-edge form of
// TestE2EWatchUndoesNarrowerOnLiveMapping. One transaction by hand
// deletes a live filtered mapping's napt4_filter element (pub:19090 from
// the internet's /24 -> c4:9090) and adds a narrower one on the same
// endpoints that starts where it starts (the /24's first /25, permanent,
// no SNAT companion). The live element's put-back starts inside the
// foreign one (refused), and so does the foreign one's would-be SNAT
// companion inside the live companion, which the hand left: the foreign
// Delete's guard add is refused unless the live companion is taken out
// first, and the live mapping's Delete (its take-out) is refused too, its
// own guard add starting inside the foreign element. It returns the live
// and the foreign pinholes.
func equalEdge(t *testing.T, l *lab) (live, foreign pinhole.Pinhole) {
	c4, pub, inet4 := l.topo.ClientV4, l.topo.HostPublicV4, l.topo.InternetV4
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c4, 9090).String())
	wide := netip.PrefixFrom(inet4, 24).Masked()
	if resp := l.pcp(mapFiltered(c4, 9090, 19090, wide, 1)); resp.Result != pcp.Success || resp.Map.ExternalPort != 19090 {
		t.Fatalf("filtered MAP IPv4: %+v", resp)
	}
	narrow := netip.PrefixFrom(wide.Addr(), 25)
	l.topo.Host.MustRun(t, "sh", "-c", fmt.Sprintf("nft -f - <<'EOF'\ndelete element inet pcpd napt4_filter { %s . tcp . 19090 . %s . 0-65535 }\nadd element inet pcpd napt4_filter { %s . tcp . 19090 . %s . 0-65535 : %s . 9090 }\nEOF\n",
		pub, wide, pub, narrow, c4))
	live = pinhole.Pinhole{Protocol: 6, InternalAddr: c4, InternalPort: 9090, ExternalAddr: pub, ExternalPort: 19090, RemotePrefix: wide}
	foreign = live
	foreign.RemotePrefix = narrow
	return live, foreign
}

// equalEdgeLeft says what is wrong after equalEdge's undo: the foreign
// element still there, the live one missing or beyond its lease, its
// companion not alone in snat4_filter (nil: all as it should be).
func equalEdgeLeft(t *testing.T, l *lab, live, foreign pinhole.Pinhole) error {
	if _, held := l.kernelElem(foreign); held {
		return fmt.Errorf("pub:19090 from %s -> c4:9090 (no lease) still in napt4_filter", foreign.RemotePrefix)
	}
	if left, held := l.kernelElem(live); !held || left > time.Hour {
		return fmt.Errorf("the live filtered mapping held %v, %v left (want held, at most 1h)", held, left)
	}
	out := l.topo.Host.MustRun(t, "nft", "list", "map", "inet", "pcpd", "snat4_filter")
	if !strings.Contains(out, fmt.Sprintf("%s . tcp . 9090 . %s", live.InternalAddr, live.RemotePrefix)) || strings.Contains(out, foreign.RemotePrefix.String()) {
		return fmt.Errorf("snat4_filter: want the live mapping's companion alone:\n%s", out)
	}
	return nil
}

// TestE2EWatchUndoesEqualEdgeOnLiveMapping (h/redir6): the watch removes
// equalEdge's foreign element and puts the live one back, its companion
// alone, and the mapping passes traffic. Before, 'pub:19090 from
// 198.51.100.0/25 -> c4:9090 (no lease) still in napt4_filter' after 20s.
func TestE2EWatchUndoesEqualEdgeOnLiveMapping(t *testing.T) {
	l := watchLab(t)
	live, foreign := equalEdge(t, l)
	l.marker(t, 7240)
	if err := netlab.Eventually(watchBound, func() error { return equalEdgeLeft(t, l, live, foreign) }); err != nil {
		t.Fatalf("live filtered mapping replaced by hand by a narrower one from its start: %v after %v", err, watchBound)
	}
	if !l.reach(netip.AddrPortFrom(live.ExternalAddr, live.ExternalPort)) {
		t.Fatal("the live filtered mapping passes no traffic after the undo")
	}
}

// TestE2EAuditEqualEdgeOnLiveMapping (h/redir6): with the watch off, one
// audit does the same.
func TestE2EAuditEqualEdgeOnLiveMapping(t *testing.T) {
	l := watchLab(t, func(c *Config, _ *policy.Config) { c.NoFirewallWatch = true })
	live, foreign := equalEdge(t, l)
	l.srv.auditFirewall(context.Background())
	if err := equalEdgeLeft(t, l, live, foreign); err != nil {
		t.Fatalf("audit: %v", err)
	}
	if !l.reach(netip.AddrPortFrom(live.ExternalAddr, live.ExternalPort)) {
		t.Fatal("audit: the live filtered mapping passes no traffic")
	}
}

// allPortsOver is the setup of TestE2EWatchPutsBackUnderAllPorts and
// TestE2EAuditPutsBackUnderAllPorts (h/redir6): one transaction by hand
// deletes a live lease's pin6_filter element (c:443 from
// 2001:db8:ffff::/48) and adds an all-ports one on the same address
// (c, every port, from ::/0, 1 h). The live element's put-back starts
// inside the foreign one (refused); the foreign one's undo, its Delete,
// did not put the live one back after it: the table has no index by
// address, and sharers looks only at the all-ports tuple for it. It
// returns the live and the foreign pinholes.
func allPortsOver(t *testing.T, l *lab) (live, foreign pinhole.Pinhole) {
	c := l.topo.ClientV6
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c, 443).String())
	from := netip.MustParsePrefix("2001:db8:ffff::/48")
	if resp := l.pcp(mapFiltered(c, 443, 0, from, 1)); resp.Result != pcp.Success {
		t.Fatalf("filtered MAP: %+v", resp)
	}
	l.topo.Host.MustRun(t, "sh", "-c", fmt.Sprintf("nft -f - <<'EOF'\ndelete element inet pcpd pin6_filter { %s . tcp . 443 . %s . 0-65535 }\nadd element inet pcpd pin6_filter { %s . tcp . 0-65535 . ::/0 . 0-65535 timeout 1h }\nEOF\n",
		c, from, c))
	live = pinhole.Pinhole{Protocol: 6, InternalAddr: c, InternalPort: 443, ExternalAddr: c, ExternalPort: 443, RemotePrefix: from}
	foreign = pinhole.Pinhole{Protocol: 6, InternalAddr: c, ExternalAddr: c, RemotePrefix: netip.MustParsePrefix("::/0")}
	return live, foreign
}

// allPortsLeft says what is wrong after allPortsOver's undo (nil: all
// as it should be).
func allPortsLeft(l *lab, live, foreign pinhole.Pinhole) error {
	if _, held := l.kernelElem(foreign); held {
		return fmt.Errorf("c, every port, from ::/0 (no lease) still in pin6_filter")
	}
	if left, held := l.kernelElem(live); !held || left > time.Hour {
		return fmt.Errorf("the live filtered pinhole held %v, %v left (want held, at most 1h)", held, left)
	}
	return nil
}

// TestE2EWatchPutsBackUnderAllPorts (h/redir6): the watch removes
// allPortsOver's foreign element and puts the live one back. Before,
// 'the live filtered pinhole held false' after 20s (until the audit).
func TestE2EWatchPutsBackUnderAllPorts(t *testing.T) {
	l := watchLab(t)
	live, foreign := allPortsOver(t, l)
	l.marker(t, 7250)
	if err := netlab.Eventually(watchBound, func() error { return allPortsLeft(l, live, foreign) }); err != nil {
		t.Fatalf("live filtered element replaced by hand by an all-ports one: %v after %v", err, watchBound)
	}
	if l.reach(netip.AddrPortFrom(live.InternalAddr, 444)) {
		t.Fatal("c:444 reachable from the internet after the undo")
	}
	if !l.reach(netip.AddrPortFrom(live.InternalAddr, 443)) {
		t.Fatal("the live filtered pinhole passes no traffic after the undo")
	}
}

// TestE2EAuditPutsBackUnderAllPorts (h/redir6): with the watch off, one
// audit does the same.
func TestE2EAuditPutsBackUnderAllPorts(t *testing.T) {
	l := watchLab(t, func(c *Config, _ *policy.Config) { c.NoFirewallWatch = true })
	live, foreign := allPortsOver(t, l)
	l.srv.auditFirewall(context.Background())
	if err := allPortsLeft(l, live, foreign); err != nil {
		t.Fatalf("audit: %v", err)
	}
	if !l.reach(netip.AddrPortFrom(live.InternalAddr, 443)) {
		t.Fatal("audit: the live filtered pinhole passes no traffic")
	}
}

// byHandLeft says which of forged (set: element, nft's syntax) the
// kernel still holds (nil: none).
func byHandLeft(t *testing.T, l *lab, forged [][2]string) error {
	var left []string
	for _, f := range forged {
		what := "set"
		if strings.Contains(f[1], " : ") {
			what = "map"
		}
		if out := l.topo.Host.MustRun(t, "nft", "list", what, "inet", "pcpd", f[0]); strings.Contains(out, f[1]) {
			left = append(left, f[0]+" { "+f[1]+" }")
		}
	}
	if len(left) > 0 {
		return fmt.Errorf("still held (no lease): %q", left)
	}
	return nil
}

// unreadable is the setup of TestE2EWatchUndoesUnreadable and
// TestE2EAuditUndoesUnreadable (h/redir6): a live MAP (c:443) and three
// elements added by hand that no Pinhole can read: c:1000-2000 from
// everywhere (pin6_filter, a port range neither one port nor all), c:3000
// from 2001:db8:ffff::1-2001:db8:ffff::5 (pin6_filter, a remote range that
// is not a prefix), c:8080 -> another address's port 22 (redir6). Decode
// failed on each: the watch did not tell them and List failed, so the
// audit fixed nothing while they stayed. It returns the live pinhole and
// the elements added (set: nft's syntax).
func unreadable(t *testing.T, l *lab) (live pinhole.Pinhole, forged [][2]string) {
	live = liveMAP443(t, l)
	c := live.InternalAddr
	other := netip.MustParseAddr("2001:db8:1:2::11")
	forged = [][2]string{
		{"pin6_filter", fmt.Sprintf("%s . tcp . 1000-2000 . ::/0 . 0-65535", c)},
		{"pin6_filter", fmt.Sprintf("%s . tcp . 3000 . 2001:db8:ffff::1-2001:db8:ffff::5 . 0-65535", c)},
		{"redir6", fmt.Sprintf("%s . tcp . 8080 : %s . 22", c, other)},
	}
	for _, f := range forged {
		l.topo.Host.MustRun(t, "nft", "add", "element", "inet", "pcpd", f[0], "{ "+f[1]+" }")
	}
	if l.srv.cfg.NoFirewallWatch && !l.reach(netip.AddrPortFrom(c, 1500)) { // the watch may have undone it already
		t.Fatal("c:1000-2000 added by hand admits nothing: the test proves nothing")
	}
	return live, forged
}

// liveMAP443 serves c:443 and c:1500, maps c:443 (the live MAP it
// returns) and checks that the internet does not reach c:1500.
func liveMAP443(t *testing.T, l *lab) pinhole.Pinhole {
	c := l.topo.ClientV6
	for _, port := range []uint16{443, 1500} {
		l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c, port).String())
	}
	if resp := l.pcp(mapReq(c, pcp.ProtoTCP, 443, 0, time.Hour, 1)); resp.Result != pcp.Success {
		t.Fatalf("MAP: %+v", resp)
	}
	if l.reach(netip.AddrPortFrom(c, 1500)) {
		t.Fatal("c:1500 reachable from the internet before any tampering")
	}
	return pinhole.Pinhole{Protocol: 6, InternalAddr: c, InternalPort: 443, ExternalAddr: c, ExternalPort: 443}
}

// TestE2EWatchUndoesUnreadable (h/redir6): the watch removes unreadable's
// elements, the live MAP's kept, c:1500 refused. Before, 'still held (no
// lease): [all three]' after 20s.
func TestE2EWatchUndoesUnreadable(t *testing.T) {
	l := watchLab(t)
	live, forged := unreadable(t, l)
	l.marker(t, 7260)
	if err := netlab.Eventually(watchBound, func() error { return byHandLeft(t, l, forged) }); err != nil {
		t.Fatalf("elements no Pinhole can read added by hand: %v after %v", err, watchBound)
	}
	if _, held := l.kernelElem(live); !held {
		t.Fatal("the live MAP's element gone")
	}
	if l.reach(netip.AddrPortFrom(live.InternalAddr, 1500)) {
		t.Fatal("c:1500 reachable from the internet after the undo")
	}
}

// TestE2EAuditUndoesUnreadable (h/redir6): with the watch off, and the
// live MAP's element deleted by hand as well, one audit removes
// unreadable's elements and puts the live one back. Before, 'still held
// (no lease): [all three]' and the live element missing: List failed
// ('firewall audit: cannot list pinholes'), the audit fixed nothing.
func TestE2EAuditUndoesUnreadable(t *testing.T) {
	l := watchLab(t, func(c *Config, _ *policy.Config) { c.NoFirewallWatch = true })
	live, forged := unreadable(t, l)
	l.topo.Host.MustRun(t, "nft", "delete", "element", "inet", "pcpd", "pin6", fmt.Sprintf("{ %s . tcp . 443 }", live.InternalAddr))
	l.srv.auditFirewall(context.Background())
	if err := byHandLeft(t, l, forged); err != nil {
		t.Errorf("audit: %v", err)
	}
	if left, held := l.kernelElem(live); !held || left > time.Hour {
		t.Errorf("audit: the live MAP's element held %v, %v left (want held, at most 1h)", held, left)
	}
	if l.reach(netip.AddrPortFrom(live.InternalAddr, 1500)) {
		t.Error("audit: c:1500 reachable from the internet")
	}
}
