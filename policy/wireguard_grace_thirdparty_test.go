package policy

import (
	"context"
	"testing"
	"time"
)

// TestWireGuardGoneGraceThirdParty (review of the gone grace,
// h/revgrace): peer 1 is on wg0 (2001:db8:a::/48) and on wg1
// (2001:db8:1::/48). wg0 is deleted and held for the grace: its peers
// own their AllowedIPs for Lookup (sweeps, revocation, the guard) "but
// for no request" (WireGuard's doc). A THIRD_PARTY MAP from peer 1's
// wg1 address naming a target in the held 2001:db8:a::/48 is a request
// for the held prefix: it must be refused (NotOwned) as it is once the
// grace is over, not make a new lease toward an interface that is not
// there. The request from the held prefix itself, on wg1, is refused
// already (no owner there), and the same THIRD_PARTY request with wg0
// present is allowed (the positive control: the same peer on several
// interfaces is one owner). Authorize checks the target against the
// interfaces there (table.ownsOnSome), not the whole table. A delete
// (Request.Delete) of the held target is allowed while held (it ends
// peer 1's own lease, opening nothing: review rev3p), not after the
// grace.
func TestWireGuardGoneGraceThirdParty(t *testing.T) {
	d := &devices{}
	d.set("wg0", peer(1, "2001:db8:a::/48"))
	d.set("wg1", peer(1, "2001:db8:1::/48"), peer(2, "2001:db8:b::/48"))
	w, err := newWireGuard(d, []string{"wg0", "wg1"}, time.Hour, nil, WithGoneGrace(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	w.now = func() time.Time { return now }
	p, err := New(Config{}, w)
	if err != nil {
		t.Fatal(err)
	}
	src, held := addr("2001:db8:1::5"), addr("2001:db8:a::5")
	tp := Request{Source: src, Iface: "wg1", Target: held, ThirdParty: true, Protocol: 6, InternalPort: 443}
	own := Request{Source: held, Iface: "wg1", Target: held, Protocol: 6, InternalPort: 443}
	del := tp
	del.Delete = true
	for _, s := range []struct {
		name         string
		gone         bool
		advance      time.Duration
		tp, own, del Reason
	}{
		{"wg0 there", false, 0, Allowed, NoOwner, Allowed},
		{"wg0 gone, held", true, 0, NotOwned, NoOwner, Allowed},
		{"wg0 gone, still held", true, 30 * time.Second, NotOwned, NoOwner, Allowed},
		{"wg0 gone, grace over", true, 30 * time.Second, NotOwned, NoOwner, NotOwned},
	} {
		now = now.Add(s.advance)
		if s.gone {
			d.set("wg0")
		}
		if err := w.Refresh(context.Background()); err != nil {
			t.Fatal(err)
		}
		for len(w.Changes()) > 0 {
			<-w.Changes()
		}
		if _, r := p.Authorize(tp); r != s.tp {
			t.Errorf("%s: THIRD_PARTY %s from %s on wg1: %v, want %v", s.name, held, src, r, s.tp)
		}
		if _, r := p.Authorize(del); r != s.del {
			t.Errorf("%s: THIRD_PARTY delete of %s from %s on wg1: %v, want %v", s.name, held, src, r, s.del)
		}
		if _, r := p.Authorize(own); r != s.own {
			t.Errorf("%s: MAP from %s on wg1: %v, want %v", s.name, held, r, s.own)
		}
	}
}
