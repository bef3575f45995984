package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestTranslatedSourceIsNobodys (review h/revp64): client a holds the
// NAT64 prefix 64:ff9b::/96 beside its /48 (an operator gave it the
// prefix, or it is the WireGuard peer that is the NAT64 gateway). A
// request from 64:ff9b::c633:6402 is 198.51.100.2's, an IPv4 host on the
// far side of the translator, not a's: a THIRD_PARTY MAP naming a's host,
// a THIRD_PARTY PEER, and a THIRD_PARTY delete of a's mapping are
// NOT_AUTHORIZED, and the kernel and the store stay as they were. Before:
// the MAP and the PEER were granted (pinholes to a's host:22 that the
// IPv4 host asked for) and the delete ended a's mapping.
func TestTranslatedSourceIsNobodys(t *testing.T) {
	xlat := netip.MustParseAddr("64:ff9b::c633:6402")
	open := mapReq(xlat, pcp.ProtoTCP, 22, 0, time.Hour, 2)
	open.Options.ThirdParty = addrA
	peer := peerReq(xlat, pcp.ProtoTCP, 22, netip.MustParseAddrPort("[2001:db8:99::1]:4000"), time.Hour, 3)
	peer.Options.ThirdParty = addrA
	del := mapReq(xlat, pcp.ProtoTCP, 443, 0, 0, 1)
	del.Options.ThirdParty = addrA
	for _, tc := range []struct {
		name string
		r    *pcp.Request
	}{{"THIRD_PARTY MAP", open}, {"THIRD_PARTY PEER", peer}, {"THIRD_PARTY delete", del}} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			st, err := policy.NewStatic(map[string][]netip.Prefix{
				"a": {netip.MustParsePrefix("2001:db8:a::/48"), netip.MustParsePrefix("64:ff9b::/96")},
			})
			if err != nil {
				t.Fatal(err)
			}
			h.own = st
			h.start()
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.Success) // a's own
			before := h.snap()
			if got := h.do(tc.r).Result; got != pcp.NotAuthorized {
				t.Errorf("%s from %v naming %v: %v, want NOT_AUTHORIZED", tc.name, xlat, addrA, got)
			}
			if hs := h.fw.Holes(); len(hs) != 1 {
				t.Errorf("kernel pinholes %v, want a's :443 alone", hs)
			}
			h.unchanged(before)
		})
	}
}
