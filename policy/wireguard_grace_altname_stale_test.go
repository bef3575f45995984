package policy

import (
	"context"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// TestWireGuardGoneGraceAltnameStale (review of the gone grace,
// h/revgrace): wg0 is configured by its kernel name and an altname. A
// wg-quick down/up re-creates wg0 without the altname, which stays held
// with wg0's peers of then (superseded by wg0's while wg0 is there:
// TestWireGuardGoneGraceAltname). The operator then removes peer 2: its
// /64 falls back to peer 1's /48 (peer 2's loss is reported; peer 1 may
// map there now). wg0 bounces again within the altname's grace: both
// names are now held under the kernel name wg0, and the altname's stale
// copy must not stand beside wg0's last peers: a removed peer would own
// its /64 again (Lookup: sweeps, THIRD_PARTY targets, the guard) and
// peer 1 would lose it, its leases there revoked, for the rest of the
// altname's grace.
func TestWireGuardGoneGraceAltnameStale(t *testing.T) {
	const alt = "wireguard-to-the-branch-office-of-bremen"
	peers := []wgtypes.Peer{peer(1, "2001:db8::/48"), peer(2, "2001:db8:0:1::/64")}
	d := &devices{}
	wg0There, altThere, resolve := altnamedWG0(d, alt, peers...)
	w, err := newWireGuard(d, []string{"wg0", alt}, time.Hour, nil, WithGoneGrace(time.Minute), func(w *WireGuard) { w.kernel = noIndex(resolve) })
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	w.now = func() time.Time { return now }
	var got []Change
	refresh := func() {
		w.Refresh(context.Background())
		for len(w.Changes()) > 0 {
			got = append(got, <-w.Changes())
		}
	}
	// wg-quick down/up: back without the altname.
	wg0There.Store(false)
	altThere.Store(false)
	d.set("wg0")
	refresh()
	wg0There.Store(true)
	d.set("wg0", peers...)
	now = now.Add(5 * time.Second)
	refresh()
	// Peer 2 removed: its /64 is peer 1's.
	d.set("wg0", peers[0])
	now = now.Add(5 * time.Second)
	refresh()
	in64 := addr("2001:db8:0:1::5")
	if o, ok := w.LookupOn(in64, "wg0"); !ok || o.ID != wgID(1) {
		t.Fatalf("after peer 2's removal %s on wg0 is %q %v, want peer 1", in64, o.ID, ok)
	}
	got = nil
	// wg0 bounces again, within the altname's grace.
	wg0There.Store(false)
	d.set("wg0")
	now = now.Add(5 * time.Second)
	refresh()
	if o, ok := w.Lookup(in64); !ok || o.ID != wgID(1) {
		t.Errorf("wg0 gone again: Lookup(%s) = %q %v, want peer 1 (held with wg0's last peers)", in64, o.ID, ok)
	}
	for _, c := range got {
		t.Errorf("wg0 gone again: change %+v (owner %s lost %v), want none", c, c.Owner, c.Lost)
	}
	for _, o := range w.Owners() {
		if o.ID == wgID(2) {
			t.Errorf("wg0 gone again: removed peer 2 owns %v again", o.Prefixes)
		}
	}
}
