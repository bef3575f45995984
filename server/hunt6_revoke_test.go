package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
	"github.com/pcpd/pcpd/store"
)

// TestRevokeUnownedWhileStoreFails (h/hunt6, issue 9): peer A's addresses
// pass to a new peer C (the admin gave them to another device) while the
// store refuses writes (state directory remounted read-only after an I/O
// error, a full disk). The ownership sweep must still take A's pinholes
// out of the kernel: they now open C's address (an IPv6 port C never
// asked for, a public IPv4 port DNAT-ed to C's address). Only the store's
// record of the revocation can wait: it is owed and written once the store
// takes writes again (a restart before that restores the leases and the
// start's sweep revokes them again).
//
// On main the revocation was one transaction like a request's: the store
// failed, the kernel's deletes were undone, and the table rolled back, at
// every sweep; A's pinholes lived until their leases expired.
func TestRevokeUnownedWhileStoreFails(t *testing.T) {
	for _, sweep := range ownershipSweeps {
		t.Run(sweep.name, func(t *testing.T) {
			h := newHarness(t)
			own := &mutableOwnership{owners: map[policy.OwnerID][]netip.Prefix{
				"wg:A": {netip.MustParsePrefix("2001:db8:a::/48"), netip.MustParsePrefix("10.0.0.0/28")},
				"wg:B": {netip.MustParsePrefix("2001:db8:b::/48")},
			}}
			h.own = own
			h.start()
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.Success)
			h.expect(h.do(mapReq(addrB, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.Success)
			if r := h.pmp(v4A, pcp.PMPOpMapTCP, 8080, 8080, time.Hour); r.Result != pcp.PMPSuccess {
				t.Fatalf("NAT-PMP map: %v", r.Result)
			}
			aHoles := func() []string {
				var out []string
				for p := range h.fw.Holes() {
					if p.InternalAddr == addrA || p.InternalAddr == v4A {
						out = append(out, p.String())
					}
				}
				return out
			}
			if n := len(aHoles()); n != 2 {
				t.Fatalf("A's pinholes before: %d, want 2", n)
			}
			own.mu.Lock()
			own.owners["wg:C"] = own.owners["wg:A"]
			delete(own.owners, "wg:A")
			own.mu.Unlock()
			h.st.FailCommit = func([]store.Lease, []store.Key) error { return servertest.ErrInjected }
			sweep.run(h.s)

			if left := aHoles(); len(left) != 0 {
				t.Errorf("after the sweep with the store failing, the kernel still holds A's pinholes into C's addresses: %v", left)
			}
			for _, l := range h.s.Leases() {
				if l.Owner == "wg:A" {
					t.Errorf("after the sweep, A still holds %v:%d", l.InternalAddr, l.InternalPort)
				}
			}
			if _, ok := h.fw.Holes()[hole(6, addrB, 443, addrB, 443)]; !ok {
				t.Errorf("B's pinhole, still owned, is gone")
			}
			if t.Failed() {
				return
			}
			// The store takes writes again: the debt is written.
			h.st.FailCommit = nil
			h.s.payStoreDebt()
			for k := range h.st.Leases() {
				if k.Owner == "wg:A" {
					t.Errorf("store still holds A's revoked lease %v once it takes writes", k)
				}
			}
		})
	}
}
