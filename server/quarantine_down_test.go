package server

import (
	"errors"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
	"github.com/pcpd/pcpd/store"
)

// TestMAP22LeaseExpiredWhileDown: a mapping whose lease ends while pcpd is
// down frees its IPv4 port as an expiry would have had pcpd been up: the
// port is quarantined (MAP-22) from the lease's expiry for the protocol's
// idle time, so after the restart another client does not get it until
// then, its last holder does, and the store holds the quarantine restore
// set. One whose idle time too is over by the restart is free at once.
func TestMAP22LeaseExpiredWhileDown(t *testing.T) {
	for _, tc := range []struct {
		name  string
		proto pcp.Protocol
		down  time.Duration // pcpd down from the MAP on; the lease lives 1 h
		quar  bool          // the port is quarantined after the restart
	}{
		{"TCP, 10 min past its expiry", pcp.ProtoTCP, 70 * time.Minute, true},
		{"TCP, 2 h past its expiry", pcp.ProtoTCP, 3 * time.Hour, true},
		{"TCP, idle time over too", pcp.ProtoTCP, 60*time.Minute + 125*time.Minute, false},
		{"UDP, 1 min past its expiry", pcp.ProtoUDP, 61 * time.Minute, true},
		{"UDP, idle time over too", pcp.ProtoUDP, 63 * time.Minute, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(c *Config, p *policy.Config) {
				c.IPv4Ports = PortRange{First: 40000, Last: 40003}
			})
			r := h.do(mapReq(v4A, tc.proto, 5000, 40000, time.Hour, 1))
			if r.Result != pcp.Success || r.Map.ExternalPort != 40000 || r.Lifetime != time.Hour {
				t.Fatalf("MAP: %v, external %d, lifetime %v", r.Result, r.Map.ExternalPort, r.Lifetime)
			}
			h.clock.Advance(tc.down)
			h.start()
			if got := quarPorts(h.s)[40000]; got != tc.quar {
				t.Fatalf("port 40000 quarantined after the restart: %v, want %v", got, tc.quar)
			}
			mirrored(t, h, "restarted")
			r = h.do(mapReq(v4B, tc.proto, 80, 40000, time.Hour, 2))
			if got := r.Result == pcp.Success && r.Map.ExternalPort == 40000; got == tc.quar {
				t.Fatalf("client B asks for 40000 after the restart: %v, external %d (quarantined: %v)", r.Result, r.Map.ExternalPort, tc.quar)
			}
			if !tc.quar {
				return
			}
			h.expect(h.do(mapReq(v4B, tc.proto, 80, 0, 0, 2)), pcp.Success)
			r = h.do(mapReq(v4A, tc.proto, 5000, 40000, time.Hour, 1))
			if r.Result != pcp.Success || r.Map.ExternalPort != 40000 {
				t.Fatalf("last holder re-maps 40000: %v, external %d", r.Result, r.Map.ExternalPort)
			}
		})
	}
}

// TestMAP22ExpiryUnrecordedRestart: a lease that expires while pcpd runs
// but whose expiry's commit fails (the store owes the quarantine to the
// next commit, quarDebt) and pcpd then stops before any commit succeeds
// (kill -9, a store that stays down) comes back expired: restore
// quarantines its port from its expiry, as for one that expired while
// pcpd was down (TestMAP22LeaseExpiredWhileDown).
func TestMAP22ExpiryUnrecordedRestart(t *testing.T) {
	for _, tc := range []struct {
		name  string
		after time.Duration // from the failed expiry to the restart
		quar  bool
	}{
		{"restarted at once", 0, true},
		{"restarted 2 h later", 2 * time.Hour, true},
		{"restarted after the idle time", 125 * time.Minute, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(c *Config, p *policy.Config) {
				c.IPv4Ports = PortRange{First: 40000, Last: 40003}
			})
			h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, 5000, 40000, time.Hour, 1)), pcp.Success)
			h.st.FailCommit = func([]store.Lease, []store.Key) error { return errors.New("disk gone") }
			h.runPeriodic(61, 0) // the expiry, its commit failing
			if !quarPorts(h.s)[40000] {
				t.Fatal("expiry did not quarantine 40000")
			}
			h.st.FailCommit = nil
			h.clock.Advance(tc.after)
			h.start() // no orderly stop: the store still holds the lease
			if got := quarPorts(h.s)[40000]; got != tc.quar {
				t.Fatalf("port 40000 quarantined after the restart: %v, want %v", got, tc.quar)
			}
			r := h.do(mapReq(v4B, pcp.ProtoTCP, 80, 40000, time.Hour, 2))
			if got := r.Result == pcp.Success && r.Map.ExternalPort == 40000; got == tc.quar {
				t.Fatalf("client B asks for 40000 after the restart: %v, external %d (quarantined: %v)", r.Result, r.Map.ExternalPort, tc.quar)
			}
		})
	}
}

// TestMAP22QuarantineClockBehindRestart: a quarantine has at most its
// protocol's idle time left (124 min TCP, 2 min UDP), as a restored lease
// has at most the max lifetime (clampRestored). Restored with the clock
// behind (a reboot without RTC, NTP not yet synced), a stored end looks
// that much further away: unclamped, the port stayed out of the pool for
// the clock's error on top (a week here; the rebase at NTP's step moves
// the end with the step, so the error stays). Restore caps it: after its
// idle time of running, another client gets the port.
func TestMAP22QuarantineClockBehindRestart(t *testing.T) {
	for _, tc := range []struct {
		name   string
		proto  pcp.Protocol
		behind time.Duration
		run    time.Duration // after the restart
		free   bool          // another client gets the port then
	}{
		{"TCP, clock a week behind, idle time run", pcp.ProtoTCP, 7 * 24 * time.Hour, 125 * time.Minute, true},
		{"TCP, clock a week behind, 1 h run", pcp.ProtoTCP, 7 * 24 * time.Hour, time.Hour, false},
		{"UDP, clock a day behind, idle time run", pcp.ProtoUDP, 24 * time.Hour, 3 * time.Minute, true},
		{"TCP, clock right, 1 h run", pcp.ProtoTCP, 0, time.Hour, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(c *Config, p *policy.Config) {
				c.IPv4Ports = PortRange{First: 40000, Last: 40003}
			})
			h.expect(h.do(mapReq(v4A, tc.proto, 5000, 40000, time.Hour, 1)), pcp.Success)
			h.expect(h.do(mapReq(v4A, tc.proto, 5000, 0, 0, 1)), pcp.Success)
			h.clock.Advance(-tc.behind)
			h.start()
			if !quarPorts(h.s)[40000] {
				t.Fatal("40000 not quarantined after the restart")
			}
			mirrored(t, h, "restarted")
			h.clock.Advance(tc.run)
			r := h.do(mapReq(v4B, tc.proto, 80, 40000, time.Hour, 2))
			if got := r.Result == pcp.Success && r.Map.ExternalPort == 40000; got != tc.free {
				t.Fatalf("client B asks for 40000 %v after the restart: %v, external %d; want it free: %v", tc.run, r.Result, r.Map.ExternalPort, tc.free)
			}
		})
	}
}

// TestMAP22RewriteQuarantinesFirst: after a wall-clock step the rewrite
// writes the quarantines before the leases. They are few (at most one per
// IPv4 port and protocol) while the leases may take minutes of sweep ticks
// (≈ 2 min at a million, rewriteChunk a tick); a kill -9 in that time left
// every quarantine in the old frame, and a forward step ended them early
// at the restart: the freed port went to another client. Here a chunk is
// one record and three leases come first in the table.
func TestMAP22RewriteQuarantinesFirst(t *testing.T) {
	for _, tc := range []struct {
		name   string
		chunks int // rewrite chunks written before the kill
	}{
		{"killed after the first chunk", 1},
		{"killed after the second chunk", 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &stepClocks{}
			c.wall.Store(time.Date(2026, 12, 4, 20, 0, 0, 0, time.UTC).UnixNano())
			h := runClockHarness(t, c, func(cf *Config, p *policy.Config) { cf.IPv4Ports = PortRange{First: 40000, Last: 40007} })
			for i := range uint16(3) {
				h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, 6000+i, 40004+i, 10*time.Hour, 1)), pcp.Success)
			}
			h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, 5000, 40000, time.Hour, 1)), pcp.Success)
			h.expect(h.do(mapReq(v4A, pcp.ProtoTCP, 5000, 0, 0, 1)), pcp.Success)
			c.advance(time.Minute)
			c.step(3 * time.Hour)
			h.s.mu.Lock()
			h.s.rebase(h.s.clk.skew())
			for range tc.chunks {
				h.s.rewriteStep(1)
			}
			h.s.mu.Unlock()
			// kill -9: no finishRebase. Restart on the stepped clock.
			c.advance(time.Minute)
			h.startWith(c.deps, nil)
			r := h.do(mapReq(v4B, pcp.ProtoTCP, 80, 40000, time.Hour, 2))
			if r.Result == pcp.Success && r.Map.ExternalPort == 40000 {
				t.Fatal("MAP-22: port freed 2 min before (running time) handed to another client after a step, a partial rewrite and a kill")
			}
		})
	}
}

// TestMAP22UnrestorableLeaseQuarantined: a stored lease whose pinhole the
// kernel refuses at the start leaves the table and the store
// (reconcile): its IPv4 port is freed then, and quarantined for its last
// holder as any freed port (MAP-22), not handed to another client; the
// holder, renewing, gets it back.
func TestMAP22UnrestorableLeaseQuarantined(t *testing.T) {
	for _, tc := range []struct {
		name  string
		proto pcp.Protocol
	}{
		{"TCP", pcp.ProtoTCP},
		{"UDP", pcp.ProtoUDP},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, func(c *Config, p *policy.Config) {
				c.IPv4Ports = PortRange{First: 40000, Last: 40003}
			})
			h.expect(h.do(mapReq(v4A, tc.proto, 5000, 40000, time.Hour, 1)), pcp.Success)
			h.expect(h.do(mapReq(v4A, tc.proto, 5001, 40001, time.Hour, 1)), pcp.Success)
			h.fw.FailApply = func(ops []pinhole.Op) error {
				for _, op := range ops {
					if op.Kind == pinhole.Install && op.Pinhole.ExternalPort == 40000 {
						return servertest.ErrInjected
					}
				}
				return nil
			}
			h.start()
			h.fw.FailApply = nil
			if _, ok := h.lease(ownerA, uint8(tc.proto), v4A, 5000); ok {
				t.Fatal("the unrestorable lease is still in the table")
			}
			if !quarPorts(h.s)[40000] {
				t.Fatal("40000 not quarantined after its lease could not be restored")
			}
			mirrored(t, h, "restarted")
			r := h.do(mapReq(v4B, tc.proto, 80, 40000, time.Hour, 2))
			if r.Result == pcp.Success && r.Map.ExternalPort == 40000 {
				t.Fatal("MAP-22: the unrestorable lease's port handed to client B")
			}
			r = h.do(mapReq(v4A, tc.proto, 5000, 40000, time.Hour, 1))
			if r.Result != pcp.Success || r.Map.ExternalPort != 40000 {
				t.Fatalf("holder renews: %v, external %d", r.Result, r.Map.ExternalPort)
			}
		})
	}
}
