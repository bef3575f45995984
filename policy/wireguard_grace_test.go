package policy

import (
	"context"
	"net/netip"
	"slices"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// TestWireGuardGoneGrace: an interface that disappears keeps its last
// peers owning their AllowedIPs for the grace (WithGoneGrace), for Lookup,
// Owners and Holes but for no request; back with the same peers nothing
// is lost, back with other ones what changed is lost at once, still gone
// after the grace its peers lose everything. Grace 0 is the old
// behaviour: lost at the first read that finds it gone. wg1's peer 3
// holds peer 1's 10.0.1.0/24 too (a hole across interfaces): the hole
// stays exactly as it was while wg0 is held, and only becomes peer 3's
// when peer 1's ownership ends.
func TestWireGuardGoneGrace(t *testing.T) {
	wg0 := []wgtypes.Peer{peer(1, "2001:db8:a::/48", "10.0.1.0/24")}
	wg1 := []wgtypes.Peer{peer(3, "10.0.1.0/24"), peer(2, "2001:db8:c::/64")}
	lostAll1 := Change{Owner: wgID(1), Removed: true, Lost: []netip.Prefix{pfx("2001:db8:a::/48")}}
	type step struct {
		name    string
		wg0     []wgtypes.Peer // nil: gone
		advance time.Duration  // clock moved before the refresh
		want    []Change
		owner   OwnerID // of 2001:db8:a::1 for Lookup (sweeps, revocation); "": none
		serve0  bool    // a request from 2001:db8:a::1 on wg0 is owner's
		hole    bool    // 10.0.1.0/24 is a hole (else peer 3's)
	}
	p1 := wgID(1)
	tests := []struct {
		name  string
		grace time.Duration
		steps []step
	}{
		{"bounce within grace keeps everything", time.Minute, []step{
			{name: "gone", owner: p1, hole: true},
			{name: "still gone", advance: 59 * time.Second, owner: p1, hole: true},
			{name: "back, same peers", wg0: wg0, owner: p1, serve0: true, hole: true},
			{name: "gone again: a new grace", advance: time.Minute, owner: p1, hole: true},
			{name: "still gone, within the new grace", advance: 59 * time.Second, owner: p1, hole: true},
		}},
		{"gone longer than grace loses everything", time.Minute, []step{
			{name: "gone", owner: p1, hole: true},
			{name: "grace over", advance: time.Minute, want: []Change{lostAll1}},
			{name: "back after the grace: a new interface", wg0: wg0, owner: p1, serve0: true, hole: true,
				want: []Change{{Owner: wgID(3), Lost: []netip.Prefix{pfx("10.0.1.0/24")}}}},
		}},
		{"back with another peer loses at once", time.Minute, []step{
			{name: "gone", owner: p1, hole: true},
			{name: "back with peer 4 instead", advance: time.Second,
				wg0: []wgtypes.Peer{peer(4, "2001:db8:a::/48", "10.0.1.0/24")}, want: []Change{lostAll1},
				owner: wgID(4), serve0: true, hole: true},
		}},
		{"back with fewer AllowedIPs loses them at once", time.Minute, []step{
			{name: "gone", owner: p1, hole: true},
			{name: "back with a /49", advance: time.Second,
				wg0:  []wgtypes.Peer{peer(1, "2001:db8:a::/49", "10.0.1.0/24")},
				want: []Change{{Owner: wgID(1), Lost: []netip.Prefix{pfx("2001:db8:a:8000::/49")}}}, owner: p1, serve0: true, hole: true},
		}},
		{"grace 0: lost at once", 0, []step{
			{name: "gone", want: []Change{lostAll1}},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := &devices{}
			d.set("wg0", wg0...)
			d.set("wg1", wg1...)
			w, err := newWireGuard(d, []string{"wg0", "wg1"}, time.Hour, nil, WithGoneGrace(tt.grace))
			if err != nil {
				t.Fatal(err)
			}
			now := time.Now()
			w.now = func() time.Time { return now }
			holes := prefixStrings(w.Holes())
			if !slices.Equal(holes, []string{"10.0.1.0/24"}) {
				t.Fatalf("holes at start %v", holes)
			}
			for _, s := range tt.steps {
				now = now.Add(s.advance)
				d.set("wg0", s.wg0...)
				err := w.Refresh(context.Background())
				var got []Change
				for len(w.Changes()) > 0 {
					got = append(got, <-w.Changes())
				}
				if len(got) != len(s.want) {
					t.Fatalf("%s: changes %+v, want %+v (refresh err %v)", s.name, got, s.want, err)
				}
				for i := range s.want {
					if got[i].Owner != s.want[i].Owner || got[i].Removed != s.want[i].Removed ||
						!slices.Equal(prefixStrings(got[i].Lost), prefixStrings(s.want[i].Lost)) {
						t.Errorf("%s: change %+v, want %+v", s.name, got[i], s.want[i])
					}
				}
				a := addr("2001:db8:a::1")
				if o, _ := w.Lookup(a); o.ID != s.owner {
					t.Errorf("%s: Lookup(%s) = %q, want %q", s.name, a, o.ID, s.owner)
				}
				if o, ok := w.LookupOn(a, "wg0"); ok != s.serve0 || (ok && o.ID != s.owner) {
					t.Errorf("%s: LookupOn(%s, wg0) = %q %v, want %q: %v", s.name, a, o.ID, ok, s.owner, s.serve0)
				}
				// wg1 is served throughout, as before.
				if o, ok := w.LookupOn(addr("2001:db8:c::1"), "wg1"); !ok || o.ID != wgID(2) {
					t.Errorf("%s: wg1's peer 2 not served: %q %v", s.name, o.ID, ok)
				}
				// The hole across interfaces is one exactly while a peer
				// of wg0 holds 10.0.1.0/24 (held or there); then it is
				// peer 3's.
				in := addr("10.0.1.1")
				o, ok := w.LookupOn(in, "wg1")
				if s.hole {
					if ok || !slices.Equal(prefixStrings(w.Holes()), holes) {
						t.Errorf("%s: hole changed: LookupOn(%s, wg1) = %q %v, holes %v", s.name, in, o.ID, ok, w.Holes())
					}
				} else if !ok || o.ID != wgID(3) || len(w.Holes()) != 0 {
					t.Errorf("%s: wg0's peers gone but LookupOn(%s, wg1) = %q %v, holes %v", s.name, in, o.ID, ok, w.Holes())
				}
				p, err := New(Config{}, w)
				if err != nil {
					t.Fatal(err)
				}
				if o, r := p.Authorize(Request{Source: a, Iface: "wg0", Target: a, Protocol: 6, InternalPort: 443}); (r != NoOwner) != s.serve0 {
					t.Errorf("%s: Authorize on wg0 = %q %v, want served %v", s.name, o.ID, r, s.serve0)
				}
			}
		})
	}
}

// TestWireGuardGoneGraceRun: Run ends the grace at its end, not at the
// next periodic refresh (an hour here), and the engine gets the loss.
func TestWireGuardGoneGraceRun(t *testing.T) {
	d := &devices{}
	d.set("wg0", peer(1, "2001:db8:a::/48"))
	w, err := newWireGuard(d, []string{"wg0"}, time.Hour, nil, WithGoneGrace(300*time.Millisecond), WithMissInterval(time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	d.set("wg0")
	w.Lookup(addr("2001:db8:ff::1")) // a miss: Run re-reads, finds wg0 gone
	c := expectChange(t, w, 10*time.Second)
	if c.Owner != wgID(1) || !c.Removed {
		t.Errorf("change %+v, want peer 1 removed", c)
	}
	cancel()
	<-done
}

// TestWireGuardGoneGraceAltname: wg0 configured by its kernel name and
// an altname is deleted and re-created without the altname (wg-quick does
// not restore one): the altname's held peers must not stand beside wg0's
// as a second interface, which would make peer 2's /64 inside peer 1's
// /48 a hole across interfaces and revoke it. With wg0 back, wg0's peers
// now count, whatever the altname holds; changed ones are lost at once.
func TestWireGuardGoneGraceAltname(t *testing.T) {
	const alt = "wireguard-to-the-branch-office-of-bremen"
	peers := []wgtypes.Peer{peer(1, "2001:db8::/48"), peer(2, "2001:db8:0:1::/64")}
	d := &devices{}
	wg0There, altThere, resolve := altnamedWG0(d, alt, peers...)
	for _, ifaces := range [][]string{{"wg0", alt}, {alt, "wg0"}} {
		w, err := newWireGuard(d, ifaces, time.Hour, nil, WithGoneGrace(time.Minute), func(w *WireGuard) { w.kernel = noIndex(resolve) })
		if err != nil {
			t.Fatal(err)
		}
		refresh := func(step string, want ...Change) {
			t.Helper()
			w.Refresh(context.Background())
			var got []Change
			for len(w.Changes()) > 0 {
				got = append(got, <-w.Changes())
			}
			if len(got) != len(want) {
				t.Fatalf("%q %s: changes %+v, want %+v", ifaces, step, got, want)
			}
			for i := range want {
				if got[i].Owner != want[i].Owner || !slices.Equal(prefixStrings(got[i].Lost), prefixStrings(want[i].Lost)) {
					t.Errorf("%q %s: change %+v, want %+v", ifaces, step, got[i], want[i])
				}
			}
			if h := w.Holes(); len(h) != 0 {
				t.Errorf("%q %s: holes %v, want none", ifaces, step, h)
			}
		}
		// Deleted: both names gone, both held.
		wg0There.Store(false)
		altThere.Store(false)
		d.set("wg0")
		refresh("gone")
		// Back without the altname, same peers: nothing lost.
		wg0There.Store(true)
		d.set("wg0", peers...)
		refresh("back without the altname")
		for _, tc := range []struct {
			src  string
			want OwnerID
		}{{"2001:db8::5", wgID(1)}, {"2001:db8:0:1::5", wgID(2)}} {
			if o, ok := w.LookupOn(addr(tc.src), "wg0"); !ok || o.ID != tc.want {
				t.Errorf("%q: LookupOn(%s, wg0) = %q %v, want %q", ifaces, tc.src, o.ID, ok, tc.want)
			}
		}
		// Peer 2 removed while the altname still holds it: lost at once.
		d.set("wg0", peers[0])
		refresh("peer 2 removed", Change{Owner: wgID(2), Removed: true, Lost: []netip.Prefix{pfx("2001:db8:0:1::/64")}})
		d.set("wg0", peers...)
		refresh("peer 2 back: carves its /64 out of peer 1's /48 again",
			Change{Owner: wgID(1), Lost: []netip.Prefix{pfx("2001:db8:0:1::/64")}})
		altThere.Store(true)
	}
}
