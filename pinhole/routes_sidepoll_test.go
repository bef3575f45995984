package pinhole_test

import (
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// goroutinesIn lists the goroutines whose stacks pass through fn, with
// their state ("IO wait", "select", ...) in their first line.
func goroutinesIn(fn string) []string {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, fn) {
			out = append(out, g)
		}
	}
	return out
}

// TestRouteWatchOffNetpoller: the route watch's socket is idle nearly
// always, so its goroutine waits on the side poller (internal/sidepoll),
// never parked in Go's netpoller, where a permanent waiter makes every
// idle thread of pcpd poll epoll (BENCHMARKS.md items 29, 31). It still
// sees changes at once (Changes, without any lookup), and Close ends it.
func TestRouteWatchOffNetpoller(t *testing.T) {
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
	closed := false
	t.Cleanup(func() {
		if !closed {
			r.Close()
		}
	})
	const fn = "pinhole.(*routeWatch).run"
	deadline := time.Now().Add(10 * time.Second)
	for len(goroutinesIn(fn)) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no route watch goroutine")
		}
		time.Sleep(time.Millisecond)
	}
	gen0, ok := r.Generation()
	if !ok {
		t.Fatal("watch not live")
	}
	for round := range 3 {
		// Let the watch go back to waiting, then look at how it waits.
		time.Sleep(20 * time.Millisecond)
		for _, g := range goroutinesIn(fn) {
			if strings.Contains(strings.SplitN(g, "\n", 2)[0], "IO wait") {
				t.Fatalf("round %d: the route watch waits in Go's netpoller:\n%s", round, g)
			}
		}
		select {
		case <-r.Changes():
		default:
		}
		topo.Host.MustRun(t, "ip", "-6", "route", "replace", "2001:db8:99::/48", "dev", topo.HostLANIf)
		select {
		case <-r.Changes():
		case <-time.After(10 * time.Second):
			t.Fatalf("round %d: route change not seen", round)
		}
	}
	if gen, ok := r.Generation(); !ok || gen <= gen0 {
		t.Fatalf("generation %d (live %v) after 3 changes, was %d", gen, ok, gen0)
	}
	closed = true
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	// Close returns after the goroutine left (it closes the socket only
	// then, sidepoll's contract).
	if gs := goroutinesIn(fn); len(gs) != 0 {
		t.Fatalf("route watch still running after Close:\n%s", strings.Join(gs, "\n\n"))
	}
	if _, ok := r.Generation(); ok {
		t.Fatal("a closed watch still claims to be live")
	}
}
