package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestRestartKeepsLeasesRulesAllow guards restore_policy.go's re-check
// from the other side: after a restart with rules that still grant them
// (here --allow-all-ports on, third party owned, the host's own address
// one no lease uses), every
// kind of lease stays, with its pinholes: a THIRD_PARTY MAP sent from
// another address of the owner, a MAP with FILTERs, a PEER, a NAT-PMP
// mapping, an IPv4 PCP MAP, a TCP all-ports MAP. Passes on main.
func TestRestartKeepsLeasesRulesAllow(t *testing.T) {
	rules := func(_ *Config, p *policy.Config) {
		p.AllowAllPorts = true
		p.HostAddrs = func(a netip.Addr) bool { return a == netip.MustParseAddr("2001:db8:a::1") }
	}
	h := newHarness(t, rules)
	tp := mapReq(addrA2, pcp.ProtoTCP, 80, 0, time.Hour, 1)
	tp.Options.ThirdParty = addrA
	h.expect(h.doFrom(addrA2, tp), pcp.Success)
	filtered := mapReq(addrA, pcp.ProtoUDP, 443, 0, time.Hour, 2)
	filtered.Options.Filters = []pcp.Filter{{Remote: netip.MustParsePrefix("2001:db8:99::/48")}}
	h.expect(h.do(filtered), pcp.Success)
	h.expect(h.do(peerReq(addrA, pcp.ProtoTCP, 8443, remote, time.Hour, 3)), pcp.Success)
	if r := h.pmp(v4A, pcp.PMPOpMapTCP, 8080, 8080, time.Hour); r.Result != 0 {
		t.Fatalf("NAT-PMP map: %+v", r)
	}
	h.expect(h.do(mapReq(v4A2, pcp.ProtoUDP, 5000, 0, time.Hour, 4)), pcp.Success)
	h.expect(h.do(mapReq(addrB, pcp.ProtoTCP, 0, 0, time.Hour, 5)), pcp.Success)
	leases, holes := len(h.s.Leases()), h.fw.Holes()
	h.start()
	h.s.sweepOwnership()
	if got := len(h.s.Leases()); got != leases {
		t.Fatalf("%d of %d leases left after a restart with the same rules: %v", got, leases, h.s.Leases())
	}
	if got := h.fw.Holes(); len(got) != len(holes) {
		t.Fatalf("pinholes %v after the restart, %v before", got, holes)
	}
}
