package pinhole_test

import (
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// heldRoutes answers every prefix with ifs as they are when asked; the
// ask after hold() is answered, then held until the returned release is
// called (it tells entered first), to order two route asks' answers.
type heldRoutes struct {
	mu      sync.Mutex
	ifs     []int
	gate    chan struct{}
	entered chan struct{}
}

func (h *heldRoutes) Interfaces(netip.Prefix) ([]int, error) {
	h.mu.Lock()
	ifs, gate, entered := h.ifs, h.gate, h.entered
	h.gate, h.entered = nil, nil
	h.mu.Unlock()
	if gate != nil {
		close(entered)
		<-gate
	}
	return ifs, nil
}

func (h *heldRoutes) set(ifs ...int) {
	h.mu.Lock()
	h.ifs = ifs
	h.mu.Unlock()
}

// hold makes the next ask wait, answered, until release; wait returns
// once that ask has its answer.
func (h *heldRoutes) hold() (wait, release func()) {
	gate, entered := make(chan struct{}), make(chan struct{})
	h.mu.Lock()
	h.gate, h.entered = gate, entered
	h.mu.Unlock()
	return func() { <-entered }, func() { close(gate) }
}

// TestRouteAnswersInOrder (review of 2026-12-03, "left"): SetOwners and
// FollowRoutes ask the routes before they take the Backend's lock, so
// when the route moves between their asks the older answer could be
// written last: the owner chain kept passing the interface the route had
// left unlooked until the next FollowRoutes (pcpd: up to 5 s). Both
// orders: SetOwners asks (LAN), the route moves to the WAN, FollowRoutes
// asks (WAN) and writes first, then SetOwners; and SetOwners writing
// before FollowRoutes, whose answer then used to be dropped because the
// owners had been given again. The newer answer (WAN) must stay.
func TestRouteAnswersInOrder(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	lan, wan := ifIndex(t, topo.Host, topo.HostLANIf), ifIndex(t, topo.Host, topo.HostWANIf)
	for _, tc := range []struct {
		name           string
		followFirst    bool // FollowRoutes writes before SetOwners does
		changedOwners  bool // SetOwners gives the owner another prefix
		wantInterfaces int
	}{
		{"FollowRoutes done first", true, false, wan},
		{"SetOwners done first", false, false, wan},
		// The owner's prefixes changed: FollowRoutes' answer was for the
		// old ones, so SetOwners' answer stands, and the next
		// FollowRoutes brings it up to date.
		{"owner changed, FollowRoutes done first", true, true, lan},
	} {
		t.Run(tc.name, func(t *testing.T) {
			routes := &heldRoutes{ifs: []int{lan}}
			b := meteredTunnel(t, topo, routes)
			owners := []pinhole.Owner{{ID: "static:x", Prefixes: []netip.Prefix{netip.MustParsePrefix("10.77.0.0/16")}}}
			if err := b.SetOwners(owners, nil); err != nil {
				t.Fatal(err)
			}
			chain := pinhole.OwnerChains(owners)["static:x"]
			given := owners
			if tc.changedOwners {
				given = []pinhole.Owner{{ID: "static:x", Prefixes: []netip.Prefix{netip.MustParsePrefix("10.78.0.0/16")}}}
			}
			// SetOwners asks (the LAN) and is held there.
			asked, release := routes.hold()
			done := make(chan error, 1)
			go func() { done <- b.SetOwners(given, nil) }()
			asked()
			routes.set(wan) // the route moves
			if tc.followFirst {
				if err := b.FollowRoutes(); err != nil {
					t.Fatal(err)
				}
				release()
				if err := <-done; err != nil {
					t.Fatal(err)
				}
			} else {
				// FollowRoutes asks (the WAN) and is held; SetOwners
				// writes the LAN; then FollowRoutes goes on.
				fAsked, fRelease := routes.hold()
				fDone := make(chan error, 1)
				go func() { fDone <- b.FollowRoutes() }()
				fAsked()
				release()
				if err := <-done; err != nil {
					t.Fatal(err)
				}
				fRelease()
				if err := <-fDone; err != nil {
					t.Fatal(err)
				}
			}
			want := map[int]string{lan: topo.HostLANIf, wan: topo.HostWANIf}[tc.wantInterfaces]
			out := nftList(t, topo.Host, "chain", "inet", "pcpd", chain)
			if !strings.Contains(out, `iif != "`+want+`"`) {
				t.Errorf("after both asks the owner chain does not pass %s (the newer answer) unlooked:\n%s", want, out)
			}
			if err := b.Healthy(); err != nil {
				t.Errorf("Healthy: %v", err)
			}
			if tc.changedOwners {
				if err := b.FollowRoutes(); err != nil {
					t.Fatal(err)
				}
				if out := nftList(t, topo.Host, "chain", "inet", "pcpd", chain); !strings.Contains(out, `iif != "`+topo.HostWANIf+`"`) {
					t.Errorf("the next FollowRoutes did not move the rule to the WAN:\n%s", out)
				}
			}
		})
	}
}
