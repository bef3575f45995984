package server

import (
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// TestRestartDropsLeasesOfDisabledOpcode: Start revokes the restored
// leases the port, protocol and address rules refuse now
// (restore_policy.go), because their renewals are refused and keeping
// their pinholes keeps open what the operator has just closed. A restart
// with --disable-map, --disable-peer or --disable-natpmp is the same case
// (MAP-23, PEER-08: renewals answered NOT_AUTHORIZED; NAT-PMP not
// answered at all), but those leases keep their pinholes until they
// expire (an hour here, 24 h by default, up to 365 days).
func TestRestartDropsLeasesOfDisabledOpcode(t *testing.T) {
	for _, tc := range []struct {
		name    string
		make    func(h *harness)
		disable func(c *Config)
	}{
		{"disable-map", func(h *harness) { h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.Success) },
			func(c *Config) { c.DisableMap = true }},
		{"disable-peer", func(h *harness) {
			h.expect(h.do(peerReq(addrA, pcp.ProtoTCP, 443, remote, time.Hour, 1)), pcp.Success)
		}, func(c *Config) { c.DisablePeer = true }},
		{"disable-natpmp", func(h *harness) {
			if r := h.pmp(v4A, pcp.PMPOpMapTCP, 8080, 8080, time.Hour); r.Result != 0 {
				t.Fatalf("NAT-PMP map: %+v", r)
			}
		}, func(c *Config) { c.DisableNATPMP = true }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t)
			tc.make(h)
			if len(h.fw.Holes()) == 0 {
				t.Fatal("no pinhole")
			}
			tc.disable(&h.cfg)
			h.start()
			h.s.sweepOwnership()
			if hs := h.fw.Holes(); len(hs) != 0 {
				t.Fatalf("after a restart with --%s, the opcode's lease keeps its pinhole %v; leases %v", tc.name, hs, h.s.Leases())
			}
		})
	}
}
