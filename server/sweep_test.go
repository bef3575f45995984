package server

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// ownershipFunc is an Ownership given by a function (tests only).
type ownershipFunc func(netip.Addr) (policy.Owner, bool)

func (f ownershipFunc) Lookup(a netip.Addr) (policy.Owner, bool) { return f(a) }
func (f ownershipFunc) Owners() []policy.Owner                   { return nil }

// TestTableUnownedSteps: the periodic ownership check walks the table in
// steps of at most n slots and, over one pass, finds exactly the leases
// whose address has no owner or another owner, skipping freed slots.
func TestTableUnownedSteps(t *testing.T) {
	const n = 3*sweepSlots + 123
	tab := newTable()
	addr := func(i int) netip.Addr {
		return netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 9, 0, byte(i >> 16), 0, 0, 0, 0, 0, byte(i >> 8), byte(i), 1})
	}
	index := map[netip.Addr]int{}
	owner := func(i int) string { return []string{"a", "b"}[i%2] }
	for i := range n {
		tab.put(lease(owner(i), addr(i), protoTCP, uint16(1000+i%50000), addr(i), uint16(1000+i%50000), time.Hour))
		index[addr(i)] = i
	}
	// Freed slots in the middle of the walk.
	for i := 5; i < n; i += 1000 {
		if !tab.del(store.Key{Owner: owner(i), Protocol: protoTCP, InternalAddr: addr(i), InternalPort: uint16(1000 + i%50000)}) {
			t.Fatalf("lease %d not deleted", i)
		}
	}
	own := ownershipFunc(func(a netip.Addr) (policy.Owner, bool) {
		i, ok := index[a]
		switch {
		case !ok, i%7 == 0:
			return policy.Owner{}, false // lost
		case i%11 == 0:
			return policy.Owner{ID: "c"}, true // now another client's
		}
		return policy.Owner{ID: policy.OwnerID(owner(i))}, true
	})
	var want []store.Key
	for i := range n {
		if (i%7 == 0 || i%11 == 0) && (i < 5 || (i-5)%1000 != 0) {
			want = append(want, store.Key{Owner: owner(i), Protocol: protoTCP, InternalAddr: addr(i), InternalPort: uint16(1000 + i%50000)})
		}
	}
	slices.SortFunc(want, compareKeys)

	var got []store.Key
	at, steps := uint32(0), 0
	for {
		var next uint32
		got, next = tab.unowned(at, sweepSlots, own, got)
		steps++
		if next != 0 && next-max(at, 1) != sweepSlots {
			t.Fatalf("step %d read slots %d..%d, want %d slots", steps, at, next, sweepSlots)
		}
		if at = next; at == 0 {
			break
		}
	}
	if wantSteps := (int(tab.top) + sweepSlots - 1) / sweepSlots; steps != wantSteps {
		t.Errorf("%d steps for %d slots, want %d", steps, tab.top, wantSteps)
	}
	slices.SortFunc(got, compareKeys)
	if !slices.Equal(got, want) {
		t.Fatalf("stepwise: %d unowned found, want %d", len(got), len(want))
	}
	all, next := tab.unowned(1, int(tab.top), own, nil)
	slices.SortFunc(all, compareKeys)
	if next != 0 || !slices.Equal(all, want) {
		t.Fatalf("one walk: %d unowned found (next %d), want %d", len(all), next, len(want))
	}
}

// BenchmarkSweepStep: what one periodic ownership step holds the engine
// for, in a table of a million leases all still owned.
func BenchmarkSweepStep(b *testing.B) {
	tab, gen := benchTable(1_000_000)
	ids := make([]policy.OwnerID, 4096)
	for i := range ids {
		ids[i] = policy.OwnerID(gen(i).Owner)
	}
	// A lookup as cheap as a map access: the step's own cost, not the
	// ownership source's.
	own := ownershipFunc(func(a netip.Addr) (policy.Owner, bool) {
		b := a.As16()
		return policy.Owner{ID: ids[(int(b[7])<<16|int(b[13])<<8|int(b[14]))%len(ids)]}, true
	})
	var keys []store.Key
	at := uint32(0)
	for b.Loop() {
		keys, at = tab.unowned(at, sweepSlots, own, keys[:0])
	}
	if len(keys) != 0 {
		b.Fatalf("%d leases found unowned", len(keys))
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*sweepSlots), "ns/slot")
}
