package pinhole_test

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestRouteLookupOwners: RouteLookupOwners names the owners whose
// reverse-path rule looks up every request's route (their prefixes routed
// through no one set of interfaces: BENCHMARKS.md item 28), and follows
// the routes: an owner whose prefix gets a route through the LAN leaves
// it at the next FollowRoutes, and enters it again when the route goes.
// With the check off, or without Routes, nobody is reported (every
// request is looked up, or none, as configured).
func TestRouteLookupOwners(t *testing.T) {
	unrouted := netip.MustParsePrefix("10.78.0.0/16")
	for _, tc := range []struct {
		name   string
		meter  pinhole.ReversePath
		routes bool
		want   []string // before the route, with it, after it is gone
	}{
		{"strict", pinhole.ReversePathStrict, true, []string{"static:unrouted", "", "static:unrouted"}},
		{"loose", pinhole.ReversePathLoose, true, []string{"static:unrouted", "", "static:unrouted"}},
		{"off", pinhole.ReversePathOff, true, []string{"", "", ""}},
		{"no routes", pinhole.ReversePathStrict, false, []string{"", "", ""}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			topo := netlab.NewTopology(t, netlab.TopologyOptions{})
			cfg := pinhole.Config{Meter: pinhole.Meter{Rate: 200, Burst: 400, Ports: []uint16{5351}, ReversePath: tc.meter}}
			var b *pinhole.Backend
			if tc.routes {
				b = newBackend(t, topo.Host, cfg)
			} else {
				// newBackend would give it ns's routes.
				conn, err := topo.Host.NftConn()
				if err != nil {
					t.Fatal(err)
				}
				if b, err = pinhole.New(conn, cfg); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(b.Close)
				if err := b.Setup(); err != nil {
					t.Fatal(err)
				}
			}
			serveTunnel(t, b, topo)
			owners := []pinhole.Owner{
				{ID: "static:routed", Prefixes: []netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}},
				{ID: "static:unrouted", Prefixes: []netip.Prefix{unrouted}},
			}
			if err := b.SetOwners(owners, nil); err != nil {
				t.Fatal(err)
			}
			check := func(step string, want string) {
				t.Helper()
				var got []string
				for _, o := range b.RouteLookupOwners() {
					got = append(got, o.ID)
					if o.ID == "static:unrouted" && !slices.Equal(o.Prefixes, []netip.Prefix{unrouted}) {
						t.Errorf("%s: %s's prefixes %v, want %v", step, o.ID, o.Prefixes, unrouted)
					}
				}
				var w []string
				if want != "" {
					w = []string{want}
				}
				if !slices.Equal(got, w) {
					t.Errorf("%s: RouteLookupOwners %v, want %v", step, got, w)
				}
			}
			check("no route", tc.want[0])
			topo.Host.MustRun(t, "ip", "route", "add", unrouted.String(), "via", topo.ClientV4.String(), "dev", topo.HostLANIf)
			if err := b.FollowRoutes(); err != nil {
				t.Fatal(err)
			}
			check("routed through the LAN", tc.want[1])
			topo.Host.MustRun(t, "ip", "route", "del", unrouted.String())
			if err := b.FollowRoutes(); err != nil {
				t.Fatal(err)
			}
			check("route gone", tc.want[2])
			if err := b.SetOwners(nil, nil); err != nil {
				t.Fatal(err)
			}
			check("no owners", "")
		})
	}
}
