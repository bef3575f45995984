package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/store"
)

// TestAllSeesLeaseRenewedWhilePinned: a walk that lets go of the lock
// between steps (announceTargets) must not miss a lease that existed
// throughout when it is renewed (put = delete + insert) while a listing
// pins the table: a freed slot behind the cursor is not reused then.
func TestAllSeesLeaseRenewedWhilePinned(t *testing.T) {
	tab := newTable()
	base := time.Unix(1_700_000_000, 0).UTC()
	mk := func(i int) store.Lease {
		a := netip.AddrFrom4([4]byte{10, 0, 0, byte(i)})
		return store.Lease{Key: store.Key{Owner: "o", InternalAddr: a, InternalPort: 1, Protocol: 6},
			ExternalAddr: netip.MustParseAddr("192.0.2.1"), ExternalPort: uint16(1000 + i), Kind: store.KindMap,
			Created: base, Expires: base.Add(time.Minute)}
	}
	for i := 1; i <= 3; i++ {
		tab.put(mk(i))
	}
	tab.del(mk(1).Key) // slot 1 on the free list
	tab.put(mk(1))     // ... and taken again
	tab.put(mk(4))     // slot 4
	tab.del(mk(1).Key) // slot 1 free again
	ep := tab.pin()    // a ListLeases runs meanwhile
	defer tab.unpin(ep)
	seen := map[netip.Addr]bool{}
	step := 0
	for _, l := range tab.all() {
		seen[l.InternalAddr] = true
		if step++; step == 2 {
			// between steps, with the lock given up: lease 1 expires and
			// lease 3 is renewed; its old slot is pinned, so it lands in slot 1
			r := mk(4)
			r.Expires = base.Add(2 * time.Minute)
			tab.put(r)
		}
	}
	if !seen[mk(4).InternalAddr] {
		t.Errorf("lease 4 existed during the whole walk but was never yielded")
	}
}
