package policy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// devices is an in-memory stand-in for wgctrl, for the unit tests of the
// refresh and change logic; TestWireGuardNamespace runs the same code
// against real userspace WireGuard.
type devices struct {
	mu    sync.Mutex
	peers map[string][]wgtypes.Peer
	err   map[string]error
	calls atomic.Int64
}

func (d *devices) Device(name string) (*wgtypes.Device, error) {
	d.calls.Add(1)
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.err[name]; err != nil {
		return nil, err
	}
	p, ok := d.peers[name]
	if !ok {
		return nil, os.ErrNotExist
	}
	return &wgtypes.Device{Name: name, Peers: slices.Clone(p)}, nil
}

func (d *devices) set(name string, peers ...wgtypes.Peer) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.peers == nil {
		d.peers = make(map[string][]wgtypes.Peer)
	}
	if peers == nil {
		delete(d.peers, name)
		return
	}
	d.peers[name] = peers
}

func (d *devices) fail(name string, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.err == nil {
		d.err = make(map[string]error)
	}
	d.err[name] = err
}

// altnamedWG0 sets wg0 in d with peers and makes alt an altname of wg0's
// that the device calls refuse (EINVAL) but that resolve, the kernel's
// name lookup, takes to wg0. wg0There and altThere (true at first) say
// which of the two names the kernel knows now.
func altnamedWG0(d *devices, alt string, peers ...wgtypes.Peer) (wg0There, altThere *atomic.Bool, resolve func(string) (string, bool, error)) {
	d.set("wg0", peers...)
	d.fail(alt, syscall.EINVAL)
	wg0There, altThere = new(atomic.Bool), new(atomic.Bool)
	altThere.Store(true)
	wg0There.Store(true)
	resolve = func(name string) (string, bool, error) {
		if name == "wg0" && wg0There.Load() || name == alt && altThere.Load() {
			return "wg0", true, nil
		}
		return "", false, nil
	}
	return wg0There, altThere, resolve
}

// noIndex is resolve as WireGuard's kernel lookup, which knows no
// interface index (FirstIndex reports none).
func noIndex(resolve func(string) (string, bool, error)) func(string) (string, int, bool, error) {
	return func(name string) (string, int, bool, error) {
		k, found, err := resolve(name)
		return k, 0, found, err
	}
}

func ipnets(ps ...string) []net.IPNet {
	var out []net.IPNet
	for _, s := range ps {
		_, n, err := net.ParseCIDR(s)
		if err != nil {
			panic(err)
		}
		out = append(out, *n)
	}
	return out
}

// testKey derives a deterministic public key.
func testKey(i int) wgtypes.Key {
	var k wgtypes.Key
	copy(k[:], fmt.Sprintf("peer-%08d-key-for-policy-test", i))
	return k
}

func peer(i int, allowed ...string) wgtypes.Peer {
	return wgtypes.Peer{PublicKey: testKey(i), AllowedIPs: ipnets(allowed...)}
}

func wgID(i int) OwnerID { return OwnerID("wg:" + testKey(i).String()) }

// TestWireGuardDefaultRouteOwnsNothing: a full-tunnel peer's ::/0 and
// 0.0.0.0/0 (and other too-short prefixes) confer no ownership, with one
// warning each, however often the view is refreshed.
func TestWireGuardDefaultRouteOwnsNothing(t *testing.T) {
	d := &devices{}
	d.set("wg0",
		peer(1, "2001:db8:a::/48", "10.0.1.0/24"),
		peer(2, "::/0", "0.0.0.0/0", "2000::/3", "10.0.0.0/7", "::ffff:10.0.0.0/104", "2001:db8:c::/48"))
	core, logs := observer.New(zap.WarnLevel)
	w, err := newWireGuard(d, []string{"wg0"}, time.Hour, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if err := w.Refresh(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if n := logs.FilterMessage("AllowedIP ignored for ownership").Len(); n != 5 {
		t.Errorf("%d warnings about ignored AllowedIPs, want 5 (one per prefix): %v", n, logs.All())
	}
	// Fixed, then broken again: warned again, once.
	d.set("wg0", peer(1, "2001:db8:a::/48", "10.0.1.0/24"), peer(2, "2001:db8:c::/48"))
	if err := w.Refresh(context.Background()); err != nil {
		t.Fatal(err)
	}
	d.set("wg0", peer(1, "2001:db8:a::/48", "10.0.1.0/24"), peer(2, "::/0", "2001:db8:c::/48"))
	for range 2 {
		if err := w.Refresh(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	if n := logs.FilterMessage("AllowedIP ignored for ownership").Len(); n != 6 {
		t.Errorf("%d warnings after ::/0 came back, want 6", n)
	}
	p, err := New(Config{}, w)
	if err != nil {
		t.Fatal(err)
	}
	c := addr("2001:db8:c::1")
	for _, tc := range []struct {
		src, dst string
		want     Reason
	}{
		{"2001:db8:c::1", "2001:db8:c::1", Allowed},
		{"2001:db8:c::1", "2606:4700::1111", NotOwned}, // the internet is not peer 2's
		{"2001:db8:c::1", "2001:db8:a::1", NotOwned},   // nor peer 1's addresses
		{"2606:4700::1111", "2606:4700::1111", NoOwner},
		{"1.1.1.1", "1.1.1.1", NoOwner},
		{"10.1.0.1", "10.1.0.1", NoOwner}, // 10.0.0.0/7 ignored
		{"10.0.1.9", "10.0.1.9", Allowed},
	} {
		if _, r := p.Authorize(Request{Source: addr(tc.src), Iface: "wg0", Target: addr(tc.dst), ThirdParty: tc.src != tc.dst, Protocol: 6, InternalPort: 80}); r != tc.want {
			t.Errorf("%s → %s: %v, want %v", tc.src, tc.dst, r, tc.want)
		}
	}
	o, ok := w.Lookup(c)
	if !ok || o.ID != wgID(2) || !slices.Equal(o.Prefixes, []netip.Prefix{pfx("2001:db8:c::/48")}) {
		t.Errorf("Lookup(%s) = %+v, %v", c, o, ok)
	}
}

// TestWireGuardLongestMatchSEC02: a peer cannot open an address inside
// another peer's more specific AllowedIP, where WireGuard would deliver it.
func TestWireGuardLongestMatchSEC02(t *testing.T) {
	d := &devices{}
	d.set("wg0", peer(1, "2001:db8:a::/48"), peer(2, "2001:db8:a:5::/64"))
	w, err := newWireGuard(d, []string{"wg0"}, time.Hour, nil, WithLabels(map[string]string{testKey(2).String(): "nas"}))
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(Config{}, w)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		src, dst string
		owner    OwnerID
		want     Reason
	}{
		{"2001:db8:a::1", "2001:db8:a:6::1", wgID(1), Allowed},
		{"2001:db8:a::1", "2001:db8:a:5::1", wgID(1), NotOwned},
		{"2001:db8:a:5::1", "2001:db8:a:5::2", wgID(2), Allowed},
		{"2001:db8:a:5::1", "2001:db8:a::1", wgID(2), NotOwned},
	} {
		o, r := p.Authorize(Request{Source: addr(tc.src), Iface: "wg0", Target: addr(tc.dst), ThirdParty: true, Protocol: 17, InternalPort: 9})
		if r != tc.want || o.ID != tc.owner {
			t.Errorf("%s → %s: %s %v, want %s %v", tc.src, tc.dst, o.ID, r, tc.owner, tc.want)
		}
	}
	if o, _ := w.Lookup(addr("2001:db8:a:5::9")); o.Label != "nas" {
		t.Errorf("label = %q, want nas", o.Label)
	}
}

// TestWireGuardInterfaces: one peer on two interfaces is one owner; one
// prefix held by different peers on different interfaces is nobody's.
func TestWireGuardInterfaces(t *testing.T) {
	d := &devices{}
	d.set("wg0", peer(1, "2001:db8:a::/48"), peer(2, "2001:db8:d::/64", "10.0.0.0/24"))
	d.set("wg1", peer(1, "10.1.0.0/16"), peer(3, "2001:db8:d::/64", "2001:db8:e::/64"))
	core, logs := observer.New(zap.WarnLevel)
	w, err := newWireGuard(d, []string{"wg0", "wg1"}, time.Hour, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	if o, ok := w.Lookup(addr("10.1.2.3")); !ok || o.ID != wgID(1) || len(o.Prefixes) != 2 {
		t.Errorf("peer 1 on wg1: %+v %v", o, ok)
	}
	if o, ok := w.Lookup(addr("2001:db8:d::1")); ok {
		t.Errorf("conflicting prefix owned by %s", o.ID)
	}
	if o, ok := w.Lookup(addr("10.0.0.1")); !ok || o.ID != wgID(2) || len(o.Prefixes) != 1 {
		t.Errorf("peer 2 keeps its other prefix: %+v %v", o, ok)
	}
	if logs.FilterMessageSnippet("held by two peers").Len() != 1 {
		t.Errorf("conflict warnings: %v", logs.All())
	}
	if got := prefixStrings(w.Holes()); !slices.Equal(got, []string{"2001:db8:d::/64"}) {
		t.Errorf("holes %v, want the conflicting prefix", got)
	}
	if _, err := newWireGuard(d, []string{"wg0", "wg9"}, time.Hour, nil); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing interface at start: %v", err)
	}
}

// expectChange waits for the next Change.
func expectChange(t *testing.T, w *WireGuard, timeout time.Duration) Change {
	t.Helper()
	select {
	case c := <-w.Changes():
		return c
	case <-time.After(timeout):
		t.Fatalf("no change within %v", timeout)
	}
	return Change{}
}

func prefixStrings(ps []netip.Prefix) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.String())
	}
	slices.Sort(out)
	return out
}

// TestWireGuardChangesLIFE05: removal, shrinking, a carve-out by another
// peer and a vanished interface each report exactly the lost space; a
// transient read error reports nothing and keeps the view.
func TestWireGuardChangesLIFE05(t *testing.T) {
	d := &devices{}
	d.set("wg0", peer(1, "2001:db8:a::/48", "10.0.1.0/24"), peer(2, "2001:db8:b::/48"))
	d.set("wg1", peer(3, "2001:db8:c::/64"))
	w, err := newWireGuard(d, []string{"wg0", "wg1"}, time.Hour, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	step := func(name string, mutate func(), want ...Change) {
		t.Helper()
		mutate()
		err := w.Refresh(ctx)
		var got []Change
		for len(w.Changes()) > 0 {
			got = append(got, <-w.Changes())
		}
		if len(got) != len(want) {
			t.Fatalf("%s: changes %+v, want %+v (refresh err %v)", name, got, want, err)
		}
		for i := range want {
			if got[i].Owner != want[i].Owner || got[i].Removed != want[i].Removed ||
				!slices.Equal(prefixStrings(got[i].Lost), prefixStrings(want[i].Lost)) {
				t.Errorf("%s: change %+v, want %+v", name, got[i], want[i])
			}
		}
	}
	step("no change", func() {})
	step("shrink", func() {
		d.set("wg0", peer(1, "2001:db8:a::/49", "10.0.1.0/24"), peer(2, "2001:db8:b::/48"))
	}, Change{Owner: wgID(1), Lost: []netip.Prefix{pfx("2001:db8:a:8000::/49")}})
	step("grow is no loss", func() {
		d.set("wg0", peer(1, "2001:db8:a::/48", "10.0.1.0/24"), peer(2, "2001:db8:b::/48"))
	})
	step("carved by another peer", func() {
		d.set("wg0", peer(1, "2001:db8:a::/48", "10.0.1.0/24"), peer(2, "2001:db8:b::/48", "10.0.1.128/25"))
	}, Change{Owner: wgID(1), Lost: []netip.Prefix{pfx("10.0.1.128/25")}})
	step("transient error keeps the view", func() {
		d.fail("wg0", errors.New("permission denied"))
	})
	if o, ok := w.Lookup(addr("2001:db8:b::1")); !ok || o.ID != wgID(2) {
		t.Errorf("view lost on a transient error: %+v %v", o, ok)
	}
	d.fail("wg0", nil)
	step("peer removed", func() {
		d.set("wg0", peer(1, "2001:db8:a::/48", "10.0.1.0/24"))
	}, Change{Owner: wgID(2), Removed: true, Lost: []netip.Prefix{pfx("2001:db8:b::/48"), pfx("10.0.1.128/25")}})
	step("interface gone", func() { d.set("wg1") },
		Change{Owner: wgID(3), Removed: true, Lost: []netip.Prefix{pfx("2001:db8:c::/64")}})
	step("stale userspace socket counts as gone", func() { d.fail("wg0", fmt.Errorf("dial: %w", syscall.ECONNREFUSED)) },
		Change{Owner: wgID(1), Removed: true, Lost: []netip.Prefix{pfx("2001:db8:a::/48"), pfx("10.0.1.0/24")}})
	if n := len(w.Owners()); n != 0 {
		t.Errorf("%d owners left", n)
	}
}

// TestWireGuardRefreshOnMiss: a lookup miss triggers a re-read without
// waiting for the interval, and a storm of misses costs one wgctrl call per
// miss interval, not one per request.
func TestWireGuardRefreshOnMiss(t *testing.T) {
	d := &devices{}
	d.set("wg0", peer(1, "2001:db8:a::/48"))
	w, err := newWireGuard(d, []string{"wg0"}, time.Hour, nil, WithMissInterval(200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- w.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	d.set("wg0", peer(1, "2001:db8:a::/48"), peer(2, "2001:db8:b::/48"))
	start, before := time.Now(), d.calls.Load()
	p, err := New(Config{}, w)
	if err != nil {
		t.Fatal(err)
	}
	b := addr("2001:db8:b::1")
	for {
		_, r := p.Authorize(Request{Source: b, Iface: "wg0", Target: b, Protocol: 6, InternalPort: 22})
		if r == Allowed {
			break
		}
		if time.Since(start) > 5*time.Second {
			t.Fatal("new peer never seen")
		}
		time.Sleep(time.Millisecond)
	}
	// Misses for 1 s: at most one re-read per 200 ms (plus the one above).
	before = d.calls.Load()
	for end := time.Now().Add(time.Second); time.Now().Before(end); {
		w.Lookup(addr("2001:db8:ff::1"))
	}
	// The bound that matters is the upper one; under CPU starvation the
	// loop may manage fewer.
	if n := d.calls.Load() - before; n < 1 || n > 7 {
		t.Errorf("%d wgctrl reads during 1 s of misses, want at most 1 per 200 ms", n)
	}
}

// TestWireGuardPeriodicRefresh: Run re-reads on the interval with no misses.
func TestWireGuardPeriodicRefresh(t *testing.T) {
	d := &devices{}
	d.set("wg0", peer(1, "2001:db8:a::/48"), peer(2, "2001:db8:b::/48"))
	w, err := newWireGuard(d, []string{"wg0"}, 100*time.Millisecond, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go w.Run(ctx)
	start := time.Now()
	d.set("wg0", peer(1, "2001:db8:a::/48"))
	c := expectChange(t, w, 2*time.Second)
	if c.Owner != wgID(2) || !c.Removed {
		t.Errorf("change %+v", c)
	}
	// One interval, plus slack for a loaded 2-core CI machine.
	el := time.Since(start)
	t.Logf("change after %v with a 100 ms interval", el)
	if el > 100*time.Millisecond+time.Second {
		t.Errorf("change after %v with a 100 ms interval", el)
	}
}

// TestWireGuardConcurrentSwap: lookups run without a lock while refreshes
// swap tables (run with -race).
func TestWireGuardConcurrentSwap(t *testing.T) {
	d := &devices{}
	d.set("wg0", peer(1, "2001:db8:a::/48"), peer(2, "2001:db8:b::/48"))
	w, err := newWireGuard(d, []string{"wg0"}, time.Hour, nil)
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(Config{}, w)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { // drain
		for {
			select {
			case <-w.Changes():
			case <-ctx.Done():
				return
			}
		}
	}()
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 2 {
		wg.Go(func() {
			a, b := addr("2001:db8:a::1"), addr("2001:db8:b::1")
			for {
				select {
				case <-stop:
					return
				default:
				}
				if o, r := p.Authorize(Request{Source: a, Iface: "wg0", Target: a, Protocol: 6, InternalPort: 1}); r != Allowed || o.ID != wgID(1) {
					t.Errorf("peer 1 lost its stable prefix: %s %v", o.ID, r)
					return
				}
				// Peer 2 comes and goes; either answer is consistent.
				if o, r := p.Authorize(Request{Source: b, Iface: "wg0", Target: b, Protocol: 6, InternalPort: 1}); r != Allowed && r != NoOwner || r == Allowed && o.ID != wgID(2) {
					t.Errorf("peer 2: %s %v", o.ID, r)
					return
				}
			}
		})
	}
	for i := range 200 {
		if i%2 == 0 {
			d.set("wg0", peer(1, "2001:db8:a::/48"))
		} else {
			d.set("wg0", peer(1, "2001:db8:a::/48"), peer(2, "2001:db8:b::/48"))
		}
		if err := w.Refresh(ctx); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
}

// TestWireGuardNestedAcrossInterfacesSEC02: WireGuard checks a source only
// against the peers of the interface it arrived on. Peer 1 on wg0 holding
// 2001:db8::/48 may send from 2001:db8:0:1::5 even though peer 2 on wg1
// holds 2001:db8:0:1::/64, so that /64 must belong to neither (a hole, with
// a warning); otherwise peer 1 could map, replace or delete peer 2's leases.
// Nesting within one interface keeps the longest match (WireGuard enforces
// it), and one peer on two interfaces is one owner.
func TestWireGuardNestedAcrossInterfacesSEC02(t *testing.T) {
	d := &devices{}
	d.set("wg0", peer(1, "2001:db8::/48", "10.9.0.0/16"), peer(3, "2001:db8:0:3::/64"))
	d.set("wg1", peer(2, "2001:db8:0:1::/64", "10.9.4.0/24"), peer(1, "2001:db8:0:4::/64"),
		peer(4, "2001:db8:5::/48"), peer(5, "2001:db8:5:6::/64"))
	d.set("wg2", peer(6, "2001:db8:5:6:7::/80"))
	core, logs := observer.New(zap.WarnLevel)
	w, err := newWireGuard(d, []string{"wg0", "wg1", "wg2"}, time.Hour, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		src  string
		want OwnerID // "" = nobody
	}{
		{"2001:db8:0:1::5", ""},      // the reviewer's case: inside peer 2's /64 on wg1
		{"10.9.4.7", ""},             // the same for IPv4
		{"2001:db8:0:2::5", wgID(1)}, // the rest of peer 1's /48
		{"10.9.5.7", wgID(1)},
		{"2001:db8:0:3::5", wgID(3)}, // nested on the same interface: longest match
		{"2001:db8:0:4::5", wgID(1)}, // peer 1 on both interfaces
		{"2001:db8:5:6::1", wgID(5)}, // nested on wg1 only
		{"2001:db8:5:6:7::1", ""},    // peer 6 on wg2 inside wg1's peers 4 and 5
		{"2001:db8:5:7::1", wgID(4)}, // peer 4 keeps the rest
	} {
		o, ok := w.Lookup(addr(tc.src))
		if got := map[bool]OwnerID{true: o.ID}[ok]; got != tc.want {
			t.Errorf("SEC-02: owner of %s = %q, want %q", tc.src, got, tc.want)
		}
	}
	if n := logs.FilterMessageSnippet("different interface").Len(); n != 3 {
		t.Errorf("overlap warnings: %d, want 3: %v", n, logs.All())
	}
	// The holes, and the longest match over the owners' prefixes and the
	// holes (a hole owned by nobody), as the kernel's owner meter
	// flattens them, agree with Lookup everywhere.
	holes := w.Holes()
	if got, want := prefixStrings(holes), []string{"10.9.4.0/24", "2001:db8:0:1::/64", "2001:db8:5:6:7::/80"}; !slices.Equal(got, want) {
		t.Errorf("holes %v, want %v", got, want)
	}
	owners := w.Owners()
	for _, a := range []string{"2001:db8:0:1::5", "10.9.4.7", "2001:db8:0:2::5", "10.9.5.7", "2001:db8:0:3::5", "2001:db8:0:4::5",
		"2001:db8:5:6::1", "2001:db8:5:6:7::1", "2001:db8:5:7::1", "2001:db8:0:1:ffff:ffff:ffff:ffff", "2001:db8:0:2::"} {
		o, ok := w.Lookup(addr(a))
		want := map[bool]OwnerID{true: o.ID}[ok]
		var got OwnerID
		bits := -1
		for _, h := range holes {
			if h.Contains(addr(a)) && h.Bits() > bits {
				got, bits = "", h.Bits()
			}
		}
		for _, o := range owners {
			for _, p := range o.Prefixes {
				if p.Contains(addr(a)) && p.Bits() > bits {
					got, bits = o.ID, p.Bits()
				}
			}
		}
		if got != want {
			t.Errorf("longest match of %s over owners and holes: %q; Lookup: %q", a, got, want)
		}
	}
	if o, _ := w.Lookup(addr("2001:db8:0:2::1")); slices.Contains(o.Prefixes, netip.MustParsePrefix("2001:db8:0:1::/64")) {
		t.Errorf("peer 1 lists the hole: %v", o.Prefixes)
	}
}

// TestWireGuardAltname: an interface configured by an alternative name is
// read by the kernel name it has at each read (wgctrl knows userspace
// devices by kernel name only, and kernel WireGuard refuses names over 15
// bytes, EINVAL, as devices does here): re-created under another kernel
// name with the same altname, its new peers own and the old ones lose; a
// failed resolution keeps the peers (a failed read, not "gone", even for
// an error that is ENOENT); an altname no interface answers to any more
// is gone, though kernel WireGuard would have refused the name.
// TestWireGuardAltnameNamespace runs real userspace WireGuard.
func TestWireGuardAltname(t *testing.T) {
	long := "wireguard-to-the-branch-office-of-bremen" // 40 bytes
	d := &devices{}
	d.fail(long, syscall.EINVAL)
	d.set("wg7", peer(1, "2001:db8:a::/48"))
	var mu sync.Mutex
	kname, resolveErr := "wg7", error(nil)
	resolve := func(name string) (string, bool, error) {
		mu.Lock()
		defer mu.Unlock()
		if name != long {
			t.Errorf("resolving %q, want only the configured %q", name, long)
		}
		return kname, kname != "", resolveErr
	}
	w, err := newWireGuard(d, []string{long}, time.Hour, zap.NewNop(), func(w *WireGuard) { w.kernel = noIndex(resolve) })
	if err != nil {
		t.Fatalf("interface configured by an altname: %v", err)
	}
	owner := func(a string) OwnerID {
		o, _ := w.Lookup(netip.MustParseAddr(a))
		return o.ID
	}
	if got := owner("2001:db8:a::1"); got != wgID(1) {
		t.Fatalf("start: 2001:db8:a::1 owned by %q, want %q", got, wgID(1))
	}

	// Re-created as wg8, the altname moved with it.
	mu.Lock()
	kname = "wg8"
	mu.Unlock()
	d.set("wg7")
	d.set("wg8", peer(2, "2001:db8:b::/48"))
	if err := w.Refresh(context.Background()); err != nil {
		t.Fatalf("re-created: %v", err)
	}
	if ch := expectChange(t, w, time.Second); ch.Owner != wgID(1) || !ch.Removed {
		t.Errorf("re-created: change %+v, want %s removed", ch, wgID(1))
	}
	if a, b := owner("2001:db8:a::1"), owner("2001:db8:b::1"); a != "" || b != wgID(2) {
		t.Errorf("re-created: owners %q and %q, want none and %q", a, b, wgID(2))
	}

	// A failed resolution is a failed read.
	mu.Lock()
	resolveErr = syscall.ENOENT
	mu.Unlock()
	if err := w.Refresh(context.Background()); err == nil || errors.Is(err, os.ErrNotExist) {
		t.Errorf("resolution failed: Refresh = %v, want an error that is not os.ErrNotExist", err)
	}
	if b := owner("2001:db8:b::1"); b != wgID(2) {
		t.Errorf("resolution failed: owner %q, want %q kept", b, wgID(2))
	}

	// Gone: no interface answers to the altname.
	mu.Lock()
	kname, resolveErr = "", nil
	mu.Unlock()
	if err := w.Refresh(context.Background()); err != nil {
		t.Errorf("gone: Refresh = %v, want nil (a vanished interface is no error)", err)
	}
	if ch := expectChange(t, w, time.Second); ch.Owner != wgID(2) || !ch.Removed {
		t.Errorf("gone: change %+v, want %s removed", ch, wgID(2))
	}
	if b := owner("2001:db8:b::1"); b != "" {
		t.Errorf("gone: owner %q, want none", b)
	}
}

// TestWireGuardAltnameTwoNames: one interface configured twice, by its
// kernel name and an altname (the listener serves it once,
// TestServedInterfaceTwoNames), is one interface for ownership too: its
// nested peers keep WireGuard's longest match, as when configured once,
// instead of becoming holes "on different interfaces" that nobody owns.
func TestWireGuardAltnameTwoNames(t *testing.T) {
	const alt = "wireguard-to-the-branch-office-of-bremen"
	d := &devices{}
	d.set("wg0", peer(1, "2001:db8::/48", "10.9.0.0/16"), peer(2, "2001:db8:0:1::/64", "10.9.4.0/24"))
	d.fail(alt, syscall.EINVAL) // kernel WireGuard refuses the long name
	resolve := func(name string) (string, bool, error) {
		if name == alt || name == "wg0" {
			return "wg0", true, nil
		}
		return "", false, nil
	}
	for _, ifaces := range [][]string{{"wg0"}, {"wg0", alt}, {alt, "wg0"}} {
		w, err := newWireGuard(d, ifaces, time.Hour, zap.NewNop(), func(w *WireGuard) { w.kernel = noIndex(resolve) })
		if err != nil {
			t.Fatalf("%q: %v", ifaces, err)
		}
		for _, tc := range []struct {
			src  string
			want OwnerID
		}{
			{"2001:db8:0:1::5", wgID(2)},
			{"10.9.4.7", wgID(2)},
			{"2001:db8:0:2::5", wgID(1)},
			{"10.9.5.7", wgID(1)},
		} {
			o, ok := w.Lookup(addr(tc.src))
			if got := map[bool]OwnerID{true: o.ID}[ok]; got != tc.want {
				t.Errorf("configured as %q: owner of %s = %q, want %q", ifaces, tc.src, got, tc.want)
			}
		}
		if h := w.Holes(); len(h) != 0 {
			t.Errorf("configured as %q: holes %v, want none", ifaces, h)
		}
	}
}

// TestWireGuardLookupOn: a request's source is its owner's only on an
// interface where the owner's peer holds an AllowedIP containing it, as
// WireGuard's source check there saw it (review of request decisions
// 2026-12-04, F3). Peer 1 is on both interfaces with different prefixes,
// and each interface has a full-tunnel peer (::/0, 0.0.0.0/0: owns
// nothing, may send from anywhere): peer 1's wg0 prefix arriving on wg1
// came from wg1's full-tunnel peer, not from peer 1.
func TestWireGuardLookupOn(t *testing.T) {
	d := &devices{}
	d.set("wg0", peer(1, "2001:db8:a::/48", "10.0.1.0/24"), peer(2, "::/0", "0.0.0.0/0"), peer(4, "2001:db8:a:5::/64"))
	d.set("wg1", peer(1, "2001:db8:b::/48"), peer(3, "::/0", "0.0.0.0/0"))
	w, err := newWireGuard(d, []string{"wg0", "wg1"}, time.Hour, nil)
	if err != nil {
		t.Fatal(err)
	}
	st, err := NewStatic(map[string][]netip.Prefix{"home": {pfx("2001:db8:a::/48")}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		own   InterfaceLookup
		src   string
		iface string
		want  OwnerID // "": none
	}{
		{w, "2001:db8:a::1", "wg0", wgID(1)},
		{w, "2001:db8:a::1", "wg1", ""}, // wg1's full-tunnel peer, as peer 1
		{w, "2001:db8:a::1", "", ""},    // arrival unknown
		{w, "2001:db8:a::1", "eth0", ""},
		{w, "10.0.1.1", "wg0", wgID(1)},
		{w, "10.0.1.1", "wg1", ""},
		{w, "2001:db8:b::1", "wg1", wgID(1)},
		{w, "2001:db8:b::1", "wg0", ""}, // peer 1 is on wg0 too, but not with this prefix
		{w, "2001:db8:a:5::1", "wg0", wgID(4)},
		{w, "2001:db8:a:5::1", "wg1", ""},
		{w, "2606:4700::1", "wg0", ""}, // ::/0 owns nothing anywhere
		{st, "2001:db8:a::1", "", "static:home"},
		{st, "2001:db8:a::1", "wg1", "static:home"}, // static clients are bound to no interface
		{st, "2001:db8:b::1", "wg0", ""},
	} {
		o, ok := tc.own.LookupOn(addr(tc.src), tc.iface)
		if o.ID != tc.want || ok != (tc.want != "") {
			t.Errorf("%T.LookupOn(%s, %q) = %q %v, want %q", tc.own, tc.src, tc.iface, o.ID, ok, tc.want)
		}
		if tc.own != InterfaceLookup(w) {
			continue
		}
		// Authorize decides the same way (its table fast path), and
		// Lookup, without the interface, still sees every owner.
		p, err := New(Config{}, w)
		if err != nil {
			t.Fatal(err)
		}
		a := addr(tc.src)
		if o, r := p.Authorize(Request{Source: a, Iface: tc.iface, Target: a, Protocol: 6, InternalPort: 443}); o.ID != tc.want || (r == NoOwner) != (tc.want == "") {
			t.Errorf("Authorize(%s on %q) = %q %v, want %q", tc.src, tc.iface, o.ID, r, tc.want)
		}
		if o, ok := w.Lookup(a); tc.want != "" && (!ok || o.ID != tc.want) {
			t.Errorf("Lookup(%s) = %q %v, want %q", tc.src, o.ID, ok, tc.want)
		}
	}
	// One interface (table.only's shortcut): the same rules.
	d1 := &devices{}
	d1.set("wg0", peer(1, "2001:db8:a::/48"), peer(4, "2001:db8:a:5::/64"))
	w1, err := newWireGuard(d1, []string{"wg0"}, time.Hour, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		src, iface string
		want       OwnerID
	}{
		{"2001:db8:a::1", "wg0", wgID(1)},
		{"2001:db8:a:5::1", "wg0", wgID(4)},
		{"2001:db8:a::1", "wg1", ""},
		{"2001:db8:a::1", "", ""},
		{"2001:db8:b::1", "wg0", ""},
	} {
		if o, ok := w1.LookupOn(addr(tc.src), tc.iface); o.ID != tc.want || ok != (tc.want != "") {
			t.Errorf("one interface: LookupOn(%s, %q) = %q %v, want %q", tc.src, tc.iface, o.ID, ok, tc.want)
		}
	}
}
