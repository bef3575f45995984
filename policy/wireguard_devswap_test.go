package policy

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// gatedDevices is devices whose reads, while gate is set, read the
// device, say so on read, and return what they read once gate closes.
type gatedDevices struct {
	*devices
	read chan struct{}
	gate chan struct{}
}

func (g *gatedDevices) Device(name string) (*wgtypes.Device, error) {
	dev, err := g.devices.Device(name)
	if gate := g.gate; gate != nil {
		g.read <- struct{}{}
		<-gate
	}
	return dev, err
}

// TestWireGuardDevicesChanged (issue 9, h/swapev): wg0 (peer 1, the
// client's 2001:db8:a::/48) is deleted and created again with other
// peers; the listener, which follows the link events, tells the ownership
// (DevicesChanged) before it serves the new device. The view was read
// within the fresh bound (an hour here: no timing), and before, it judged
// the new device's first requests: the client's address was peer 1's,
// whoever sent from it. Now:
//   - a request that opens a pinhole finds the view stale (Stale) and is
//     judged after a read begun after the change (Freshen): nobody's if
//     the new device's peer has a full tunnel, the new key's if it holds
//     the prefix;
//   - meanwhile, requests arriving on wg0 are nobody's (a delete
//     included), while Lookup (sweeps) still has peer 1;
//   - a read that began before the change serves no such request, even
//     if it ends after it;
//   - a read that fails keeps wg0's requests nobody's (the last good
//     peers are the old device's) until one ends cleanly;
//   - a device still there asks Run for a read at once; a deleted one
//     does not (the read that finds it gone starts its grace, as before);
//   - SwapPending (h/delwait) is true from the change until a read that
//     began after it (a read across it included): the server has a
//     delete wait for that read, which finds its owner.
func TestWireGuardDevicesChanged(t *testing.T) {
	a := netip.MustParseAddr("2001:db8:a::5")
	for _, tc := range []struct {
		name     string
		newPeer  wgtypes.Peer
		owner    OwnerID // a's after a read of the new device
		inflight bool    // a read begun before the change ends after it
		fail     bool    // the first read after the change fails
		gone     bool    // the interface is deleted, not back
	}{
		{name: "new peer with a full tunnel", newPeer: peer(2, "::/0", "0.0.0.0/0")},
		{name: "new key, the old peer's AllowedIPs", newPeer: peer(2, "2001:db8:a::/48"), owner: wgID(2)},
		{name: "a read under way across the change", newPeer: peer(2, "::/0"), inflight: true},
		{name: "the read after the change fails", newPeer: peer(2, "2001:db8:a::/48"), owner: wgID(2), fail: true},
		{name: "deleted", gone: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := &devices{}
			d.set("wg0", peer(1, "2001:db8:a::/48"))
			g := &gatedDevices{devices: d, read: make(chan struct{})}
			w, err := newWireGuard(g, []string{"wg0"}, time.Hour, nil, WithFreshBound(time.Hour), WithMissInterval(time.Hour))
			if err != nil {
				t.Fatal(err)
			}
			p, err := New(Config{}, w)
			if err != nil {
				t.Fatal(err)
			}
			own := Request{Source: a, Iface: "wg0", Target: a, Protocol: 6, InternalPort: 443}
			del := own
			del.Delete = true
			judged := func(r Request) OwnerID {
				o, reason := p.Authorize(r)
				if reason != Allowed {
					return ""
				}
				return o.ID
			}
			if w.Stale() || w.SwapPending() || judged(own) != wgID(1) {
				t.Fatalf("before: stale %v, swap pending %v, %s's request judged %q; want false, false, peer 1", w.Stale(), w.SwapPending(), a, judged(own))
			}

			var ended chan error
			if tc.inflight {
				g.gate = make(chan struct{})
				ended = make(chan error, 1)
				go func() { ended <- w.Refresh(context.Background()) }()
				<-g.read // wg0 read as the old device
			}
			if tc.gone {
				d.set("wg0")
			} else {
				d.set("wg0", tc.newPeer)
			}
			w.DevicesChanged([]string{"wg0"}, tc.gone)
			if tc.inflight {
				gate := g.gate
				g.gate = nil
				close(gate)
				if err := <-ended; err != nil {
					t.Fatal(err)
				}
			}
			if !w.Stale() {
				t.Errorf("after the change: Stale false, want true (a view read before it, within the bound)")
			}
			if !w.SwapPending() || !p.SwapPending() {
				t.Errorf("after the change: SwapPending %v (Policy's %v), want true (the view has no wg0 peers till a read: a delete waits for it)", w.SwapPending(), p.SwapPending())
			}
			for _, r := range []Request{own, del} {
				if got := judged(r); got != "" {
					t.Errorf("after the change, before a read: %s's request (delete %v) judged %q, want nobody's", a, r.Delete, got)
				}
			}
			if o, ok := w.Lookup(a); !ok || o.ID != wgID(1) {
				t.Errorf("after the change: Lookup(%s) = %q %v, want peer 1 (sweeps are unaffected)", a, o.ID, ok)
			}
			if asked := len(w.renewCh) == 1; asked == tc.gone {
				t.Errorf("read asked of Run: %v, want %v", asked, !tc.gone)
			}
			if tc.gone {
				return
			}

			if tc.fail {
				d.fail("wg0", errors.New("transient"))
				reads := d.calls.Load()
				w.Freshen()
				if n := d.calls.Load() - reads; n != 1 {
					t.Fatalf("Freshen after the change: %d reads, want 1", n)
				}
				if got := judged(own); got != "" {
					t.Errorf("after a failed read: %s's request judged %q, want nobody's (the last good peers are the old device's)", a, got)
				}
				d.fail("wg0", nil)
				if err := w.Refresh(context.Background()); err != nil {
					t.Fatal(err)
				}
			} else {
				reads := d.calls.Load()
				w.Freshen()
				if n := d.calls.Load() - reads; n != 1 {
					t.Fatalf("Freshen after the change: %d reads, want 1", n)
				}
			}
			if w.Stale() || w.SwapPending() {
				t.Errorf("after a read begun after the change: Stale %v, SwapPending %v, want false", w.Stale(), w.SwapPending())
			}
			if got := judged(del); got != tc.owner {
				t.Errorf("after a read of the new device: %s's delete judged %q, want %q", a, got, tc.owner)
			}
			if got := judged(own); got != tc.owner {
				t.Errorf("after a read of the new device: %s's request judged %q, want %q", a, got, tc.owner)
			}
		})
	}
}

// TestWireGuardDevicesChangedRun (h/swapev): Run reads at once when told
// of a device still there, whatever its refresh and miss intervals (an
// hour here), and the view it reads serves requests.
func TestWireGuardDevicesChangedRun(t *testing.T) {
	d := &devices{}
	d.set("wg0", peer(1, "2001:db8:a::/48"))
	w, err := newWireGuard(d, []string{"wg0"}, time.Hour, nil, WithFreshBound(time.Hour), WithMissInterval(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	runUntilCleanup(t, w)
	d.set("wg0", peer(2, "2001:db8:a::/48"))
	w.DevicesChanged([]string{"wg0"}, false)
	a := netip.MustParseAddr("2001:db8:a::5")
	deadline := time.Now().Add(10 * time.Second)
	for w.Stale() && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if w.Stale() {
		t.Fatal("Run did not read the changed device")
	}
	if o, ok := w.LookupOn(a, "wg0"); !ok || o.ID != wgID(2) {
		t.Errorf("after Run's read: %s on wg0 is %q %v, want peer 2", a, o.ID, ok)
	}
}

// runUntilCleanup runs w.Run until t's cleanup, which waits for it.
func runUntilCleanup(t *testing.T, w *WireGuard) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
}
