package control

import (
	"context"
	"net/netip"
	"sync/atomic"
	"testing"

	"github.com/pcpd/pcpd/store"
)

// ownerTable is a table that answers HasOwner and counts Leases calls.
type ownerTable struct {
	table
	copies atomic.Int32
}

func (t *ownerTable) Leases() []store.Lease {
	t.copies.Add(1)
	return t.table.Leases()
}

// TestRevokeClientCopiesNoLeases (h/lowfix): revoke --client resolves the
// client's name (with or without its "static:"/"wg:" prefix) by asking the
// backend (Backend.HasOwner), not by Leases, which in pcpd copies every lease
// under the engine's lock: at 100 000 leases a pause before the revoke
// began. Fails before: every row called Leases once.
func TestRevokeClientCopiesNoLeases(t *testing.T) {
	for _, tc := range []struct {
		client string
		n      int
	}{{"a", 2}, {"key=", 1}, {"wg:key=", 1}, {"nobody", 0}} {
		t.Run(tc.client, func(t *testing.T) {
			b := &ownerTable{table: table{leases: []store.Lease{
				lease("a", 6, "2001:db8:1::1", 80), lease("a", 17, "2001:db8:1::1", 80),
				lease("b", 6, "2001:db8:2::1", 80), lease("wg:key=", 17, "2001:db8:2::1", 53),
			}}}
			c := &Client{Path: start(t, b)}
			n, err := c.Revoke(context.Background(), Request{Client: tc.client})
			if err != nil || n != tc.n {
				t.Fatalf("revoke --client %s: %d, %v; want %d", tc.client, n, err, tc.n)
			}
			if k := b.copies.Load(); k != 0 {
				t.Errorf("revoke --client %s copied every lease %d time(s) (Leases), want 0", tc.client, k)
			}
		})
	}
}

// TestRevokeLeasesCopiesNoLeases (h/opsleft): revoke PROTO/ADDR/PORT
// hands the openings named to the backend (Revoke.Opens: the engine
// finds their leases a step at a time), instead of finding their keys in
// Leases, a copy of every lease made under the engine's lock (100 000
// leases: 132 ms, BENCHMARKS.md item 50). Fails before: Leases called once.
func TestRevokeLeasesCopiesNoLeases(t *testing.T) {
	b := &ownerTable{table: table{leases: []store.Lease{
		lease("a", 6, "2001:db8:1::1", 80), lease("a", 17, "2001:db8:1::1", 80),
		lease("b", 6, "10.0.0.2", 80), lease("wg:key=", 6, "2001:db8:1::1", 80),
	}}}
	c := &Client{Path: start(t, b)}
	n, err := c.Revoke(context.Background(), Request{Leases: []LeaseRef{
		{Protocol: "tcp", InternalAddress: netip.MustParseAddr("2001:db8:1::1"), InternalPort: 80},
		{Protocol: "6", InternalAddress: netip.MustParseAddr("::ffff:10.0.0.2"), InternalPort: 80},
	}})
	if err != nil || n != 3 {
		t.Fatalf("revoke: %d, %v; want 3", n, err)
	}
	if k := b.copies.Load(); k != 0 {
		t.Errorf("revoke PROTO/ADDR/PORT copied every lease %d time(s) (Leases), want 0", k)
	}
}
