package server

import (
	"context"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// TestRevokeOpenings (h/opsleft): Revoke by openings (pcpd revoke
// PROTO/ADDR/PORT, found by the engine a step at a time instead of from a
// copy of every lease) ends every lease on one of them, MAP and PEER
// alike, an IPv4 address named 4in6 too, and nothing else: not another
// protocol, port or address.
func TestRevokeOpenings(t *testing.T) {
	h := newHarness(t)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 80, 0, time.Hour, 1)), pcp.Success)
	h.expect(h.do(peerReq(addrA, pcp.ProtoTCP, 80, remote, time.Hour, 2)), pcp.Success)
	h.expect(h.do(mapReq(addrA, pcp.ProtoUDP, 80, 0, time.Hour, 3)), pcp.Success)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 81, 0, time.Hour, 4)), pcp.Success)
	h.expect(h.do(mapReq(addrB, pcp.ProtoTCP, 80, 0, time.Hour, 5)), pcp.Success)
	h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, 80, 0, time.Hour, 6)), pcp.Success)
	h.expect(h.do(mapReq(v4A2, pcp.ProtoTCP, 80, 0, time.Hour, 7)), pcp.Success)
	if n := len(h.st.Leases()); n != 7 {
		t.Fatalf("%d leases, want 7", n)
	}
	got, err := h.s.Revoke(context.Background(), RevokeFilter{Opens: []Opening{
		{Protocol: 6, InternalAddr: addrA, InternalPort: 80},
		{Protocol: 6, InternalAddr: netip.AddrFrom16(v4A.As16()), InternalPort: 80},
	}})
	if got != 3 || err != nil {
		t.Fatalf("Revoke: %d, %v; want 3 (MAP and PEER on tcp/%s/80, MAP on tcp/%s/80)", got, err, addrA, v4A)
	}
	var left []Opening
	for _, l := range h.s.Leases() {
		left = append(left, Opening{Protocol: l.Protocol, InternalAddr: l.InternalAddr, InternalPort: l.InternalPort})
	}
	want := []Opening{{6, v4A2, 80}, {6, addrA, 81}, {17, addrA, 80}, {6, addrB, 80}}
	if len(left) != len(want) || len(h.st.Leases()) != len(want) || len(h.fw.Holes()) != len(want) {
		t.Fatalf("left %v (%d stored, %d pinholes); want %v", left, len(h.st.Leases()), len(h.fw.Holes()), want)
	}
	for _, w := range want {
		if !slices.Contains(left, w) {
			t.Errorf("%v revoked; left %v", w, left)
		}
	}
}
