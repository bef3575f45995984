package server

import (
	"maps"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// storedQuar is the store's quarantines as the engine holds them.
func storedQuar(h *harness) map[endpoint]quarantine {
	out := map[endpoint]quarantine{}
	for _, q := range h.st.Quarantines() {
		out[endpoint{addr: q.Addr, proto: q.Protocol, port: q.Port}] = quarantine{owner: q.Owner, addr: q.InternalAddr, port: q.InternalPort, nonce: q.Nonce, until: q.Until}
	}
	return out
}

// mirrored fails unless the store holds exactly the engine's quarantines.
func mirrored(t *testing.T, h *harness, step string) {
	t.Helper()
	got := storedQuar(h)
	eq := func(a, b quarantine) bool {
		return a.owner == b.owner && a.addr == b.addr && a.port == b.port && a.nonce == b.nonce && a.until.Equal(b.until)
	}
	if !maps.EqualFunc(got, h.s.quar, eq) {
		t.Fatalf("%s: store holds quarantines %v, engine %v", step, got, h.s.quar)
	}
}

func quarPorts(s *Server) map[uint16]bool {
	out := map[uint16]bool{}
	for e := range s.quar {
		out[e.port] = true
	}
	return out
}

// TestMAP22QuarantineRestart: a freed port's quarantine (MAP-22) is in
// the store from the commit that freed it (the store mirrors the engine's
// quarantines after every step), and a restart brings back exactly those
// that still hold: not the ones that ended while pcpd was down, not those
// on an external address that is no longer ours, and no more per client
// than its quota (TestMAP22QuarantineWithinQuota's bound), also when the
// quota was lowered meanwhile. What restore drops leaves the store too.
func TestMAP22QuarantineRestart(t *testing.T) {
	for _, tc := range []struct {
		name string
		down func(h *harness) // while pcpd is down
		want map[uint16]bool  // quarantined ports after the restart
	}{
		{"restarted", func(*harness) {}, map[uint16]bool{40000: true, 40001: true, 40002: true}},
		{"quota lowered: the newest kept", func(h *harness) { h.pcfg.MaxLeasesPerClient = 2 }, map[uint16]bool{40001: true, 40002: true}},
		{"ended while down", func(h *harness) { h.clock.Advance(125 * time.Minute) }, map[uint16]bool{}},
		{"external address changed", func(h *harness) { h.cfg.ExternalIPv4 = netip.MustParseAddr("198.51.100.2") }, map[uint16]bool{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(c *Config, p *policy.Config) {
				c.IPv4Ports = PortRange{First: 40000, Last: 40007}
				p.MaxLeasesPerClient = 3
			})
			for i := range uint16(3) {
				h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, 5000+i, 40000+i, time.Hour, 1)), pcp.Success)
				mirrored(t, h, "mapped")
				h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, 5000+i, 0, 0, 1)), pcp.Success)
				mirrored(t, h, "deleted")
				h.clock.Advance(time.Second)
			}
			tc.down(h)
			h.start()
			if got := quarPorts(h.s); !maps.Equal(got, tc.want) {
				t.Fatalf("quarantined after the restart: %v, want %v", got, tc.want)
			}
			mirrored(t, h, "restarted")
			// Another client asks for each of them: none is handed out.
			for p := range tc.want {
				r := h.do(mapReq(v4B, pcp.ProtoTCP, 80, p, time.Hour, 2))
				if r.Result == pcp.Success && r.Map.ExternalPort == p {
					t.Fatalf("MAP-22: quarantined port %d handed to client B after a restart", p)
				}
				h.expect(h.do(mapReq(v4B, pcp.ProtoTCP, 80, 0, 0, 2)), pcp.Success)
			}
			// Its last holder gets it back, and it leaves the quarantine.
			for p := range tc.want {
				r := h.do(mapReq(v4A, pcp.ProtoTCP, 5000+p-40000, p, time.Hour, 1))
				if r.Result != pcp.Success || r.Map.ExternalPort != p {
					t.Fatalf("last holder re-maps %d: %v, external %d", p, r.Result, r.Map.ExternalPort)
				}
			}
			mirrored(t, h, "taken back")
		})
	}
}

// TestMAP22QuarantineChurnStoreBounded: a client mapping and deleting one
// port after another, again and again, leaves the store with no more
// quarantines than the engine holds (its cap), however long it goes on:
// ended quarantines leave the store with the commit that ends them.
func TestMAP22QuarantineChurnStoreBounded(t *testing.T) {
	h := newHarness(t, func(c *Config, p *policy.Config) {
		c.IPv4Ports = PortRange{First: 40000, Last: 40063}
		p.MaxLeasesPerClient = 4
	})
	for i := range 1000 {
		port := uint16(5000 + i%200)
		h.expect(h.do(mapReq(v4A, pcp.ProtoUDP, port, 0, time.Hour, 1)), pcp.Success)
		h.expect(h.do(mapReq(v4A, pcp.ProtoUDP, port, 0, 0, 1)), pcp.Success)
		h.clock.Advance(3 * time.Second) // UDP quarantines (2 min) end as it goes
		if n := len(h.st.Quarantines()); n > 4 {
			t.Fatalf("cycle %d: %d quarantines stored, cap 4", i, n)
		}
	}
	mirrored(t, h, "after 1000 cycles")
}

// TestMAP22QuarantineRebaseRestart: a wall-clock step moves the engine's
// quarantines with the lease times (clock.go rebase); the rewrite that
// follows writes them to the store too, so a restart after the step keeps
// a freed port for its holder for the rest of its idle time. Without the
// rewrite the stored end is in the old wall frame: a forward step of 3 h
// makes it look over at the restart, and the port goes to another client.
func TestMAP22QuarantineRebaseRestart(t *testing.T) {
	c := &stepClocks{}
	c.wall.Store(time.Date(2026, 12, 4, 20, 0, 0, 0, time.UTC).UnixNano())
	opt := func(cf *Config, p *policy.Config) { cf.IPv4Ports = PortRange{First: 40000, Last: 40007} }
	h := runClockHarness(t, c, opt)
	h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, 5000, 40000, time.Hour, 1)), pcp.Success)
	h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, 5000, 0, 0, 1)), pcp.Success)
	c.advance(time.Minute)
	c.step(3 * time.Hour)
	h.s.checkClock() // rebase and rewrite
	if h.s.rewriteAt != 0 {
		t.Fatal("rewrite not done in one step")
	}
	mirrored(t, h, "after the rebase")
	c.advance(time.Minute)
	// Restart on the stepped clock.
	h.startWith(c.deps, nil)
	r := h.do(mapReq(v4B, pcp.ProtoTCP, 80, 40000, time.Hour, 2))
	if r.Result == pcp.Success && r.Map.ExternalPort == 40000 {
		t.Fatal("MAP-22: port freed 2 min before (running time) handed to another client after a wall step and a restart")
	}
}

// TestMAP22QuarantineHeldPortDropped: a stored quarantine on a port a
// stored lease holds (a store written by a version that did not end
// quarantines on re-use) is dropped at restore, from the store too; one
// whose port is free is kept.
func TestMAP22QuarantineHeldPortDropped(t *testing.T) {
	h := newHarness(t, func(c *Config, p *policy.Config) { c.IPv4Ports = PortRange{First: 40000, Last: 40007} })
	h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, 5000, 40000, time.Hour, 1)), pcp.Success)
	until := h.clock.Now().Add(time.Hour)
	q := func(port uint16) store.Quarantine {
		return store.Quarantine{Endpoint: store.Endpoint{Addr: ext4, Port: port, Protocol: protoTCP}, Owner: ownerB, InternalAddr: v4B, InternalPort: 80, Until: until}
	}
	if err := h.st.CommitQuar(nil, nil, &store.QuarChange{Put: []store.Quarantine{q(40000), q(40001)}}); err != nil {
		t.Fatal(err)
	}
	h.start()
	if got, want := quarPorts(h.s), map[uint16]bool{40001: true}; !maps.Equal(got, want) {
		t.Fatalf("quarantined after the restart: %v, want %v", got, want)
	}
	mirrored(t, h, "restarted")
}
