package policy

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// TestLookupOnMatchesWireGuardSourceCheck checks LookupOn and Authorize
// against a model of what WireGuard itself decides (review of the F3
// fix, h/revown): a packet from a arriving on iface was sent by the peer
// of iface whose AllowedIP containing a is the longest (every AllowedIP,
// /0 and other too-short ones included: WireGuard knows no MinOwnedBits),
// and is dropped if there is none. A request is then its source's owner's
// (Lookup, the ownership's own verdict) exactly when that sender is the
// owner, through an ownable AllowedIP. Random configurations of up to three interfaces and five peers
// drawn from a pool of nested prefixes; a key may be a peer of several
// interfaces; no prefix is given to two peers of one interface (WireGuard
// moves it to the last). In a third of the rounds with several
// interfaces, one of them is then gone, in half of those held for a
// grace (WithGoneGrace). THIRD_PARTY targets are checked
// against the same model: the requester's peer must hold the target,
// ownably, on an interface that is there.
func TestLookupOnMatchesWireGuardSourceCheck(t *testing.T) {
	pool := []string{
		"::/0", "2000::/8", "2001:db8::/32", "2001:db8::/40", "2001:db8::/48", "2001:db8::/56",
		"2001:db8::/64", "2001:db8:0:1::/64", "2001:db8::1/128", "2001:db8:0:1::1/128",
		"2001:db8:80::/48", "0.0.0.0/0", "10.0.0.0/8", "10.0.0.0/16", "10.0.0.0/24",
		"10.0.0.1/32", "10.0.1.0/24", "10.0.0.0/4",
	}
	addrs := []string{
		"2001:db8::1", "2001:db8::2", "2001:db8:0:1::1", "2001:db8:0:1::2", "2001:db8:0:2::1",
		"2001:db8:80::1", "2001:db8:1::1", "2001:dead::1", "10.0.0.1", "10.0.0.2", "10.0.1.1",
		"10.1.0.1", "192.0.2.1",
	}
	ifaces := []string{"wg0", "wg1", "wg2"}
	r := rand.New(rand.NewPCG(11, 12))
	for round := range 3000 {
		nIf := 1 + r.IntN(3)
		cfg := map[string]map[int][]netip.Prefix{} // iface → key → AllowedIPs
		d := &devices{}
		for _, ifc := range ifaces[:nIf] {
			cfg[ifc] = map[int][]netip.Prefix{}
			taken := map[netip.Prefix]bool{}
			var peers []wgtypes.Peer
			for k := range 5 {
				if r.IntN(2) == 0 {
					continue
				}
				var allowed []string
				for range 1 + r.IntN(3) {
					p := pool[r.IntN(len(pool))]
					pp := netip.MustParsePrefix(p).Masked()
					if taken[pp] {
						continue
					}
					taken[pp] = true
					allowed = append(allowed, p)
					cfg[ifc][k] = append(cfg[ifc][k], pp)
				}
				if len(allowed) > 0 {
					peers = append(peers, peer(k, allowed...))
				}
			}
			if peers == nil {
				peers = []wgtypes.Peer{} // an interface with no peers
			}
			d.set(ifc, peers...)
		}
		// Half the gone interfaces are held (WithGoneGrace): their peers
		// still own in Lookup, but for no request.
		grace := time.Duration(r.IntN(2)) * time.Hour
		w, err := newWireGuard(d, ifaces[:nIf], time.Hour, nil, func(w *WireGuard) {
			w.kernel = func(name string) (string, int, bool, error) { return name, 0, true, nil }
		}, WithGoneGrace(grace))
		if err != nil {
			t.Fatal(err)
		}
		if nIf > 1 && r.IntN(3) == 0 {
			// One interface gone since the start (present < configured:
			// one left is table.only's shortcut): its peers own nothing,
			// or, held, own for Lookup only.
			gone := ifaces[r.IntN(nIf)]
			d.set(gone)
			if err := w.Refresh(context.Background()); err != nil {
				t.Fatal(err)
			}
			for len(w.Changes()) > 0 {
				<-w.Changes()
			}
			cfg[gone] = nil
		}
		p, err := New(Config{}, w)
		if err != nil {
			t.Fatal(err)
		}
		// sender is WireGuard's source check on ifc: the key of the
		// longest AllowedIP containing a, -1 if none.
		sender := func(a netip.Addr, ifc string) (int, bool) {
			best, bits, own := -1, -1, false
			for k, ps := range cfg[ifc] {
				for _, q := range ps {
					if q.Contains(a) && q.Bits() > bits {
						best, bits, own = k, q.Bits(), checkOwnedPrefix(q) == nil
					}
				}
			}
			return best, own
		}
		for _, as := range addrs {
			a := netip.MustParseAddr(as)
			o, owned := w.Lookup(a)
			for _, ifc := range append(ifaces[:nIf:nIf], "", "eth0") {
				want := OwnerID("")
				// The same key holding only a too-short prefix on ifc
				// (its full tunnel there, an owned prefix on another
				// interface) is refused: conservative, and not what
				// InterfaceLookup's doc says ("an AllowedIP
				// containing src"); the model follows the code there.
				if s, ownable := sender(a, ifc); owned && s >= 0 && ownable && wgID(s) == o.ID {
					want = o.ID
				}
				got, ok := w.LookupOn(a, ifc)
				if got.ID != want || ok != (want != "") {
					t.Fatalf("round %d, config %s: LookupOn(%s, %q) = %q, want %q (WireGuard's sender, ownable %s, Lookup %q)",
						round, fmt.Sprint(cfg), a, ifc, got.ID, want, fmt.Sprint(sender(a, ifc)), o.ID)
				}
				ao, reason := p.Authorize(Request{Source: a, Iface: ifc, Target: a, Protocol: 6, InternalPort: 443})
				if (reason == NoOwner) != (want == "") || ao.ID != want {
					t.Fatalf("round %d, config %s: Authorize(%s on %q) = %q %v, want %q",
						round, fmt.Sprint(cfg), a, ifc, ao.ID, reason, want)
				}
				// THIRD_PARTY for every other address: allowed exactly
				// when the target is the requester's (Lookup) and its
				// peer holds it, ownably, on some interface there (the
				// arrival one or another; a gone one is none); a delete
				// when it is the requester's in Lookup.
				for _, ts := range addrs {
					tg := netip.MustParseAddr(ts)
					if tg == a {
						continue
					}
					tw := want != ""
					if to, ok := w.Lookup(tg); !ok || to.ID != want {
						tw = false
					}
					// A delete needs only Lookup: a held prefix still
					// counts (review rev3p).
					_, reason := p.Authorize(Request{Source: a, Iface: ifc, Target: tg, ThirdParty: true, Delete: true, Protocol: 6, InternalPort: 443})
					if (reason == Allowed) != tw {
						t.Fatalf("round %d, config %s: THIRD_PARTY delete %s from %s on %q: %v, want allowed %v",
							round, fmt.Sprint(cfg), tg, a, ifc, reason, tw)
					}
					on := false
					for _, ifc2 := range ifaces[:nIf] {
						if s, ownable := sender(tg, ifc2); s >= 0 && ownable && wgID(s) == want {
							on = true
						}
					}
					tw = tw && on
					_, reason = p.Authorize(Request{Source: a, Iface: ifc, Target: tg, ThirdParty: true, Protocol: 6, InternalPort: 443})
					if (reason == Allowed) != tw {
						t.Fatalf("round %d, config %s: THIRD_PARTY %s from %s on %q: %v, want allowed %v",
							round, fmt.Sprint(cfg), tg, a, ifc, reason, tw)
					}
				}
				// IPv4-mapped, as a dual-stack socket would give it.
				if a.Is4() {
					m := netip.AddrFrom16(a.As16())
					if ao, _ := p.Authorize(Request{Source: m, Iface: ifc, Target: a, Protocol: 6, InternalPort: 443}); ao.ID != want {
						t.Fatalf("round %d: Authorize(%s mapped on %q) = %q, want %q", round, a, ifc, ao.ID, want)
					}
				}
			}
		}
	}
}
