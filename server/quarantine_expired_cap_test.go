package server

import (
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestMAP22CapSkipsExpiredQuarantine: a client's quarantined IPv4 ports
// are capped at its lease quota (quarantine.go), but an expired entry is
// only removed when a request probes its endpoint (usable), so it still
// counts against the cap. With UDP's 2 minutes beside TCP's 124, the cap
// then releases a live TCP quarantine, the one freed first, while an
// expired UDP entry that protects nothing keeps its place: another client
// gets, minutes after, the port A freed, although A holds no more live
// quarantined ports than its quota.
func TestMAP22CapSkipsExpiredQuarantine(t *testing.T) {
	h := newHarness(t, func(c *Config, p *policy.Config) {
		c.IPv4Ports = PortRange{First: 40000, Last: 40007}
		p.MaxLeasesPerClient = 2
	})
	for _, step := range []struct {
		proto   pcp.Protocol
		port    uint16
		ext     uint16
		advance time.Duration // after the delete
	}{
		{pcp.ProtoTCP, 5000, 40000, time.Second},
		{pcp.ProtoUDP, 6000, 40001, 3 * time.Minute}, // UDP's quarantine ends (2 min)
		{pcp.ProtoTCP, 5001, 40002, time.Second},
	} {
		if r := h.do(mapReq(v4A, step.proto, step.port, step.ext, time.Hour, 1)); r.Result != pcp.Success || r.Map.ExternalPort != step.ext {
			t.Fatalf("A maps %v %d: %v port %d, want %d", step.proto, step.port, r.Result, r.Map.ExternalPort, step.ext)
		}
		h.expect(h.do(mapReq(v4A, step.proto, step.port, 0, 0, 1)), pcp.Success)
		h.clock.Advance(step.advance)
	}
	// A's live quarantined ports: TCP 40000 (freed 3 min ago, 121 min to
	// go) and TCP 40002: two, its quota.
	if r := h.do(mapReq(v4B, pcp.ProtoTCP, 90, 40000, time.Hour, 2)); r.Result == pcp.Success && r.Map.ExternalPort == 40000 {
		t.Fatalf("B got TCP 40000, which A freed 3 minutes ago (MAP-22: 124 min) while holding only 2 live quarantined ports (quota 2): the cap counted A's expired UDP 40001")
	}
}
