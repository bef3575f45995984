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

// ownerALeases returns n MAP leases of ownerA, one an address of
// 2001:db8:a::/48 (port 22), live for an hour from now.
func ownerALeases(now time.Time, n int) []store.Lease {
	ls := make([]store.Lease, n)
	for i := range ls {
		a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0xa, 0, 0, 0, 0, 0, 0, 0, 1, byte(i >> 8), byte(i)})
		ls[i] = store.Lease{
			Key:          store.Key{Owner: ownerA, Protocol: 6, InternalAddr: a, InternalPort: 22},
			ExternalAddr: a, ExternalPort: 22, ClientAddr: netip.AddrPortFrom(a, 5350), ServerAddr: local6,
			Created: now, Expires: now.Add(time.Hour), Kind: store.KindMap, Nonce: [12]byte{byte(i)},
		}
	}
	return ls
}

// unownedLeases stores n leases of ownerA (ownerALeases) and starts the
// server on them; the caller then takes the prefix from ownerA.
func unownedLeases(h *harness, n int) *mutableOwnership {
	h.t.Helper()
	ls := ownerALeases(h.clock.Now(), n)
	if err := h.st.Commit(ls, nil); err != nil {
		h.t.Fatal(err)
	}
	own := &mutableOwnership{owners: map[policy.OwnerID][]netip.Prefix{
		ownerA: {netip.MustParsePrefix("2001:db8:a::/48")},
		ownerB: {netip.MustParsePrefix("2001:db8:b::/48")},
	}}
	h.own = own
	h.start()
	if got := h.s.tab.len(); got != n {
		h.t.Fatalf("%d leases restored, want %d", got, n)
	}
	return own
}

// TestRevokeSweepOwesStoreOnce (review h/revh6, issue 9): the full
// ownership sweep ends the unowned leases revokeChunk at a time, one
// transaction each. With the store refusing writes (h/hunt6: the kernel
// deletes stand, the keys are owed), every chunk's commit carried every
// key owed before it (tx.changes adds the debt) and tried the store again:
// the sweep handed the refusing store O(n²/revokeChunk) keys, each
// encoded (store.CommitQuar) under s.mu, and logged a warning a chunk. At
// 65 536 leases (the default --max-leases), 8.4 M keys; at 1 000 000,
// 2·10⁹. Once the store has refused and the debt is not paid, a revoking
// transaction does not try it again: its keys are owed at once, and
// housekeep's payStoreDebt (or the next request's commit) writes them.
func TestRevokeSweepOwesStoreOnce(t *testing.T) {
	const n = 20 * revokeChunk
	h := newHarness(t)
	own := unownedLeases(h, n)
	own.mu.Lock()
	delete(own.owners, ownerA)
	own.mu.Unlock()
	keys, commits := 0, 0
	h.st.FailCommit = func(put []store.Lease, del []store.Key) error {
		keys += len(put) + len(del)
		commits++
		return servertest.ErrInjected
	}
	off := h.logs.Len()
	h.s.sweepOwnership()
	if got := h.s.tab.len(); got != 0 {
		t.Fatalf("%d leases left in the table after the sweep, want 0", got)
	}
	if got := len(h.fw.Holes()); got != 0 {
		t.Fatalf("%d pinholes left in the kernel after the sweep, want 0", got)
	}
	if keys > n {
		t.Errorf("the sweep of %d unowned leases with the store refusing handed it %d keys in %d commits (each chunk's commit carried every key owed before it), want at most %d",
			n, keys, commits, n)
	}
	warns := 0
	for _, e := range h.logs.All()[off:] {
		if e.Level >= 1 { // warn and above
			warns++
		}
	}
	if warns > 1 {
		t.Errorf("the sweep logged %d warnings (one a chunk), want 1", warns)
	}
	if got := len(h.s.storeDebt); got != n {
		t.Errorf("%d keys owed after the sweep, want %d", got, n)
	}
	// The store takes writes again: housekeep's retry writes the debt.
	h.st.FailCommit = nil
	h.s.payStoreDebt()
	if got := len(h.st.Leases()); got != 0 {
		t.Errorf("the store holds %d revoked leases once it takes writes again, want 0", got)
	}
	if got := len(h.s.storeDebt); got != 0 {
		t.Errorf("%d keys still owed after the store took the debt", got)
	}
}

// TestRevokeOwedThenNewOwnerSameEndpoint (review h/revh6, evidence: passes
// on h/hunt6's main): A's addresses go to C while the store refuses; the
// revocation is owed. C then maps the same internal endpoints A had (an
// IPv6 MAP, a NAT-PMP mapping of the same IPv4 address and port), once
// the store takes writes again, with or without a restart in between (the
// restart restores A's leases from the store, and its sweep revokes them
// again). The debt holds keys, not deletes, and a key names its owner: it
// is paid with the table's state, so it never deletes C's lease, and the
// store never holds A's lease beside C's on the same external port.
func TestRevokeOwedThenNewOwnerSameEndpoint(t *testing.T) {
	for _, restart := range []bool{false, true} {
		name := "no restart"
		if restart {
			name = "restart while owed"
		}
		t.Run(name, func(t *testing.T) {
			h := newHarness(t)
			own := &mutableOwnership{owners: map[policy.OwnerID][]netip.Prefix{
				"wg:A": {netip.MustParsePrefix("2001:db8:a::/48"), netip.MustParsePrefix("10.0.0.0/28")},
			}}
			h.own = own
			h.start()
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.Success)
			if r := h.pmp(v4A, pcp.PMPOpMapTCP, 8080, 8080, time.Hour); r.Result != pcp.PMPSuccess {
				t.Fatalf("NAT-PMP map: %v", r.Result)
			}
			own.mu.Lock()
			own.owners["wg:C"] = own.owners["wg:A"]
			delete(own.owners, "wg:A")
			own.mu.Unlock()
			h.st.FailCommit = func([]store.Lease, []store.Key) error { return servertest.ErrInjected }
			h.s.sweepOwnership()
			if restart {
				// The store still holds A's leases; since h/restore9
				// the start revokes them before installing any.
				h.start()
				if got := h.s.tab.len(); got != 0 {
					t.Fatalf("the restart kept %d of A's unowned leases, want 0 (revoked at start)", got)
				}
				h.s.sweepOwnership()
			}
			if got := h.s.tab.len(); got != 0 {
				t.Fatalf("%d leases in the table after the sweep, want 0", got)
			}
			h.st.FailCommit = nil
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 2)), pcp.Success)
			r := h.pmp(v4A, pcp.PMPOpMapTCP, 8080, 8080, time.Hour)
			if r.Result != pcp.PMPSuccess {
				t.Fatalf("C's NAT-PMP map: %v", r.Result)
			}
			h.s.payStoreDebt()
			check := func(when string) {
				t.Helper()
				owners := map[string]int{}
				ports := map[uint16]int{}
				for k, l := range h.st.Leases() {
					owners[k.Owner]++
					if l.ExternalAddr.Is4() {
						ports[l.ExternalPort]++
					}
				}
				if owners["wg:A"] != 0 || owners["wg:C"] != 2 {
					t.Errorf("%s: the store holds leases by owner %v, want C's 2 only", when, owners)
				}
				for p, c := range ports {
					if c > 1 {
						t.Errorf("%s: the store holds %d leases on external port %d", when, c, p)
					}
				}
				for _, l := range h.s.Leases() {
					if l.Owner != "wg:C" {
						t.Errorf("%s: the table holds %s's lease %v:%d", when, l.Owner, l.InternalAddr, l.InternalPort)
					}
				}
				if _, ok := h.fw.Holes()[hole(6, addrA, 443, addrA, 443)]; !ok {
					t.Errorf("%s: C's IPv6 pinhole is not in the kernel", when)
				}
				if got := len(h.fw.Holes()); got != 2 {
					t.Errorf("%s: %d pinholes in the kernel, want C's 2: %v", when, got, h.fw.Holes())
				}
			}
			check("after C mapped")
			h.start()
			h.s.sweepOwnership()
			check("after a restart")
		})
	}
}

// BenchmarkRevokeSweepStoreRefusing: the full ownership sweep of 65 536
// unowned leases (the default --max-leases) while the store refuses every
// write (fake store: the cost is the engine's, building each commit, not
// the encoding the real store adds). keys/op is what the sweep handed the
// store (TestRevokeSweepOwesStoreOnce).
func BenchmarkRevokeSweepStoreRefusing(b *testing.B) {
	const n = 65536
	keys := 0
	for b.Loop() {
		b.StopTimer()
		h := newHarness(b)
		own := unownedLeases(h, n)
		own.mu.Lock()
		delete(own.owners, ownerA)
		own.mu.Unlock()
		h.st.FailCommit = func(put []store.Lease, del []store.Key) error {
			keys += len(put) + len(del)
			return servertest.ErrInjected
		}
		b.StartTimer()
		h.s.sweepOwnership()
	}
	b.ReportMetric(float64(keys)/float64(b.N), "keys/op")
}
