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
