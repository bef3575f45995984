package server

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
	"github.com/pcpd/pcpd/store"
)

// Review h/revpool: the IPv4 pool index (pool4.go) driven through the
// engine's own paths, where TestPoolScanMatchesLinear calls table.put and
// table.del and copies rebase's loop: PCP MAP/PEER and NAT-PMP requests
// (delete, delete-all), their rollbacks after an injected kernel or store
// failure, expiry, operator revocations, wall-clock steps through
// Server.rebase itself, and restarts (the restore and the stored
// quarantines' load).

// revpoolState is a harness with a small pool, a few IPv4 clients of
// both owners and nothing limiting their rate.
type revpoolState struct {
	h     *harness
	clk   *stepClocks
	rng   *rand.Rand
	first uint16
	last  uint16
	srcs  []netip.Addr
	// What the run saw: PCP MAP result codes, and the leases and
	// quarantines at each check, summed.
	codes                 map[byte]int
	leases, quars, checks int
}

func newRevpoolState(t *testing.T, seed uint64) *revpoolState {
	rng := rand.New(rand.NewPCG(seed, 63))
	first := uint16(2000 + rng.IntN(50))
	last := first + 20 + uint16(rng.IntN(40))
	quota := []int{4, 64, 64}[rng.IntN(3)]
	h := newHarness(t, func(c *Config, p *policy.Config) {
		c.IPv4Ports = PortRange{first, last}
		c.RateLimit, c.RateBurst = 1e9, 1<<20
		p.MaxLeases, p.MaxLeasesPerClient = 1<<20, quota
	})
	st := &revpoolState{h: h, clk: &stepClocks{}, rng: rng, first: first, last: last, codes: map[byte]int{}}
	st.clk.wall.Store(h.clock.Now().UnixNano())
	h.startWith(st.clk.deps, nil) // the running clock, steps and all
	for _, a := range []string{"10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.18", "10.0.0.19"} {
		st.srcs = append(st.srcs, netip.MustParseAddr(a))
	}
	st.hostPortsReady()
	return st
}

// hostPortsReady marks the host's sockets read (none in the pool), as a
// started pcpd would have them.
func (st *revpoolState) hostPortsReady() {
	hp := &st.h.s.hostPorts
	hp.mu.Lock()
	hp.tcp, hp.udp, hp.at = new(portSet), new(portSet), time.Now().Add(time.Hour)
	hp.mu.Unlock()
}

func (st *revpoolState) pick(l []netip.Addr) netip.Addr { return l[st.rng.IntN(len(l))] }

// port is an internal or suggested port: a few fixed ones, or one of the
// pool or near it.
func (st *revpoolState) port() uint16 {
	if st.rng.IntN(2) == 0 {
		return []uint16{80, 443, 8080, st.first, st.first + 1}[st.rng.IntN(5)]
	}
	return st.first - 2 + uint16(st.rng.IntN(int(st.last-st.first)+5))
}

// lifetimes are a request's: a delete, a short one, or an hour.
var revpoolLifetimes = []time.Duration{0, 30 * time.Second, 2 * time.Minute, time.Hour, time.Hour, time.Hour}

// request sends a random request (n < 65 picks its kind) of a random
// client.
func (st *revpoolState) request(n int) string {
	h, rng := st.h, st.rng
	src := st.pick(st.srcs)
	lt := revpoolLifetimes[rng.IntN(len(revpoolLifetimes))]
	switch {
	case n < 35:
		proto := []pcp.Protocol{pcp.ProtoTCP, pcp.ProtoUDP}[rng.IntN(2)]
		sugg := uint16(0)
		if rng.IntN(3) == 0 {
			sugg = st.port()
		}
		r := mapReq(src, proto, st.port(), sugg, lt, byte(rng.IntN(2)))
		if sugg != 0 && rng.IntN(4) == 0 {
			r.Options.PreferFailure = true
		}
		st.codes[h.raw(src, pcp.AppendRequest(nil, r))[3]]++
		return fmt.Sprintf("MAP %v %v/%d %v", src, proto, r.Map.InternalPort, lt)
	case n < 45:
		proto := []pcp.Protocol{pcp.ProtoTCP, pcp.ProtoUDP}[rng.IntN(2)]
		rem := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.1"), uint16(1+rng.IntN(3)))
		r := peerReq(src, proto, st.port(), rem, lt, byte(rng.IntN(2)))
		h.raw(src, pcp.AppendRequest(nil, r))
		return fmt.Sprintf("PEER %v %v/%d %v", src, proto, r.Map.InternalPort, lt)
	}
	op := []pcp.PMPOpcode{pcp.PMPOpMapUDP, pcp.PMPOpMapTCP}[rng.IntN(2)]
	port := st.port()
	if lt == 0 && rng.IntN(3) == 0 {
		port = 0 // delete every mapping of the client and protocol
	}
	sugg := uint16(0)
	if rng.IntN(2) == 0 {
		sugg = st.port()
	}
	h.raw(src, pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: op, InternalPort: port, SuggestedExternalPort: sugg, Lifetime: lt}))
	return fmt.Sprintf("PMP %v op %d %d %v", src, op, port, lt)
}

// step does one random thing to the server.
func (st *revpoolState) step(t *testing.T) string {
	h, rng := st.h, st.rng
	switch n := rng.IntN(100); {
	case n < 65:
		return st.request(n)
	case n < 75:
		d := time.Duration(rng.IntN(150)) * time.Second
		st.clk.advance(d)
		h.clock.Advance(d)
		h.s.mu.Lock()
		h.s.expireLocked(h.s.now())
		h.s.mu.Unlock()
		return fmt.Sprintf("advance %v, expire", d)
	case n < 88:
		// A request whose kernel transaction, or store commit, fails:
		// its changes roll back.
		if rng.IntN(2) == 0 {
			h.fw.FailApply = func([]pinhole.Op) error { return servertest.ErrInjected }
		} else {
			h.st.FailCommit = func([]store.Lease, []store.Key) error { return servertest.ErrInjected }
		}
		what := st.request(rng.IntN(65))
		h.fw.FailApply, h.st.FailCommit = nil, nil
		return "failing " + what
	case n < 93:
		// A wall-clock step, forwards or back: rebase, and its rewrite.
		d := time.Duration(rng.IntN(1200)-600) * time.Second
		st.clk.step(d)
		h.s.checkClock()
		return fmt.Sprintf("wall step %v", d)
	case n < 97:
		src := st.pick(st.srcs)
		f := RevokeFilter{Opens: []Opening{{Protocol: []uint8{protoTCP, protoUDP}[rng.IntN(2)], InternalAddr: src, InternalPort: st.port()}}}
		if rng.IntN(3) == 0 {
			f = RevokeFilter{Owner: []string{ownerA, ownerB}[rng.IntN(2)]}
		}
		_, _ = h.s.Revoke(t.Context(), f)
		return fmt.Sprintf("revoke %+v", f)
	default:
		if rng.IntN(2) == 0 {
			// The operator moved the pool: leases and quarantines
			// restored outside it, ports of it nobody held.
			st.first = uint16(int(st.first) + rng.IntN(11) - 5)
			st.last = st.first + 20 + uint16(rng.IntN(40))
			h.cfg.IPv4Ports = PortRange{st.first, st.last}
		}
		h.startWith(st.clk.deps, nil) // a crash: no flush
		st.hostPortsReady()
		return fmt.Sprintf("restart, pool %d-%d", st.first, st.last)
	}
}

// check compares the server's index with its table and quarantines, the
// index's scan with the linear one for a few asks (rolled back after),
// and checks that no endpoint went to two internal endpoints.
func (st *revpoolState) check(t *testing.T) string {
	s := st.h.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if d := pool4Diff(s.tab); d != "" {
		return d
	}
	if d := quar4Diff(s); d != "" {
		return d
	}
	holders := map[endpoint]tuple{}
	for k, l := range s.tab.all() {
		e := endpointOf(l)
		if tp, ok := holders[e]; ok && tp != tupleOf(k) {
			return fmt.Sprintf("%v held by %v and %v", e, tp, tupleOf(k))
		}
		holders[e] = tupleOf(k)
	}
	st.leases += s.tab.len()
	st.quars += len(s.quar)
	st.checks++
	now := s.now()
	for range 4 {
		a := &ask{
			kind:  []store.Kind{store.KindMap, store.KindNATPMP, store.KindPeer}[st.rng.IntN(3)],
			key:   store.Key{Owner: ownerA, Protocol: []uint8{protoTCP, protoUDP, 132}[st.rng.IntN(3)], InternalAddr: st.pick(st.srcs), InternalPort: st.port()},
			nonce: [12]byte{byte(st.rng.IntN(2))},
		}
		c := &call{t: s.begin(now), now: now}
		try := func(p uint16) bool { return s.usable(c, a, endpoint{addr: ext4, proto: a.key.Protocol, port: p}) }
		var lin uint16
		var linOK bool
		for p := int(st.first); p <= int(st.last) && !linOK; p++ {
			if try(uint16(p)) {
				lin, linOK = uint16(p), true
			}
		}
		got, ok := s.lowestFree(now, a.key, ext4, st.first, st.last, try)
		c.t.rollback() // the ended quarantines usable dropped
		s.release(c.t)
		if got != lin || ok != linOK {
			return fmt.Sprintf("%v: lowestFree %d %v, the linear scan %d %v", a.key, got, ok, lin, linOK)
		}
	}
	return ""
}

// TestPoolIndexThroughEngine (review h/revpool): the pool index stays in
// step with the table and s.quar, and its scan gives the linear scan's
// port, through every engine path that changes holders or quarantines.
func TestPoolIndexThroughEngine(t *testing.T) {
	for seed := range uint64(24) {
		st := newRevpoolState(t, seed)
		var log []string
		for range 400 {
			log = append(log, st.step(t))
			if d := st.check(t); d != "" {
				if len(log) > 8 {
					log = log[len(log)-8:]
				}
				t.Fatalf("seed %d, pool %d-%d, after %v: %s", seed, st.first, st.last, log, d)
			}
		}
		// MAP results by code (PCP result numbers): some success,
		// some refusal for a pool full or quarantined (8: NO_RESOURCES).
		t.Logf("seed %d: mean %d leases, %d quarantines; MAP results %v", seed, st.leases/st.checks, st.quars/st.checks, st.codes)
	}
}
