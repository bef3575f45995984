package server

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

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
