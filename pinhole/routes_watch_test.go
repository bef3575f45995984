package pinhole_test

import (
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// countingRoutes counts the route asks of a watched Routes.
type countingRoutes struct {
	r interface {
		pinhole.Routes
		pinhole.RouteWatcher
	}
	n atomic.Int64
}

func (c *countingRoutes) Interfaces(p netip.Prefix) ([]int, error) {
	c.n.Add(1)
	return c.r.Interfaces(p)
}
func (c *countingRoutes) Generation() (uint64, bool) { return c.r.Generation() }
func (c *countingRoutes) Changes() <-chan struct{}   { return c.r.Changes() }

// TestFollowRoutesWatched (review of 2026-12-03): with the host's links,
// addresses, routes and rules watched (NetlinkRoutesAt, as pcpd's
// NetlinkRoutes()), FollowRoutes skips its lookups while nothing
// changed (≈ 49 ms a round at 1 000 owners, every 5 s, before), and a
// change is still followed: a route moved, a policy rule added (no
// interfaces then), and an interface deleted, whose deletion the watch
// reports at once (Changes; pcpd follows it then, not up to 5 s later,
// when its index could have been reused by a device moved in).
func TestFollowRoutesWatched(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	h, err := topo.Host.Handle()
	if err != nil {
		t.Fatal(err)
	}
	r, err := pinhole.NetlinkRoutesAt(h)
	h.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	routes := &countingRoutes{r: r}
	b := meteredTunnel(t, topo, routes)
	pfx6, pfx4 := netip.MustParsePrefix("2001:db8:77::/48"), netip.MustParsePrefix("10.77.0.0/16")
	via := func(dev string, gw6, gw4 netip.Addr) {
		topo.Host.MustRun(t, "ip", "-6", "route", "replace", pfx6.String(), "via", gw6.String(), "dev", dev)
		topo.Host.MustRun(t, "ip", "-4", "route", "replace", pfx4.String(), "via", gw4.String(), "dev", dev)
	}
	via(topo.HostLANIf, topo.ClientV6, topo.ClientV4)
	owners := []pinhole.Owner{{ID: "static:w", Prefixes: []netip.Prefix{pfx6, pfx4}}}
	if err := b.SetOwners(owners, nil); err != nil {
		t.Fatal(err)
	}
	chain := pinhole.OwnerChains(owners)["static:w"]
	// calm is the watch's generation when quiet last returned.
	var calm uint64
	quiet := func() {
		// Until the watch has seen nothing for 300 ms (the namespace's
		// own late notifications, DAD and the like, pass first).
		t.Helper()
		for range 50 {
			g, ok := r.Generation()
			if !ok {
				t.Fatal("the watch cannot tell")
			}
			time.Sleep(300 * time.Millisecond)
			if g2, _ := r.Generation(); g2 == g {
				for len(r.Changes()) > 0 {
					<-r.Changes()
				}
				calm = g
				return
			}
		}
		t.Fatal("the namespace never went quiet")
	}
	follow := func(what string, wantAsks bool, wantIf string) {
		t.Helper()
		for late := 0; ; late++ {
			before := routes.n.Load()
			if err := b.FollowRoutes(); err != nil {
				t.Fatalf("%s: FollowRoutes: %v", what, err)
			}
			asked := routes.n.Load() - before
			// Asks where none were wanted, the watch having told a
			// change since the namespace was last quiet: a late
			// notification of the namespace's own (CI 41: the move's,
			// past the 300 ms quiet), not FollowRoutes asking with
			// nothing told; wait for quiet again (at most 5 times).
			// With nothing told since, asks are a failure.
			if g, _ := r.Generation(); asked > 0 && !wantAsks && g != calm && late < 5 {
				quiet()
				continue
			}
			if asked > 0 != wantAsks {
				t.Errorf("%s: FollowRoutes asked %d routes, want asks %v", what, asked, wantAsks)
			}
			break
		}
		out := nftList(t, topo.Host, "chain", "inet", "pcpd", chain)
		if wantIf == "" && strings.Contains(out, "iif !=") || wantIf != "" && !strings.Contains(out, `iif != "`+wantIf+`"`) {
			t.Errorf("%s: owner chain, want interface %q:\n%s", what, wantIf, out)
		}
	}
	changed := func(what string) {
		t.Helper()
		select {
		case <-r.Changes():
		case <-time.After(time.Second):
			t.Fatalf("%s: the watch did not tell within 1 s", what)
		}
	}
	quiet()
	follow("after SetOwners", true, topo.HostLANIf)
	for i := range 3 {
		follow("nothing changed "+string(rune('1'+i)), false, topo.HostLANIf)
	}
	via(topo.HostWANIf, topo.InternetV6, topo.InternetV4)
	changed("route moved")
	follow("route moved", true, topo.HostWANIf)
	quiet()
	follow("nothing changed after the move", false, topo.HostWANIf)
	topo.Host.MustRun(t, "ip", "rule", "add", "from", "10.99.0.0/16", "lookup", "100", "priority", "100")
	changed("policy rule added")
	follow("policy rule added", true, "")
	topo.Host.MustRun(t, "ip", "rule", "del", "priority", "100")
	changed("policy rule removed")
	// An interface of the host's, the owner's prefixes routed through it,
	// then deleted.
	if err := netlab.Veth(topo.Host, "lan9", netlab.NewNS(t, "lan9"), "eth0"); err != nil {
		t.Fatal(err)
	}
	topo.Host.MustRun(t, "ip", "addr", "add", "2001:db8:99::1/64", "dev", "lan9", "nodad")
	topo.Host.MustRun(t, "ip", "addr", "add", "10.99.0.1/24", "dev", "lan9")
	via("lan9", netip.MustParseAddr("2001:db8:99::2"), netip.MustParseAddr("10.99.0.2"))
	quiet()
	follow("routed through lan9", true, "lan9")
	topo.Host.MustRun(t, "ip", "link", "del", "lan9")
	changed("lan9 deleted")
	follow("lan9 deleted", true, "")
}
