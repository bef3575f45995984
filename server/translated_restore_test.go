package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// TestRestartRevokesTranslatedTargets (h/pol64): a lease whose address is
// inside an IPv6-to-IPv4 translation prefix opened, through the
// translator, someone else's IPv4 host. One stored before such targets
// became never openable (a pcpd of an earlier version granted MAPs to
// 64:ff9b::/96 for a client given that prefix), or before the operator
// named the network's own prefix (--nat64-prefix), must not survive a
// restart until its expiry: Start revokes it (pinhole, store, log with
// reason never-openable), and keeps the client's other lease.
func TestRestartRevokesTranslatedTargets(t *testing.T) {
	own := func(t *testing.T) policy.Ownership {
		st, err := policy.NewStatic(map[string][]netip.Prefix{
			"a": {netip.MustParsePrefix("2001:db8:a::/48"), netip.MustParsePrefix("64:ff9b::/96"), netip.MustParsePrefix("64:ff9b:1::/48")},
		})
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	nsp := netip.MustParsePrefix("2001:db8:a:64::/96")
	for _, tc := range []struct {
		name   string
		target netip.Addr
		nsp    bool // the operator names nsp at the restart
	}{
		{"well-known prefix, stored by an older pcpd", netip.MustParseAddr("64:ff9b::a00:2"), false},
		{"local-use prefix, stored by an older pcpd", netip.MustParseAddr("64:ff9b:1::a00:2"), false},
		{"--nat64-prefix named at the restart", netip.MustParseAddr("2001:db8:a:64::a00:2"), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			h.own = own(t)
			h.start()
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.Success)
			if tc.nsp {
				// Granted: no prefix named yet.
				h.expect(h.do(mapReq(tc.target, pcp.ProtoTCP, 22, 0, time.Hour, 2)), pcp.Success)
				h.pcfg.TranslationPrefixes = []netip.Prefix{nsp}
			} else {
				// Refused now (policy: never openable); the stored lease
				// is what an earlier version granted and wrote: the
				// client's lease, moved to the translated address.
				h.expect(h.do(mapReq(tc.target, pcp.ProtoTCP, 22, 0, time.Hour, 2)), pcp.NotAuthorized)
				l, ok := h.lease("static:a", 6, addrA, 443)
				if !ok {
					t.Fatalf("no lease for %v: %v", addrA, h.st.Leases())
				}
				l.InternalAddr, l.ExternalAddr, l.InternalPort, l.ExternalPort = tc.target, tc.target, 22, 22
				if err := h.st.Commit([]store.Lease{l}, nil); err != nil {
					t.Fatal(err)
				}
			}
			h.start()
			h.s.sweepOwnership()
			for k := range h.st.Leases() {
				if k.InternalAddr == tc.target {
					t.Errorf("the lease of %v stays in the store after the restart", tc.target)
				}
			}
			if ls := h.s.Leases(); len(ls) != 1 || ls[0].InternalAddr != addrA {
				t.Errorf("leases after the restart %+v, want %v's alone", ls, addrA)
			}
			hs := h.fw.Holes()
			if _, ok := hs[hole(6, addrA, 443, addrA, 443)]; !ok || len(hs) != 1 {
				t.Errorf("pinholes after the restart %v, want %v:443's alone (none to %v)", hs, addrA, tc.target)
			}
			revoked := h.logs.FilterMessage("revoked at start: the rules refuse this lease now").All()
			if len(revoked) != 1 || revoked[0].ContextMap()["reason"] != policy.NeverOpenable.String() {
				t.Errorf("revocation log %v, want one with reason %v", revoked, policy.NeverOpenable)
			}
			// And a renewal now is refused.
			h.expect(h.do(mapReq(tc.target, pcp.ProtoTCP, 22, 0, time.Hour, 2)), pcp.NotAuthorized)
		})
	}
}
