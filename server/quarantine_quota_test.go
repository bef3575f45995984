package server

import (
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestMAP22QuarantineWithinQuota: MAP-22 keeps a freed IPv4 external port
// for its last holder for the idle time (124 min for TCP), and MAP-15
// bounds what one client may hold. Together they must not let one client,
// never over its quota, take every external port from the others: here a
// client with a quota of 2 maps and deletes one port at a time (NAT-PMP
// can free its whole quota with one "delete all" request) and walks the
// 8-port pool; another client, holding nothing, must still get a port.
// At the defaults (64 512 ports, 50 requests/s per source) the walk takes
// about 22 minutes and holds every TCP port for two hours.
func TestMAP22QuarantineWithinQuota(t *testing.T) {
	h := newHarness(t, func(c *Config, p *policy.Config) {
		c.IPv4Ports = PortRange{First: 40000, Last: 40007}
		p.MaxLeasesPerClient = 2
	})
	for i := range uint16(8) {
		h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, 5000+i, 40000+i, time.Hour, 1)), pcp.Success)
		h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, 5000+i, 0, 0, 1)), pcp.Success)
		h.clock.Advance(time.Second)
	}
	if n := len(h.st.Leases()); n != 0 {
		t.Fatalf("%d leases left", n)
	}
	resp := h.do(mapReq(v4B, pcp.ProtoTCP, 80, 0, time.Hour, 2))
	if resp.Result != pcp.Success {
		t.Fatalf("client B, holding nothing, refused %v: client A (quota 2, holding nothing) keeps all 8 ports quarantined", resp.Result)
	}
}
