package pinhole_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/vishvananda/netlink"
)

// TestFollowRoutesUnderChurn (review4 F2): with the watch, every
// notification invalidates NetlinkRoutes' dump of the routes (dumpGen),
// and dump is consulted on every Interfaces call, so on a host whose
// routing table keeps changing (a router with a BGP feed: unrelated
// routes replaced all the time) a FollowRoutes round re-dumps every
// route table once per asked prefix instead of once per second (dumpTTL),
// and the server runs such a round every 250 ms (routeFollowDelay) on
// the goroutine that also runs the tamper check. Here: 100 owners, 10 000
// unrelated routes, one unrelated route replaced every 2 ms. A watched
// round must take at most one dump, however many notifications arrive
// during it (a count, not a time: the rounds' times are only logged).
func TestFollowRoutesUnderChurn(t *testing.T) {
	ns := netlab.NewNS(t, "churn")
	ns.MustRun(t, "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1")
	ns.MustRun(t, "ip", "link", "set", "d0", "up")
	ns.MustRun(t, "ip", "link", "set", "d1", "up")
	var owners []pinhole.Owner
	var batch strings.Builder
	for i := range 100 {
		p6 := netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, byte(i >> 8), byte(i)}), 64)
		p4 := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 32)
		fmt.Fprintf(&batch, "route add %v dev d0\nroute add %v dev d0\n", p6, p4)
		owners = append(owners, pinhole.Owner{ID: fmt.Sprintf("wg:peer%d", i), Prefixes: []netip.Prefix{p6, p4}})
	}
	for i := range 10000 {
		fmt.Fprintf(&batch, "route add 172.%d.%d.0/24 dev d1\n", 16+i>>8, i&255)
	}
	file := filepath.Join(t.TempDir(), "routes")
	if err := os.WriteFile(file, []byte(batch.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	ns.MustRun(t, "ip", "-batch", file)
	h, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	nh, err := netlink.NewHandleAt(h)
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	var links [2]int
	for i, name := range []string{"d0", "d1"} {
		l, err := nh.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		links[i] = l.Attrs().Index
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // the churn: an unrelated route moved every 2 ms
		defer wg.Done()
		for i := 0; ctx.Err() == nil; i++ {
			_, dst, _ := net.ParseCIDR("192.0.2.0/24")
			if err := nh.RouteReplace(&netlink.Route{LinkIndex: links[i%2], Dst: dst}); err != nil && i == 0 {
				t.Errorf("churn: %v", err)
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	defer func() { cancel(); wg.Wait() }()
	time.Sleep(100 * time.Millisecond)
	if out := ns.MustRun(t, "ip", "route", "show", "192.0.2.0/24"); !strings.Contains(out, "192.0.2.0") {
		t.Fatalf("no churn: %q", out)
	}
	round := map[bool]time.Duration{}
	for _, watched := range []bool{false, true} {
		cfg := pinhole.Config{Meter: pinhole.Meter{Rate: 200}}
		if watched {
			r, err := pinhole.NetlinkRoutesAt(h)
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			cfg.Routes = r
		}
		be := newBackend(t, ns, cfg)
		if err := be.SetOwners(owners, nil); err != nil {
			t.Fatal(err)
		}
		var g0 uint64
		if rw, ok := cfg.Routes.(pinhole.RouteWatcher); ok {
			g0, _ = rw.Generation()
		}
		var d0 uint64
		if watched {
			d0 = pinhole.RouteDumps(cfg.Routes)
		}
		const rounds = 3
		start := time.Now()
		for range rounds {
			if err := be.FollowRoutes(); err != nil {
				t.Fatal(err)
			}
		}
		round[watched] = time.Since(start) / rounds
		if rw, ok := cfg.Routes.(pinhole.RouteWatcher); ok {
			g1, ok := rw.Generation()
			dumps := pinhole.RouteDumps(cfg.Routes) - d0
			t.Logf("watch: %d changes and %d dumps during %d rounds (ok %v)", g1-g0, dumps, rounds, ok)
			if g1-g0 < rounds {
				t.Fatalf("only %d changes during the rounds: no churn to test with", g1-g0)
			}
			if dumps > rounds {
				t.Errorf("%d dumps in %d rounds under churn: want at most one a round", dumps, rounds)
			}
		}
		if err := be.Teardown(); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("FollowRoutes round under churn: unwatched %v, watched %v", round[false], round[true])
}
