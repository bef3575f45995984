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
	var left []string
	for _, f := range forged {
		if out := l.topo.Host.MustRun(t, "nft", "list", "map", "inet", "pcpd", f[0]); strings.Contains(out, f[1]) {
			left = append(left, f[0]+" { "+f[1]+" }")
		}
	}
	if len(left) > 0 {
		return fmt.Errorf("still held (no lease): %q", left)
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
