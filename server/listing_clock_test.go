package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// TestListLeasesAcrossWallStep: ListLeases decodes listChunk leases at a
// time, taking s.mu for each chunk only, and promises each lease as it was
// when the listing began. A wall-clock step seen between two chunks
// (checkClock's rebase, clock.go) shifts the table under the pin, so the
// leases after it are listed on the new wall base and those before on the
// old: 1100 leases granted at one instant for one hour list with two
// expiries an hour apart (`pcpd leases` shows an hour more or less left
// for some of them). The listing now takes the step back off the later
// chunks: all on the base it began on.
func TestListLeasesAcrossWallStep(t *testing.T) {
	c := &stepClocks{}
	c.wall.Store(time.Date(2026, 12, 4, 20, 0, 0, 0, time.UTC).UnixNano())
	h := runClockHarness(t, c, func(_ *Config, p *policy.Config) { p.MaxLeasesPerClient = 4096 })
	const n = listChunk + 76
	var reqs []Request
	for i := range n {
		a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0x0a, 14: byte(i >> 8), 15: byte(i)})
		r := mapReq(a, pcp.ProtoTCP, 443, 0, time.Hour, 1)
		reqs = append(reqs, Request{Local: local6, Source: netip.AddrPortFrom(a, 5000), Data: pcp.AppendRequest(nil, r), admitted: true}) // one /64: past its source bucket, as the readers admit
	}
	for i := 0; i < n; i += 64 {
		for _, b := range h.s.HandleBatch(reqs[i:min(i+64, n)]) {
			var r pcp.Response
			if err := pcp.ParseResponse(b, &r); err != nil || r.Result != pcp.Success {
				t.Fatalf("MAP %d: %v %v (% x)", i, r.Result, err, b)
			}
		}
	}
	expiries := map[time.Time]int{}
	listed := 0
	err := h.s.ListLeases(func(int) error { return nil }, func(l *store.Lease) error {
		if listed == 0 {
			c.step(time.Hour)
			h.s.checkClock() // a sweep tick while the reader is slow
		}
		listed++
		expiries[l.Expires]++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// On the base the listing began on: `pcpd leases` computes the time
	// left from its own clock, read before the listing.
	want := time.Date(2026, 12, 4, 21, 0, 0, 0, time.UTC)
	if listed != n || len(expiries) != 1 || expiries[want] != n {
		t.Errorf("listed %d of %d leases granted together, with %d distinct expiries (want 1, %v): %v", listed, n, len(expiries), want, expiries)
	}
}
