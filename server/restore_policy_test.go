package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestRestartDropsLeasesPolicyRefuses: after a restart with rules that
// refuse a live lease (a port now in --deny-ports, all-ports mappings no
// longer allowed, the address now one of the host's own, which is never
// openable), the lease must not stay in the kernel: a renewal of it is
// refused, so keeping its pinhole keeps open, for up to the maximum
// lifetime (24 h by default), what the operator has just closed. Start and
// an ownership sweep are given their chance.
func TestRestartDropsLeasesPolicyRefuses(t *testing.T) {
	for _, tc := range []struct {
		name   string
		port   uint16
		before func(*policy.Config)
		after  func(*policy.Config)
	}{
		{name: "deny-ports 22", port: 22, after: func(p *policy.Config) { p.DenyPorts = []policy.PortRange{{First: 22, Last: 22}} }},
		{name: "allow-all-ports off", port: 0, before: func(p *policy.Config) { p.AllowAllPorts = true }, after: func(p *policy.Config) { p.AllowAllPorts = false }},
		{name: "host address", port: 22, after: func(p *policy.Config) { p.HostAddrs = func(a netip.Addr) bool { return a == addrA } }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(_ *Config, p *policy.Config) {
				if tc.before != nil {
					tc.before(p)
				}
			})
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, tc.port, 0, time.Hour, 1)), pcp.Success)
			if len(h.fw.Holes()) != 1 {
				t.Fatalf("pinholes %v", h.fw.Holes())
			}
			tc.after(&h.pcfg)
			h.start()
			h.s.sweepOwnership()
			// What the new rules answer a renewal of that lease:
			renew := h.do(mapReq(addrA, pcp.ProtoTCP, tc.port, 0, time.Hour, 1))
			if renew.Result == pcp.Success {
				t.Fatalf("renewal granted under the new rules: not a refusing rule")
			}
			if hs := h.fw.Holes(); len(hs) != 0 {
				t.Fatalf("renewal refused (%v) but the pinhole stays in the kernel: %v; leases %v", renew.Result, hs, h.s.Leases())
			}
		})
	}
}

// TestRestartDropsLeasesPolicyRefusesBound: the same with ownership bound
// to interfaces, as WireGuard's: a restored lease has no arrival
// interface, and judged by Authorize without one its source was nobody's
// (NoOwner, left to the sweep), so the new rules were never applied to a
// WireGuard client's leases. The sweep, which looks owners up without an
// interface, must keep the lease the rules still allow.
func TestRestartDropsLeasesPolicyRefusesBound(t *testing.T) {
	st, err := policy.NewStatic(map[string][]netip.Prefix{"a": {netip.MustParsePrefix("2001:db8:a::/48")}})
	if err != nil {
		t.Fatal(err)
	}
	h := newHarness(t)
	h.own = boundOwnership{own: st, on: map[policy.OwnerID]string{"static:a": "wg0"}}
	h.start()
	for _, port := range []uint16{22, 443} {
		b := pcp.AppendRequest(nil, mapReq(addrA, pcp.ProtoTCP, port, 0, time.Hour, 1))
		out := h.s.HandleBatch([]Request{{Local: local6, Source: netip.AddrPortFrom(addrA, 40000), Iface: "wg0", Data: b}})[0]
		var r pcp.Response
		if err := pcp.ParseResponse(out, &r); err != nil || r.Result != pcp.Success {
			t.Fatalf("MAP %d on wg0: %v %v", port, r.Result, err)
		}
	}
	h.pcfg.DenyPorts = []policy.PortRange{{First: 22, Last: 22}}
	h.start()
	h.s.sweepOwnership()
	hs := h.fw.Holes()
	if _, ok := hs[hole(6, addrA, 22, addrA, 22)]; ok {
		t.Errorf("port 22 denied after the restart, but its pinhole stays: %v", hs)
	}
	if _, ok := hs[hole(6, addrA, 443, addrA, 443)]; !ok || len(hs) != 1 {
		t.Errorf("pinholes %v, want 443's alone", hs)
	}
}
