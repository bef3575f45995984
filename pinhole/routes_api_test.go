package pinhole_test

import (
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestNetlinkRoutesEveryFormWatches: every way to get NetlinkRoutes
// watches the namespace it asks (RouteWatcher: a generation it can tell,
// moved by a route added there, and not by one added elsewhere). A
// NetlinkRoutes given a netlink.Handle (the form before) watched nothing,
// so its FollowRoutes asked every round and pcpd followed a change only at
// its next check; the handle form is gone (its row failed: "the watch
// cannot tell").
func TestNetlinkRoutesEveryFormWatches(t *testing.T) {
	for _, tc := range []struct {
		name string
		make func(t *testing.T, ns *netlab.NS) pinhole.Routes
	}{
		{"NetlinkRoutes, called in the namespace", func(t *testing.T, ns *netlab.NS) pinhole.Routes {
			var r pinhole.WatchedRoutes
			if err := ns.Do(func() error { r = pinhole.NetlinkRoutes(); return nil }); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { r.Close() })
			return r
		}},
		{"NetlinkRoutesAt", func(t *testing.T, ns *netlab.NS) pinhole.Routes {
			h, err := ns.Handle()
			if err != nil {
				t.Fatal(err)
			}
			defer h.Close()
			r, err := pinhole.NetlinkRoutesAt(h)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { r.Close() })
			return r
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := netlab.NewNS(t, "watch")
			ns.MustRun(t, "ip", "link", "set", "lo", "up")
			r := tc.make(t, ns)
			w, ok := r.(pinhole.RouteWatcher)
			if !ok {
				t.Fatalf("%T is no RouteWatcher", r)
			}
			g0, ok := w.Generation()
			if !ok {
				t.Fatal("the watch cannot tell (no watch)")
			}
			other := netlab.NewNS(t, "other")
			other.MustRun(t, "ip", "link", "set", "lo", "up")
			other.MustRun(t, "ip", "-6", "route", "add", "2001:db8:77::/48", "dev", "lo")
			time.Sleep(300 * time.Millisecond)
			if g, _ := w.Generation(); g != g0 {
				t.Fatalf("a route added in another namespace moved the generation from %d to %d", g0, g)
			}
			ns.MustRun(t, "ip", "-6", "route", "add", "2001:db8:77::/48", "dev", "lo")
			deadline := time.Now().Add(2 * time.Second)
			for {
				if g, ok := w.Generation(); ok && g != g0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("a route added: the generation did not move in 2 s")
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
}
