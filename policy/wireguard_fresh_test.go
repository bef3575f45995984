package policy

import (
	"sync"
	"testing"
	"time"
)

// TestWireGuardFreshenThirdParty (issue 9 LOW, h/attack's window;
// h/tpfresh): peer 1 holds 2001:db8:1::/48 on wg0; a second peer is
// given the more-specific 2001:db8:1:ff00::/56 inside it (WireGuard
// routes it to peer 2 at once). Until the next read the view still has
// it peer 1's, and a THIRD_PARTY request into it was allowed. Freshen,
// which the socket readers call before Authorize of a THIRD_PARTY
// request, re-reads a view older than the fresh bound: 64 concurrent
// callers cause exactly one read, and every one of their THIRD_PARTY
// requests is then refused (NotOwned); peer 1's own address stays
// allowed, and the read delivers peer 1's loss (Changes). A view within
// the bound is not re-read (the bound, an hour here, keeps the test
// free of timing).
func TestWireGuardFreshenThirdParty(t *testing.T) {
	d := &devices{}
	d.set("wg0", peer(1, "2001:db8:1::/48"))
	w, err := newWireGuard(d, []string{"wg0"}, time.Hour, nil, WithFreshBound(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(Config{}, w)
	if err != nil {
		t.Fatal(err)
	}
	src, carved := addr("2001:db8:1::5"), addr("2001:db8:1:ff00::5")
	tp := Request{Source: src, Iface: "wg0", Target: carved, ThirdParty: true, Protocol: 6, InternalPort: 443}
	own := Request{Source: src, Iface: "wg0", Target: src, Protocol: 6, InternalPort: 443}
	d.set("wg0", peer(1, "2001:db8:1::/48"), peer(2, "2001:db8:1:ff00::/56"))

	reads := d.calls.Load()
	p.Freshen() // the view is within the bound: no read
	if n := d.calls.Load() - reads; n != 0 {
		t.Fatalf("Freshen of a view within the bound read %d times, want 0", n)
	}
	if _, r := p.Authorize(tp); r != Allowed {
		t.Fatalf("THIRD_PARTY %s by the view read before peer 2 came: %v, want %v (the lag the bound allows)", carved, r, Allowed)
	}

	w.readAt.Store(mono() - 2*int64(time.Hour)) // the view is now older than the bound
	const n = 64
	got := make([]Reason, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			p.Freshen()
			_, got[i] = p.Authorize(tp)
		}()
	}
	close(start)
	wg.Wait()
	if k := d.calls.Load() - reads; k != 1 {
		t.Errorf("%d concurrent THIRD_PARTY requests on a stale view caused %d reads of wg0, want 1", n, k)
	}
	for i, r := range got {
		if r != NotOwned {
			t.Fatalf("request %d: THIRD_PARTY %s from peer 1 after peer 2 got %s: %v, want %v", i, carved, "2001:db8:1:ff00::/56", r, NotOwned)
		}
	}
	if _, r := p.Authorize(own); r != Allowed {
		t.Errorf("peer 1's own address after the re-read: %v, want %v", r, Allowed)
	}
	select {
	case c := <-w.Changes():
		if c.Owner != wgID(1) || len(c.Lost) != 1 || c.Lost[0].String() != "2001:db8:1:ff00::/56" {
			t.Errorf("change %+v, want peer 1 losing 2001:db8:1:ff00::/56", c)
		}
	default:
		t.Error("no Change delivered by Freshen's read")
	}
}
