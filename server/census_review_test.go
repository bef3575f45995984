package server

import (
	"context"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// TestCensusDisagreeingOnlySizes (review h/revs1m, a guard): a census that
// fits (Census.fits) but does not match what the restore meets (leases
// that expired between the census and the restore's clock reading, a
// clock stepped back within censusAge, or any other miscount) only sizes
// buffers wrongly: the restore's adding pass ends with the same table,
// the same keys to drop (in chunks of at most dropChunk) and the same
// connection filters to end (expEnds, the conntrack flush of expired and
// moved leases), whatever the counts, as when presize counted exactly.
// Every buffer the counts size grows (table indexes, record pages, expiry
// heap by append; keyChunks; expEnds): none is a fixed buffer that could
// truncate or drop. Passes on main.
func TestCensusDisagreeingOnlySizes(t *testing.T) {
	h := newHarness(t, func(c *Config, p *policy.Config) {
		c.KeepConnections = false
		p.DenyPorts = []policy.PortRange{{First: 22, Last: 22}}
	})
	now := h.clock.Now()
	// streamStartLeases, and dropChunk+5 leases expired 10 s ago: expired
	// between a census taken 30 s before the restore's clock reading and
	// that reading (the census counts them live).
	ls := streamStartLeases(now)
	for i := range dropChunk + 5 {
		a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0x0a, 0, 1, 0, 0, 0, 0, 0, byte(i >> 16), byte(i >> 8), byte(i)})
		ls = append(ls, store.Lease{Key: store.Key{Owner: ownerA, Protocol: 6, InternalAddr: a, InternalPort: 443},
			ExternalAddr: a, ExternalPort: 443, Kind: store.KindMap, Created: now.Add(-time.Hour),
			Expires: now.Add(-10 * time.Second), ClientAddr: netip.AddrPortFrom(a, 5350), ServerAddr: local6})
	}
	type end struct {
		table   []store.Lease
		drops   []store.Key
		chunks  []int
		expEnds []ctFilter
	}
	run := func(size func(r *restoring)) end {
		s, err := New(h.cfg, Deps{Firewall: h.fw, Store: h.st, Policy: h.s.pol, Now: h.clock.Now}, h.s.log)
		if err != nil {
			t.Fatal(err)
		}
		r := s.restoring(now)
		r.ctx = context.Background()
		size(r)
		for i := range ls {
			l := ls[i]
			l.Filters = slices.Clone(l.Filters)
			r.add(&l)
		}
		var e end
		for _, l := range s.Leases() {
			e.table = append(e.table, l)
		}
		for _, ks := range r.drop {
			if len(ks) > dropChunk {
				t.Errorf("a drop chunk of %d keys, more than dropChunk (%d)", len(ks), dropChunk)
			}
			e.chunks = append(e.chunks, len(ks))
			e.drops = append(e.drops, ks...)
		}
		e.expEnds = r.expEnds
		return e
	}
	want := run(func(r *restoring) {
		if err := r.presize(eachOf(ls)); err != nil {
			t.Fatal(err)
		}
	})
	if len(want.drops) < dropChunk || len(want.expEnds) < dropChunk {
		t.Fatalf("fixture: %d drops, %d filters; want more than dropChunk", len(want.drops), len(want.expEnds))
	}
	early := NewCensus(h.cfg, now.Add(-30*time.Second))
	for i := range ls {
		early.Add(&ls[i])
	}
	if !early.fits(h.s, now) || early.drops >= len(want.drops) {
		t.Fatalf("census 30 s early: fits %v, %d drops; want it fitting and short of the %d drops", early.fits(h.s, now), early.drops, len(want.drops))
	}
	for _, c := range []struct {
		name           string
		n, drops, ends int
	}{
		{"census 30 s early", early.n, early.drops, early.ends},
		{"one lease, nothing dropped", 1, 0, 0},
		{"all dropped, one filter", len(ls), len(ls), 1},
		{"ten times over", 10 * len(ls), 5 * len(ls), 20 * len(ls)},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := run(func(r *restoring) { r.size(c.n, c.drops, c.ends) })
			if diff := cmp.Diff(want, got, cmp.AllowUnexported(end{}, ctFilter{}, ctTarget{}),
				cmp.Comparer(func(a, b netip.Addr) bool { return a == b }),
				cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }),
				cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); diff != "" {
				t.Errorf("restore sized by census %d/%d/%d differs from presize's (-presize +census):\n%.3000s", c.n, c.drops, c.ends, diff)
			}
		})
	}
}
