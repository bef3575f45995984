package server

import (
	"maps"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
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

// TestMAP22QuarantineCapKeepsNewest: with a client's quarantined ports
// capped at its quota (quarantine.go), MAP-22 still does its job for the
// ports it freed last: another client does not get them, the client
// itself gets them back; the port freed before those is released first.
// A failed delete (firewall refuses, rolled back) leaves the quarantine
// as it was. After each step, quarBy lists exactly quar's endpoints.
func TestMAP22QuarantineCapKeepsNewest(t *testing.T) {
	h := newHarness(t, func(c *Config, p *policy.Config) {
		c.IPv4Ports = PortRange{First: 40000, Last: 40007}
		p.MaxLeasesPerClient = 2
	})
	check := func(step string, want map[uint16]string) {
		t.Helper()
		n := 0
		for o, es := range h.s.quarBy {
			for _, e := range es {
				if q, ok := h.s.quar[e]; !ok || q.owner != o {
					t.Fatalf("%s: quarBy[%s] lists %v, quar has %+v", step, o, e, q)
				}
			}
			n += len(es)
		}
		if n != len(h.s.quar) {
			t.Fatalf("%s: quarBy lists %d endpoints, quar holds %d", step, n, len(h.s.quar))
		}
		got := map[uint16]string{}
		for e, q := range h.s.quar {
			got[e.port] = q.owner
		}
		if !maps.Equal(got, want) {
			t.Fatalf("%s: quarantined %v, want %v", step, got, want)
		}
	}
	mapA := func(port, ext uint16, life time.Duration) pcp.Response {
		return h.do(mapReq(v4A, pcp.ProtoTCP, port, ext, life, 1))
	}
	for i := range uint16(2) {
		if r := mapA(5000+i, 40000+i, time.Hour); r.Result != pcp.Success || r.Map.ExternalPort != 40000+i {
			t.Fatalf("A maps %d: %v %d", 5000+i, r.Result, r.Map.ExternalPort)
		}
	}
	h.expect(mapA(5000, 0, 0), pcp.Success)
	h.expect(mapA(5001, 0, 0), pcp.Success)
	check("A deleted its quota", map[uint16]string{40000: ownerA, 40001: ownerA})
	var bPorts [2]uint16
	for i := range uint16(2) {
		r := h.do(mapReq(v4B, pcp.ProtoTCP, 80+i, 40000+i, time.Hour, 2))
		if r.Result != pcp.Success || r.Map.ExternalPort == 40000 || r.Map.ExternalPort == 40001 {
			t.Fatalf("B asking %d: %v port %d (quarantined for A)", 40000+i, r.Result, r.Map.ExternalPort)
		}
		bPorts[i] = r.Map.ExternalPort
		h.expect(h.do(mapReq(v4B, pcp.ProtoTCP, 80+i, 0, 0, 2)), pcp.Success)
	}
	b := map[uint16]string{bPorts[0]: ownerB, bPorts[1]: ownerB}
	with := func(m map[uint16]string) map[uint16]string {
		maps.Copy(m, b)
		return m
	}
	for i := range uint16(2) {
		if r := mapA(5000+i, 0, time.Hour); r.Result != pcp.Success || r.Map.ExternalPort != 40000+i {
			t.Fatalf("A re-maps %d: %v port %d, want its %d back", 5000+i, r.Result, r.Map.ExternalPort, 40000+i)
		}
	}
	check("A took its ports back", with(map[uint16]string{}))
	h.expect(mapA(5000, 0, 0), pcp.Success)
	// A delete the firewall refuses is rolled back: 40001 stays A's lease,
	// and the quarantine is as before.
	h.fw.FailApply = func([]pinhole.Op) error { return servertest.ErrInjected }
	if r := mapA(5001, 0, 0); r.Result == pcp.Success {
		t.Fatal("delete succeeded with the firewall failing")
	}
	h.fw.FailApply = nil
	check("failed delete", with(map[uint16]string{40000: ownerA}))
	h.expect(mapA(5001, 0, 0), pcp.Success)
	h.clock.Advance(time.Second)
	r := mapA(5002, 0, time.Hour)
	h.expect(r, pcp.Success)
	h.expect(mapA(5002, 0, 0), pcp.Success)
	check("A freed a third port", with(map[uint16]string{40001: ownerA, r.Map.ExternalPort: ownerA}))
	if r := h.do(mapReq(v4B, pcp.ProtoTCP, 90, 40000, time.Hour, 3)); r.Result != pcp.Success || r.Map.ExternalPort != 40000 {
		t.Fatalf("B asking A's oldest quarantined port: %v port %d, want 40000 (released)", r.Result, r.Map.ExternalPort)
	}
}
