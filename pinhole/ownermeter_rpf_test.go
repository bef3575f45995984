package pinhole_test

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestOwnerMeterReversePathModes (RELIABILITY.md bug 4, review S1): an
// owner's prefix the host routes over two paths (a multipath route over
// the LAN and the WAN), 200 of the owner's sources, one datagram each, all
// arriving on the LAN. Strict admits all: the owner chain passes both next
// hops' interfaces without a lookup (Config.Routes, ownerRules). Without
// the routes (Routes nil, as before) strict drops some of the IPv6 ones
// (the IPv6 fib lookup checks the one next hop its hash picks) and none
// of the IPv4 ones (IPv4 checks every next hop); loose and off admit all. Each mode's
// owner chain is what Healthy accepts, switching modes rewrites the chains
// SetOwners finds (the same table, a new Backend each), and MeterDrops
// counts what the reverse-path rule dropped, apart from the rate drops.
func TestOwnerMeterReversePathModes(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	const n = 200
	pfx6, pfx4 := netip.MustParsePrefix("2001:db8:77::/48"), netip.MustParsePrefix("10.77.0.0/16")
	var src6, src4 []netip.Addr
	var batch6, batch4 strings.Builder
	for i := 1; i <= n; i++ {
		a6 := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0x77, byte(i >> 8), byte(i), 15: 1})
		a4 := netip.AddrFrom4([4]byte{10, 77, byte(i), 1})
		src6, src4 = append(src6, a6), append(src4, a4)
		fmt.Fprintf(&batch6, "addr add %v/128 dev %s nodad\n", a6, topo.ClientIf)
		fmt.Fprintf(&batch4, "addr add %v/32 dev %s\n", a4, topo.ClientIf)
	}
	topo.Client.MustRun(t, "sh", "-c", fmt.Sprintf("printf '%%s' '%s' | ip -6 -batch - && printf '%%s' '%s' | ip -4 -batch -", batch6.String(), batch4.String()))
	topo.Host.MustRun(t, "ip", "-6", "route", "add", pfx6.String(),
		"nexthop", "via", topo.ClientV6.String(), "dev", topo.HostLANIf, "nexthop", "via", topo.InternetV6.String(), "dev", topo.HostWANIf)
	topo.Host.MustRun(t, "ip", "-4", "route", "add", pfx4.String(),
		"nexthop", "via", topo.ClientV4.String(), "dev", topo.HostLANIf, "nexthop", "via", topo.InternetV4.String(), "dev", topo.HostWANIf)
	owners := []pinhole.Owner{{ID: "wg:multipath", Prefixes: []netip.Prefix{pfx6, pfx4}}}
	chain := pinhole.OwnerChains(owners)["wg:multipath"]
	dst6, dst4 := netip.AddrPortFrom(topo.HostTunnelV6, 5351), netip.AddrPortFrom(topo.HostTunnelV4, 5351)
	srv6, srv4 := countUDP(t, topo.Host, dst6), countUDP(t, topo.Host, dst4)

	lan, wan := topo.HostLANIf, topo.HostWANIf
	if ifIndex(t, topo.Host, lan) > ifIndex(t, topo.Host, wan) {
		lan, wan = wan, lan // listed in index order
	}
	both := fmt.Sprintf("iif != %q iif != %q ", lan, wan)
	for _, tc := range []struct {
		name     string
		mode     pinhole.ReversePath
		routes   pinhole.Routes // nil: the host's
		rule     string         // the reverse-path rule as nft lists it; "" none
		someLost bool           // IPv6: some dropped, not all
	}{
		{"strict", pinhole.ReversePathStrict, nil, both + "fib saddr . iif oif 0 counter", false},
		{"strict without routes", pinhole.ReversePathStrict, noRoutes{}, "\t\tfib saddr . iif oif 0 counter", true},
		{"loose", pinhole.ReversePathLoose, nil, both + "fib saddr oif 0 counter", false},
		{"off", pinhole.ReversePathOff, nil, "", false},
		{"strict again", pinhole.ReversePathStrict, nil, both + "fib saddr . iif oif 0 counter", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// The owner's rate far above the 400 datagrams sent: only
			// the reverse-path rule may drop.
			b := newBackend(t, topo.Host, pinhole.Config{Routes: tc.routes, Meter: pinhole.Meter{Rate: 200, Burst: 400, Ports: []uint16{5351}, ReversePath: tc.mode}})
			serveTunnel(t, b, topo)
			if err := b.SetOwners(owners, nil); err != nil {
				t.Fatal(err)
			}
			if err := b.Healthy(); err != nil {
				t.Fatalf("Healthy: %v", err)
			}
			out := nftList(t, topo.Host, "chain", "inet", "pcpd", chain)
			if got := strings.Contains(out, "fib saddr"); got != (tc.rule != "") || (tc.rule != "" && !strings.Contains(out, tc.rule)) {
				t.Errorf("owner chain, want reverse-path rule %q:\n%s", tc.rule, out)
			}
			got6, _ := sendRoundRobin(t, topo.Client, src6, dst6, 1, srv6)
			got4, _ := sendRoundRobin(t, topo.Client, src4, dst4, 1, srv4)
			t.Logf("%s: %d of %d IPv6 sources and %d of %d IPv4 ones reached the socket", tc.name, got6, n, got4, n)
			if tc.someLost {
				if got6 == 0 || got6 == n {
					t.Errorf("%s, IPv6 multipath: %d of %d got through, want some dropped (the lookup picks one next hop) and some not", tc.name, got6, n)
				}
			} else if got6 != n {
				t.Errorf("%s, IPv6 multipath: %d of %d got through, want all", tc.name, got6, n)
			}
			if got4 != n {
				t.Errorf("%s, IPv4 multipath: %d of %d got through, want all", tc.name, got4, n)
			}
			if err := b.Healthy(); err != nil { // reads the counters
				t.Fatalf("Healthy: %v", err)
			}
			want := pinhole.MeterDrops{ReversePath: uint64(2*n - got6 - got4)}
			if d := b.MeterDrops(); d != want {
				t.Errorf("MeterDrops %+v, want %+v", d, want)
			}
		})
	}
}

// TestOwnerMeterDropsSplit: MeterDrops tells the reverse-path rule's drops
// (spoofed sources) from the owner limit's, summed over owners, and keeps
// counting across a Setup repair (which zeroes the chains' counters) and
// an owner's chain deleted by SetOwners.
func TestOwnerMeterDropsSplit(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	b := bug4Backend(t, topo.Host)
	serveTunnel(t, b, topo)
	victim := pinhole.Owner{ID: "static:victim", Prefixes: []netip.Prefix{topo.ClientPrefix6}}
	other := pinhole.Owner{ID: "static:other", Prefixes: []netip.Prefix{netip.MustParsePrefix("2001:db8:99::/48")}}
	if err := b.SetOwners([]pinhole.Owner{victim, other}, nil); err != nil {
		t.Fatal(err)
	}
	dst := netip.AddrPortFrom(topo.HostTunnelV6, 5351)
	srv := countUDP(t, topo.Host, dst)
	spoof := netip.MustParseAddr("2001:db8:1:2::99")
	topo.Internet.MustRun(t, "ip", "addr", "add", spoof.String()+"/128", "dev", "lo", "nodad")

	check := func(step string, want pinhole.MeterDrops, rateAtLeast uint64) {
		t.Helper()
		if err := b.Healthy(); err != nil {
			t.Fatalf("%s: Healthy: %v", step, err)
		}
		d := b.MeterDrops()
		if d.ReversePath != want.ReversePath || d.OwnerRate < want.OwnerRate+rateAtLeast {
			t.Errorf("%s: MeterDrops %+v, want reverse path %d and rate ≥ %d", step, d, want.ReversePath, want.OwnerRate+rateAtLeast)
		}
	}
	sendRoundRobin(t, topo.Internet, []netip.Addr{spoof}, dst, 300, srv)
	check("300 spoofed", pinhole.MeterDrops{ReversePath: 300}, 0)
	// The victim's own flood: the owner's burst is 100, so at least 150
	// of 300 sent at once are over its rate.
	sendRoundRobin(t, topo.Client, []netip.Addr{topo.ClientV6}, dst, 300, srv)
	check("and 300 from the victim", pinhole.MeterDrops{ReversePath: 300}, 150)
	before := b.MeterDrops()
	// Setup rewrites (and zeroes) every owner chain; what they dropped
	// before stays counted, and what they drop after is added.
	if err := b.Setup(); err != nil {
		t.Fatal(err)
	}
	sendRoundRobin(t, topo.Internet, []netip.Addr{spoof}, dst, 50, srv)
	check("50 more spoofed after a Setup", pinhole.MeterDrops{ReversePath: before.ReversePath + 50, OwnerRate: before.OwnerRate}, 0)
	// The victim's chain goes (its owner gone) with 20 uncounted drops:
	// SetOwners reads them first.
	sendRoundRobin(t, topo.Internet, []netip.Addr{spoof}, dst, 20, srv)
	if err := b.SetOwners([]pinhole.Owner{other}, nil); err != nil {
		t.Fatal(err)
	}
	if d := b.MeterDrops(); d.ReversePath != before.ReversePath+70 {
		t.Errorf("after the victim's chain was deleted: MeterDrops %+v, want reverse path %d", d, before.ReversePath+70)
	}
}

// TestSetupOwnerMeterFailure (review S3): when the owner meter cannot be
// written, Setup still puts everything else in place, so pinholes can be
// installed, and says so with ErrOwnerMeter; Healthy reports the owner
// meter alone (ErrOwnerMeter), and RepairOwners writes it once it can.
// The failure is a real one: someone replaced the owner's chain by a base
// chain of the same name, which no map element may jump to (EOPNOTSUPP),
// and flushed a pinhole set.
func TestSetupOwnerMeterFailure(t *testing.T) {
	topo, b := guardedTopology(t, pinhole.Config{Meter: pinhole.Meter{Rate: 200}})
	owners := []pinhole.Owner{{ID: "static:c", Prefixes: []netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}}}
	if err := b.SetOwners(owners, nil); err != nil {
		t.Fatal(err)
	}
	chain := pinhole.OwnerChains(owners)["static:c"]
	p := pinhole.Pinhole{InternalAddr: topo.ClientV6, Protocol: tcp, InternalPort: 8080}
	topo.Host.MustRun(t, "sh", "-c", fmt.Sprintf(`nft flush map inet pcpd owners6 && nft flush map inet pcpd owners4 &&
		nft delete chain inet pcpd %[1]s && nft add chain inet pcpd %[1]s '{ type filter hook input priority 10; policy accept; }' &&
		nft flush set inet pcpd pin6`, chain))
	err := b.Healthy()
	if !errors.Is(err, pinhole.ErrUnhealthy) || errors.Is(err, pinhole.ErrOwnerMeter) {
		t.Fatalf("Healthy with a pinhole set flushed: %v, want ErrUnhealthy, not the owner meter alone", err)
	}
	err = b.Setup()
	if !errors.Is(err, pinhole.ErrOwnerMeter) {
		t.Fatalf("Setup: %v, want ErrOwnerMeter", err)
	}
	t.Logf("Setup: %v", err)
	apply(t, b, install(p, time.Minute))
	if got, err := b.List(); err != nil || len(got) != 1 {
		t.Fatalf("List after Setup's owner meter failure: %v, %v; want the pinhole installed", got, err)
	}
	err = b.Healthy()
	if !errors.Is(err, pinhole.ErrOwnerMeter) || !errors.Is(err, pinhole.ErrUnhealthy) {
		t.Fatalf("Healthy: %v, want ErrOwnerMeter (and ErrUnhealthy)", err)
	}
	if err := b.RepairOwners(); !errors.Is(err, pinhole.ErrOwnerMeter) {
		t.Fatalf("RepairOwners with the base chain in the way: %v, want ErrOwnerMeter", err)
	}
	topo.Host.MustRun(t, "nft", "delete", "chain", "inet", "pcpd", chain)
	if err := b.RepairOwners(); err != nil {
		t.Fatalf("RepairOwners: %v", err)
	}
	if err := b.Healthy(); err != nil {
		t.Fatalf("Healthy after RepairOwners: %v", err)
	}
	if got, err := b.List(); err != nil || len(got) != 1 {
		t.Fatalf("List after RepairOwners: %v, %v; want the pinhole kept", got, err)
	}
}
