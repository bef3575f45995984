package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// TestHandleDropsMappedSource (h/pol64): the in-process API drops an
// IPv4-mapped source (::ffff:10.0.0.5) as the network path does
// (sockaddrPort, TestE2EMappedSourceIsNotIPv4Owner), counted as
// dropped{reason="bad-source"}; it unmapped it, and served the request
// as the IPv4 address's owner's: a PCP MAP and a NAT-PMP mapping for
// client a's 10.0.0.5, a NAT-PMP delete-all of a's mappings. Nothing is
// answered, and a's own mapping and the firewall stay as they were.
func TestHandleDropsMappedSource(t *testing.T) {
	h := newHarness(t)
	v4 := netip.MustParseAddr("10.0.0.5")
	h.expect(h.do(mapReq(v4, pcp.ProtoTCP, 2223, 0, time.Hour, 1)), pcp.Success) // a's own, from 10.0.0.5
	before := h.snap()
	mapped := netip.AddrPortFrom(netip.AddrFrom16(v4.As16()), 40000)
	reqs := []struct {
		name string
		b    []byte
	}{
		{"PCP MAP", pcp.AppendRequest(nil, mapReq(v4, pcp.ProtoTCP, 2222, 0, time.Hour, 7))},
		{"PCP PEER", pcp.AppendRequest(nil, peerReq(v4, pcp.ProtoTCP, 2225, netip.MustParseAddrPort("192.0.2.80:80"), time.Hour, 8))},
		{"PCP MAP delete", pcp.AppendRequest(nil, mapReq(v4, pcp.ProtoTCP, 2223, 0, 0, 1))},
		{"PCP ANNOUNCE", pcp.AppendRequest(nil, pcp.NewAnnounce(v4))},
		{"NAT-PMP map", pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: pcp.PMPOpMapTCP, InternalPort: 2222, SuggestedExternalPort: 2224, Lifetime: time.Hour})},
		{"NAT-PMP delete all TCP", pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: pcp.PMPOpMapTCP})},
	}
	for _, local := range []netip.AddrPort{local6, local4} {
		for _, r := range reqs {
			if out := h.s.Handle(local, mapped, r.b); out != nil {
				t.Errorf("%s from %v to %v answered: % x", r.name, mapped, local, out[:min(len(out), 4)])
			}
			h.unchanged(before)
		}
	}
	// And in a batch, beside a request that is served.
	b := pcp.AppendRequest(nil, mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 2))
	outs := h.s.HandleBatch([]Request{
		{Local: local6, Source: mapped, Data: reqs[0].b},
		{Local: local6, Source: netip.AddrPortFrom(addrA, 40000), Data: b},
	})
	if outs[0] != nil || outs[1] == nil {
		t.Errorf("batch replies %v %v, want none to %v and one to %v", outs[0] != nil, outs[1] != nil, mapped, addrA)
	}
	if _, ok := h.lease("static:a", 6, v4, 2222); ok {
		t.Errorf("a lease for %v:2222 from %v", v4, mapped)
	}
	if n := counterValue(t, h.s.m.dropped.WithLabelValues("bad-source")); n != float64(2*len(reqs)+1) {
		t.Errorf("dropped{reason=\"bad-source\"} %v, want %d", n, 2*len(reqs)+1)
	}
}
