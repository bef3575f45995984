package server

import (
	"fmt"
	"net/netip"
	"os"
	"reflect"
	"strconv"
	"testing"
	"time"

	"github.com/pcpd/pcpd/store"
)

// TestListLeasesWalkHolds (h/ops2): ListLeases gathers its keys listScan
// table slots a hold of s.mu (here 256 of 2000 leases), so the engine
// gets in between holds, and the listing still gives the leases of the
// moment it began: the engine renewing half the leases, ending the rest
// (most in slots the walk has not reached yet) and mapping new ones for
// new owners right after the walk's first hold changes nothing listed.
// After it no slot is held back and the table is consistent.
//
// Fails before (the keys gathered in one hold): "one hold walked 2000
// slots, want at most 256" (the walk's end at the table's top). Without the
// ended slots (pend past the mark) counted: the listing lacks the leases
// ended in slots ahead of the walk.
func TestListLeasesWalkHolds(t *testing.T) {
	const n, scan = 2000, 256
	defer func(n int) { listScan = n }(listScan)
	listScan = scan
	h := newHarness(t)
	now := h.clock.Now()
	var ls []store.Lease
	for i := range n {
		a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0x0a, 14: byte(i >> 8), 15: byte(i)})
		ls = append(ls, store.Lease{Key: store.Key{Owner: fmt.Sprint("o", i%5), InternalAddr: a, Protocol: 6, InternalPort: 1},
			ExternalAddr: a, ExternalPort: 1, Kind: store.KindMap, Created: now, Expires: now.Add(time.Hour),
			Description: fmt.Sprint("d", i)})
	}
	putAll(h.s, ls)
	want := h.s.leasesOneHold()
	holds, longest := 0, 0
	testHookListHold = func(slots int) {
		holds++
		longest = max(longest, slots)
		if holds != 1 {
			return
		}
		churn(t, h, ls, func(j int) bool { return j%2 == 0 })
	}
	defer func() { testHookListHold = nil }()
	got, err := list(t, h.s, func(int) {})
	testHookListHold = nil
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%d leases listed; the key walk took %d holds of s.mu, the longest over %d slots", len(got), holds, longest)
	if longest > scan {
		t.Errorf("one hold walked %d slots, want at most %d", longest, scan)
	}
	if len(got) != len(want) || !reflect.DeepEqual(got, want) {
		t.Errorf("the listing (%d leases) is not the leases of the moment it began (%d): it saw changes made during its walk", len(got), len(want))
	}
	if len(h.s.tab.pend) != 0 || h.s.tab.pins != 0 {
		t.Fatalf("after the listing: %d slots held back, %d pins", len(h.s.tab.pend), h.s.tab.pins)
	}
	checkTable(t, h.s.tab)
	if got := h.s.tab.len(); got != n/2+10 {
		t.Fatalf("%d leases after the changes, want %d", got, n/2+10)
	}
}

// TestListLeasesHoldFigure (figure; PCPD_LIST_HOLD=N leases, skipped
// without): the key walk's holds of s.mu, timed from one hold's end to the
// next (testHookListHold; the first from the call: the pin, then the
// walk), with the walk in one hold as before h/ops2 (listScan above the
// table) and listScan slots a hold. A figure, not an assertion: run it
// under the bench lock.
func TestListLeasesHoldFigure(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("PCPD_LIST_HOLD"))
	if n <= 0 {
		t.Skip("PCPD_LIST_HOLD=N (leases) not set")
	}
	h := newHarness(t)
	now := h.clock.Now()
	ls := make([]store.Lease, 0, n)
	for i := range n {
		a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0x0a, 12: byte(i >> 24), 13: byte(i >> 16), 14: byte(i >> 8), 15: byte(i)})
		ls = append(ls, store.Lease{Key: store.Key{Owner: fmt.Sprint("o", i%50), InternalAddr: a, Protocol: 6, InternalPort: 1},
			ExternalAddr: a, ExternalPort: 1, Kind: store.KindMap, Created: now, Expires: now.Add(time.Hour)})
	}
	putAll(h.s, ls)
	defer func(n int) { listScan = n }(listScan)
	defer func() { testHookListHold = nil }()
	for _, c := range []struct {
		name string
		scan int
	}{{"one hold (before)", 1 << 30}, {fmt.Sprintf("%d slots a hold (after)", listScan), listScan}} {
		for range 3 {
			listScan = c.scan
			var longest time.Duration
			holds, last := 0, time.Now()
			testHookListHold = func(int) {
				holds++
				longest = max(longest, time.Since(last))
				last = time.Now()
			}
			k := 0
			if err := h.s.ListLeases(func(int) error { return nil }, func(*store.Lease) error { k++; return nil }); err != nil || k != n {
				t.Fatalf("%d listed (%v), want %d", k, err, n)
			}
			t.Logf("%d leases, key walk in %-28s %3d holds, longest %v", n, c.name+":", holds, longest.Round(time.Microsecond))
		}
	}
}
