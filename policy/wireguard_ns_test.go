package policy

import (
	"context"
	"net/netip"
	"slices"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/pcpd/pcpd/internal/netlab"
)

func lostContains(c Change, a string) bool {
	return slices.ContainsFunc(c.Lost, func(p netip.Prefix) bool { return p.Contains(addr(a)) })
}

// TestWireGuardNamespace runs ownership against a real userspace WireGuard
// device (golang.zx2c4.com/wireguard) in a throwaway namespace, configured
// through wgctrl: two peers may each open only their own addresses, a
// full-tunnel peer owns nothing, and shrinking AllowedIPs, removing a peer
// or deleting the interface each produce the change event within the
// refresh interval (PROTOCOL.md choice (a), SEC-02, TP-03, LIFE-05).
func TestWireGuardNamespace(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "pol")
	ifname := netlab.UniqueIfName("wgt")
	netlab.StartWireGuard(t, ns, ifname, netlab.WireGuardBinary(t))
	c, err := wgctrl.New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })

	key := func() wgtypes.Key { return newKey(t) }
	priv, a, b, full := key(), key().PublicKey(), key().PublicKey(), key().PublicKey()
	if err := c.ConfigureDevice(ifname, wgtypes.Config{PrivateKey: &priv, ReplacePeers: true, Peers: []wgtypes.PeerConfig{
		{PublicKey: a, AllowedIPs: ipnets("2001:db8:a::/48", "10.9.1.0/24")},
		{PublicKey: b, AllowedIPs: ipnets("2001:db8:b::/64", "10.9.2.2/32")},
		{PublicKey: full, AllowedIPs: ipnets("::/0", "0.0.0.0/0")}, // a full-tunnel client's routes
	}}); err != nil {
		t.Fatal(err)
	}

	const interval = 300 * time.Millisecond
	core, logs := observer.New(zap.InfoLevel)
	w, err := NewWireGuard(c, []string{ifname}, interval, zap.New(core), WithLabels(map[string]string{a.String(): "alice"}))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	p, err := New(Config{}, w)
	if err != nil {
		t.Fatal(err)
	}
	idA, idB := OwnerID("wg:"+a.String()), OwnerID("wg:"+b.String())
	check := func(step, src, dst string, owner OwnerID, want Reason) {
		t.Helper()
		o, r := p.Authorize(Request{Source: addr(src), Iface: ifname, Target: addr(dst), ThirdParty: src != dst, Protocol: 6, InternalPort: 443})
		if r != want || o.ID != owner {
			t.Errorf("%s: %s → %s: %s %v, want %s %v", step, src, dst, o.ID, r, owner, want)
		}
	}
	check("start", "2001:db8:a::10", "2001:db8:a::10", idA, Allowed)
	check("start", "2001:db8:a::10", "2001:db8:a:77::1", idA, Allowed)
	check("start", "10.9.1.10", "10.9.1.10", idA, Allowed)
	check("start", "2001:db8:a::10", "2001:db8:b::10", idA, NotOwned)
	check("start", "10.9.1.10", "10.9.2.2", idA, NotOwned)
	check("start", "2001:db8:b::10", "2001:db8:b::10", idB, Allowed)
	check("start", "10.9.2.2", "10.9.2.2", idB, Allowed)
	check("start", "2001:db8:b::10", "2001:db8:a::10", idB, NotOwned)
	check("start", "10.9.2.2", "10.9.2.3", idB, NotOwned)
	check("start: full tunnel owns nothing", "2606:4700::1111", "2606:4700::1111", "", NoOwner)
	check("start: full tunnel owns nothing", "192.0.2.1", "192.0.2.1", "", NoOwner)
	if o, _ := w.Lookup(addr("10.9.1.1")); o.Label != "alice" {
		t.Errorf("label %q, want alice", o.Label)
	}
	if n := logs.FilterMessage("AllowedIP ignored for ownership").Len(); n != 2 {
		t.Errorf("%d warnings about the full-tunnel peer's default routes, want 2", n)
	}

	waitChange := func(step string, configure func() error) Change {
		t.Helper()
		start := time.Now()
		if err := configure(); err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		ch := expectChange(t, w, 10*interval)
		// "Within the configured interval": one interval plus the wgctrl
		// round trip, with slack for a loaded 2-core CI machine.
		el := time.Since(start)
		t.Logf("%s: change after %v, interval %v", step, el, interval)
		if el > interval+time.Second {
			t.Errorf("%s: change after %v, interval %v", step, el, interval)
		}
		return ch
	}

	ch := waitChange("shrink", func() error {
		return c.ConfigureDevice(ifname, wgtypes.Config{Peers: []wgtypes.PeerConfig{
			{PublicKey: a, UpdateOnly: true, ReplaceAllowedIPs: true, AllowedIPs: ipnets("2001:db8:a:1::/64")},
		}})
	})
	if ch.Owner != idA || ch.Removed || !lostContains(ch, "2001:db8:a::10") || !lostContains(ch, "2001:db8:a:ffff::1") ||
		!lostContains(ch, "10.9.1.10") || lostContains(ch, "2001:db8:a:1::1") {
		t.Errorf("shrink: change %+v", ch)
	}
	check("after shrink", "2001:db8:a:1::5", "2001:db8:a:1::5", idA, Allowed)
	check("after shrink", "2001:db8:a:1::5", "2001:db8:a::10", idA, NotOwned)
	check("after shrink", "10.9.1.10", "10.9.1.10", "", NoOwner)

	ch = waitChange("remove peer", func() error {
		return c.ConfigureDevice(ifname, wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: b, Remove: true}}})
	})
	want := []string{"10.9.2.2/32", "2001:db8:b::/64"}
	if ch.Owner != idB || !ch.Removed || !slices.Equal(prefixStrings(ch.Lost), want) {
		t.Errorf("remove: change %+v, want %s removed, lost %v", ch, idB, want)
	}
	check("after remove", "2001:db8:b::10", "2001:db8:b::10", "", NoOwner)

	ch = waitChange("interface deleted", func() error {
		_, err := ns.Run("ip", "link", "del", ifname)
		return err
	})
	if ch.Owner != idA || !ch.Removed || !slices.Equal(prefixStrings(ch.Lost), []string{"2001:db8:a:1::/64"}) {
		t.Errorf("interface deleted: change %+v", ch)
	}
	check("after delete", "2001:db8:a:1::5", "2001:db8:a:1::5", "", NoOwner)
	if n := logs.FilterMessage("WireGuard ownership lost").Len(); n != 3 {
		t.Errorf("%d ownership-lost log entries, want 3", n)
	}
}

// TestWireGuardNestedAcrossInterfacesNamespace: the reviewer's case on real
// WireGuard devices. Peer A on the first interface holds 2001:db8::/48
// (and 10.8.0.0/16), peer B on the second 2001:db8:0:1::/64 (and
// 10.8.1.0/24). The first interface accepts from A a packet with source
// 2001:db8:0:1::5 (it knows no B), so that source must not be B's: the
// nested prefix is owned by nobody, and A keeps the rest (SEC-02).
func TestWireGuardNestedAcrossInterfacesNamespace(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "polx")
	if0, if1 := netlab.UniqueIfName("wgt"), netlab.UniqueIfName("wgt")
	bin := netlab.WireGuardBinary(t)
	netlab.StartWireGuard(t, ns, if0, bin)
	netlab.StartWireGuard(t, ns, if1, bin)
	c, err := wgctrl.New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	key := func() wgtypes.Key { return newKey(t) }
	p0, p1, a, b := key(), key(), key().PublicKey(), key().PublicKey()
	for _, d := range []struct {
		name string
		priv wgtypes.Key
		peer wgtypes.PeerConfig
	}{
		{if0, p0, wgtypes.PeerConfig{PublicKey: a, AllowedIPs: ipnets("2001:db8::/48", "10.8.0.0/16")}},
		{if1, p1, wgtypes.PeerConfig{PublicKey: b, AllowedIPs: ipnets("2001:db8:0:1::/64", "10.8.1.0/24")}},
	} {
		if err := c.ConfigureDevice(d.name, wgtypes.Config{PrivateKey: &d.priv, ReplacePeers: true, Peers: []wgtypes.PeerConfig{d.peer}}); err != nil {
			t.Fatal(err)
		}
	}
	w, err := NewWireGuard(c, []string{if0, if1}, time.Hour, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(Config{}, w)
	if err != nil {
		t.Fatal(err)
	}
	idA := OwnerID("wg:" + a.String())
	for _, tc := range []struct {
		iface, src, dst string
		owner           OwnerID
		want            Reason
	}{
		{if0, "2001:db8:0:1::5", "2001:db8:0:1::5", "", NoOwner}, // A posing as B
		{if0, "10.8.1.5", "10.8.1.5", "", NoOwner},
		{if0, "2001:db8:0:2::5", "2001:db8:0:2::5", idA, Allowed},
		{if0, "2001:db8:0:2::5", "2001:db8:0:1::5", idA, NotOwned},
		{if0, "10.8.2.5", "10.8.2.5", idA, Allowed},
		// A's addresses, arriving on B's interface (B posing as A,
		// which its WireGuard would not let through; a request that
		// did come that way is not A's), or on no known interface.
		{if1, "2001:db8:0:2::5", "2001:db8:0:2::5", "", NoOwner},
		{if1, "10.8.2.5", "10.8.2.5", "", NoOwner},
		{"", "2001:db8:0:2::5", "2001:db8:0:2::5", "", NoOwner},
	} {
		o, r := p.Authorize(Request{Source: addr(tc.src), Iface: tc.iface, Target: addr(tc.dst), ThirdParty: tc.src != tc.dst, Protocol: 6, InternalPort: 443})
		if r != tc.want || o.ID != tc.owner {
			t.Errorf("SEC-02: on %q, %s → %s: %q %v, want %q %v", tc.iface, tc.src, tc.dst, o.ID, r, tc.owner, tc.want)
		}
	}
}

// TestWireGuardAltnameNamespace: a real userspace WireGuard interface
// (golang.zx2c4.com/wireguard, whose control socket is
// /var/run/wireguard/KERNELNAME.sock) configured by one of its alternative
// names, a 40-byte one or a short one, has its peers' AllowedIPs: the
// name is resolved in the namespace WireGuard ownership reads from (here
// the test's, by ns.Do). Deleted and re-created under another kernel name
// with the same altnames, the next read follows it: the new peer owns, the
// old one owns nothing.
func TestWireGuardAltnameNamespace(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "polalt")
	bin := netlab.WireGuardBinary(t)
	k0, k1 := netlab.UniqueIfName("wgalt"), netlab.UniqueIfName("wgalt")
	long, short := "pcpd-altlong-wireguard-"+netlab.Rand(17), "wgal-"+netlab.Rand(8)
	c, err := wgctrl.New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	key := func() wgtypes.Key { return newKey(t) }
	a, b := key().PublicKey(), key().PublicKey()
	start := func(kname string, peer wgtypes.Key, allowed string) {
		netlab.StartWireGuard(t, ns, kname, bin)
		priv := key()
		if err := c.ConfigureDevice(kname, wgtypes.Config{PrivateKey: &priv, ReplacePeers: true,
			Peers: []wgtypes.PeerConfig{{PublicKey: peer, AllowedIPs: ipnets(allowed)}}}); err != nil {
			t.Fatal(err)
		}
		for _, n := range []string{long, short} {
			ns.MustRun(t, "ip", "link", "property", "add", "dev", kname, "altname", n)
		}
	}
	start(k0, a, "2001:db8:a::/48")
	idA, idB := OwnerID("wg:"+a.String()), OwnerID("wg:"+b.String())

	ws := map[string]*WireGuard{}
	for _, name := range []string{long, short} {
		var w *WireGuard
		if err := ns.Do(func() (err error) {
			w, err = NewWireGuard(c, []string{name}, time.Hour, zap.NewNop())
			return err
		}); err != nil {
			t.Fatalf("configured as %q (%d bytes), kernel name %s: %v", name, len(name), k0, err)
		}
		if o, _ := w.Lookup(addr("2001:db8:a::1")); o.ID != idA {
			t.Errorf("configured as %q: 2001:db8:a::1 owned by %q, want %q", name, o.ID, idA)
		}
		ws[name] = w
	}

	ns.MustRun(t, "ip", "link", "del", k0)
	start(k1, b, "2001:db8:b::/48")
	for name, w := range ws {
		if err := ns.Do(func() error { return w.Refresh(context.Background()) }); err != nil {
			t.Errorf("configured as %q, re-created as %s: Refresh: %v", name, k1, err)
		}
		oa, _ := w.Lookup(addr("2001:db8:a::1"))
		ob, _ := w.Lookup(addr("2001:db8:b::1"))
		if oa.ID != "" || ob.ID != idB {
			t.Errorf("configured as %q, re-created as %s: owners %q and %q, want none and %q", name, k1, oa.ID, ob.ID, idB)
		}
	}
}

// newKey is a fresh WireGuard private key (its PublicKey names a peer).
func newKey(t *testing.T) wgtypes.Key {
	t.Helper()
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}
