package server

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// checkPool4 checks the IPv4 pool index against the table (checkTable):
// held4 has exactly the IPv4 endpoints with a holder, byIn4 exactly the
// slots of each internal IPv4 address's leases.
func checkPool4(t testing.TB, tab *table) {
	t.Helper()
	if err := pool4Diff(tab); err != "" {
		t.Fatal(err)
	}
}

// checkQuar4 checks the quarantine side of the pool's index against
// s.quar (s.mu held): each port marked is quarantined at least until its
// bitmap's min, and byIn lists exactly each internal IPv4 address's
// quarantined endpoints.
func quar4Diff(s *Server) string {
	for k, b := range s.quar4.bits {
		for p := range 1 << 16 {
			if !b.has(uint16(p)) {
				continue
			}
			e := endpoint{addr: netip.AddrFrom4(k.a), proto: k.proto, port: uint16(p)}
			if q, ok := s.quar[e]; !ok || q.until.Before(b.min) {
				return fmt.Sprintf("quar4 marks %v, quarantined %v until %v, min %v", e, ok, q.until, b.min)
			}
		}
	}
	in := map[[4]byte][]endpoint{}
	for e, q := range s.quar {
		if e.addr.Is4() && q.addr.Is4() {
			in[q.addr.As4()] = append(in[q.addr.As4()], e)
		}
	}
	byEp := func(a, b endpoint) int {
		return int(a.port) - int(b.port) + 65536*(int(a.proto)-int(b.proto)) + 1<<25*a.addr.Compare(b.addr)
	}
	if len(in) != len(s.quar4.byIn) {
		return fmt.Sprintf("quar4.byIn has %d addresses, s.quar %d", len(s.quar4.byIn), len(in))
	}
	for a, l := range in {
		got := slices.Clone(s.quar4.byIn[a])
		slices.SortFunc(got, byEp)
		slices.SortFunc(l, byEp)
		if !slices.Equal(got, l) {
			return fmt.Sprintf("quar4.byIn of %v is %v, s.quar's %v", netip.AddrFrom4(a), got, l)
		}
	}
	return ""
}

func pool4Diff(tab *table) string {
	held := map[port4]*portBits{}
	in := map[[4]byte][]uint32{}
	for ref := uint32(1); ref <= tab.top; ref++ {
		r := tab.rec(ref)
		if r.flags&fLive == 0 {
			continue
		}
		if a, ok := as4(r.iaddr); ok {
			in[a] = append(in[a], ref)
		}
		if a, ok := as4(r.eaddr); ok {
			k := port4{a: a, proto: r.proto}
			if held[k] == nil {
				held[k] = new(portBits)
			}
			if !held[k].has(r.eport) {
				held[k].w[r.eport>>6] |= 1 << (r.eport & 63)
				held[k].n++
			}
		}
	}
	for k, b := range tab.held4 {
		if held[k] == nil && *b != (portBits{}) {
			return fmt.Sprintf("held4 of %v/%d holds ports no lease holds", netip.AddrFrom4(k.a), k.proto)
		}
	}
	for k, b := range held {
		got := tab.held4[k]
		if got == nil || *got != *b {
			return fmt.Sprintf("held4 of %v/%d differs from the table's endpoints", netip.AddrFrom4(k.a), k.proto)
		}
	}
	if len(in) != len(tab.byIn4) {
		return fmt.Sprintf("byIn4 has %d addresses, the table %d", len(tab.byIn4), len(in))
	}
	for a, refs := range in {
		for i, ref := range tab.byIn4[a] {
			if r := tab.rec(ref); r.in4 != uint32(i) {
				return fmt.Sprintf("slot %d is at %d of byIn4 of %v, rec.in4 %d", ref, i, netip.AddrFrom4(a), r.in4)
			}
		}
		got := slices.Clone(tab.byIn4[a])
		slices.Sort(got)
		if !slices.Equal(got, refs) {
			return fmt.Sprintf("byIn4 of %v is %v, the table's slots %v", netip.AddrFrom4(a), got, refs)
		}
	}
	return ""
}

// poolScanState is a random table around ext4's pool: IPv4 leases of a
// few internal addresses, both protocols (and SCTP), all kinds, two
// external addresses, ports in and just outside the pool, endpoints
// shared by several leases (also of other tuples, as a restore may
// bring), some deleted again; quarantines live and ended, of the asking
// tuples and others; host ports.
type poolScanState struct {
	h      *harness
	rng    *rand.Rand
	first  uint16
	last   uint16
	addrs  []netip.Addr
	ports  []uint16
	protos []uint8
}

func newPoolScanState(t *testing.T, seed uint64) *poolScanState {
	rng := rand.New(rand.NewPCG(seed, 4))
	first := uint16(1024 + rng.IntN(100))
	last := first + uint16(rng.IntN(300))
	if seed%8 == 0 {
		first, last = 65535-uint16(rng.IntN(300)), 65535 // the top of the pool: the last port is 65535
	}
	var reserved []uint16
	var deny []policy.PortRange
	for range rng.IntN(4) {
		reserved = append(reserved, first+uint16(rng.IntN(int(last-first)+1)))
		p := first + uint16(rng.IntN(int(last-first)+1))
		deny = append(deny, policy.PortRange{First: p, Last: p + uint16(rng.IntN(5))})
	}
	h := newHarness(t, func(c *Config, p *policy.Config) {
		c.IPv4Ports = PortRange{first, last}
		c.ReservedPorts = reserved
		p.DenyPorts = deny
		p.MaxLeases, p.MaxLeasesPerClient = 1<<20, 1<<20
	})
	st := &poolScanState{h: h, rng: rng, first: first, last: last, protos: []uint8{protoTCP, protoUDP, protoTCP, protoUDP, 132}}
	for i := range 6 {
		st.addrs = append(st.addrs, netip.AddrFrom4([4]byte{10, 0, 0, byte(2 + i)}))
	}
	st.ports = []uint16{80, 443, 5350, 5351, first, first + 1, last}
	// The host's sockets: a few ports of each protocol.
	tcp, udp := new(portSet), new(portSet)
	for range rng.IntN(6) {
		tcp.add(st.port())
		udp.add(st.port())
	}
	hp := &h.s.hostPorts
	hp.mu.Lock()
	hp.tcp, hp.udp, hp.at = tcp, udp, time.Now().Add(time.Hour) // no rescan
	hp.mu.Unlock()
	return st
}

// port is a port of the pool or just outside it.
func (st *poolScanState) port() uint16 {
	return st.first - 3 + uint16(st.rng.IntN(int(st.last-st.first)+7))
}

func (st *poolScanState) pick(l []netip.Addr) netip.Addr { return l[st.rng.IntN(len(l))] }

func (st *poolScanState) iport() uint16 {
	if st.rng.IntN(3) == 0 {
		return st.port()
	}
	return st.ports[st.rng.IntN(len(st.ports))]
}

// fill puts n random leases and quarantines, and deletes some leases.
func (st *poolScanState) fill(n int) {
	s, rng, now := st.h.s, st.rng, st.h.clock.Now()
	ext2 := netip.MustParseAddr("198.51.100.2")
	s.mu.Lock()
	defer s.mu.Unlock()
	var keys []store.Key
	for range n {
		switch rng.IntN(10) {
		case 0, 1:
			if len(keys) > 0 {
				i := rng.IntN(len(keys))
				s.tab.del(keys[i])
				keys = slices.Delete(keys, i, i+1)
			}
			continue
		case 2:
			for e := range s.quar { // one, at random
				s.quarDel(e)
				break
			}
			continue
		case 3, 4:
			e := endpoint{addr: ext4, proto: st.protos[rng.IntN(len(st.protos))], port: st.port()}
			if rng.IntN(8) == 0 {
				e.addr = ext2
			}
			// Ended, ending within quarSlack or a few minutes, or later.
			until := now.Add([]time.Duration{-time.Minute, 0, time.Second, quarSlack, time.Minute}[rng.IntN(5)] + time.Duration(rng.IntN(240)-60)*time.Second)
			if rng.IntN(3) == 0 {
				until = now.Add(time.Duration(rng.IntN(120)-60) * time.Minute)
			}
			s.quarPut(e, quarantine{owner: "static:q", addr: st.pick(st.addrs), port: st.iport(), nonce: [12]byte{byte(rng.IntN(2))}, until: until})
			continue
		}
		l := store.Lease{
			Key:          store.Key{Owner: []string{ownerA, "static:b", "static:c"}[rng.IntN(3)], Protocol: st.protos[rng.IntN(len(st.protos))], InternalAddr: st.pick(st.addrs), InternalPort: st.iport()},
			ExternalAddr: ext4, ExternalPort: st.port(), Kind: []store.Kind{store.KindMap, store.KindNATPMP, store.KindPeer}[rng.IntN(3)],
			Created: now, Expires: now.Add(time.Hour), Nonce: [12]byte{byte(rng.IntN(2))},
		}
		if rng.IntN(8) == 0 {
			l.ExternalAddr = ext2
		}
		if l.Kind == store.KindPeer {
			l.Remote = netip.AddrPortFrom(netip.MustParseAddr("192.0.2.1"), uint16(1+rng.IntN(3)))
		}
		if rng.IntN(2) == 0 {
			// Most leases as the engine makes them: one tuple, one
			// external endpoint, and the endpoint free or the tuple's.
			if h, ok := s.tab.holder(endpointOf(&l)); ok {
				l.InternalAddr, l.InternalPort = h.addr, h.port
			}
		}
		s.tab.put(l)
		keys = append(keys, l.Key)
	}
}

// diff compares, for one ask, the lowest port the linear scan of the pool
// finds (the engine's before the index) and lowestFree's, and checks
// that freePorts4 leaves out no port usable accepts. "" if all agree.
func (st *poolScanState) diff(a *ask) string {
	s := st.h.s
	s.mu.Lock()
	defer s.mu.Unlock()
	now := st.h.clock.Now()
	c := &call{t: s.begin(now), now: now}
	defer s.release(c.t)
	k := a.key
	try := func(p uint16) bool {
		return s.usable(c, a, endpoint{addr: ext4, proto: k.Protocol, port: p})
	}
	var lin uint16
	var linOK bool
	offered := map[uint16]bool{}
	for p := range s.freePorts4(now, ext4, k.Protocol, k.InternalAddr, st.first, st.last) {
		offered[p] = true
	}
	for p := int(st.first); p <= int(st.last); p++ {
		if try(uint16(p)) {
			if !linOK {
				lin, linOK = uint16(p), true
			}
			if !offered[uint16(p)] {
				return fmt.Sprintf("%v: port %d usable but left out of freePorts4", k, p)
			}
		}
	}
	got, ok := s.lowestFree(now, k, ext4, st.first, st.last, try)
	if got != lin || ok != linOK {
		return fmt.Sprintf("%v (nonce %d): lowestFree %d %v, the linear scan %d %v", k, a.nonce[0], got, ok, lin, linOK)
	}
	return ""
}

// ask is a random ask of one of the state's addresses.
func (st *poolScanState) ask() *ask {
	rng := st.rng
	return &ask{
		kind:  []store.Kind{store.KindMap, store.KindNATPMP, store.KindPeer}[rng.IntN(3)],
		key:   store.Key{Owner: ownerA, Protocol: st.protos[rng.IntN(len(st.protos))], InternalAddr: st.pick(st.addrs), InternalPort: st.iport()},
		nonce: [12]byte{byte(rng.IntN(2))},
	}
}

// TestPoolScanMatchesLinear (h/pool4): over random tables (see
// poolScanState), the pool index's scan (lowestFree over freePorts4)
// gives every ask the port the linear scan of the pool gives, or refuses
// as it does, and leaves out no port usable accepts; the index stays in
// step with the table through every put and delete.
func TestPoolScanMatchesLinear(t *testing.T) {
	asks := 0
	for seed := range uint64(48) {
		st := newPoolScanState(t, seed)
		for range 6 {
			st.fill(20 + st.rng.IntN(int(st.last-st.first)+40))
			st.h.s.mu.Lock()
			checkTable(t, st.h.s.tab)
			d := quar4Diff(st.h.s)
			st.h.s.mu.Unlock()
			if d != "" {
				t.Fatalf("seed %d: %s", seed, d)
			}
			for range 40 {
				if d := st.diff(st.ask()); d != "" {
					t.Fatalf("seed %d, pool %d-%d: %s", seed, st.first, st.last, d)
				}
				asks++
				if st.rng.IntN(8) == 0 {
					// Quarantines end while their bitmaps stand.
					st.h.clock.Advance(time.Duration(st.rng.IntN(90)) * time.Second)
				}
			}
			if st.rng.IntN(4) == 0 {
				// A wall-clock step moves the quarantines' ends (rebase).
				s := st.h.s
				d := time.Duration(st.rng.IntN(600)-300) * time.Second
				s.mu.Lock()
				for e, q := range s.quar {
					q.until = q.until.Add(d)
					s.quar[e] = q
				}
				s.quar4.stale()
				s.mu.Unlock()
			}
		}
	}
	t.Logf("%d asks compared", asks)
}

// TestPoolScanCatchesBrokenIndex: the comparison of
// TestPoolScanMatchesLinear and checkPool4 see a broken index: ports
// marked held that no lease holds (usable ports left out), and a lease
// missing from its internal address's slots (the port its own tuple
// holds, the lowest it may take, no longer offered).
func TestPoolScanCatchesBrokenIndex(t *testing.T) {
	for _, tc := range []struct {
		name  string
		spoil func(st *poolScanState, a *ask)
	}{
		{"a free port marked held", func(st *poolScanState, a *ask) {
			b := st.h.s.tab.held4[port4{a: ext4.As4(), proto: a.key.Protocol}]
			for p := st.first + 2; p <= st.last && p != 0; p++ {
				b.w[p>>6] |= 1 << (p & 63) // every free port from first+2
			}
		}},
		{"a lease left out of its address's slots", func(st *poolScanState, a *ask) {
			st.h.s.tab.byIn4[a.key.InternalAddr.As4()] = nil
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := newPoolScanState(t, 1)
			s := st.h.s
			now := st.h.clock.Now()
			a := &ask{kind: store.KindMap, key: store.Key{Owner: ownerA, Protocol: protoTCP, InternalAddr: v4A, InternalPort: 8080}}
			other := netip.MustParseAddr("10.0.0.9")
			s.mu.Lock()
			for e := range s.quar {
				s.quarDel(e)
			}
			// first held by another client; first+1 by a's own tuple (a
			// PEER beside it, say), the lowest port a may take.
			for i, in := range []netip.Addr{other, v4A} {
				s.tab.put(store.Lease{Key: store.Key{Owner: ownerA, Protocol: protoTCP, InternalAddr: in, InternalPort: 8080},
					ExternalAddr: ext4, ExternalPort: st.first + uint16(i), Kind: store.KindMap, Created: now, Expires: now.Add(time.Hour)})
			}
			if d := pool4Diff(s.tab); d != "" {
				t.Fatalf("before breaking it: %s", d)
			}
			s.mu.Unlock()
			if d := st.diff(a); d != "" {
				t.Fatalf("before breaking it: %s", d)
			}
			s.mu.Lock()
			tc.spoil(st, a)
			d := pool4Diff(s.tab)
			s.mu.Unlock()
			if d == "" {
				t.Error("checkPool4 sees nothing wrong")
			}
			if d := st.diff(a); d == "" {
				t.Error("the comparison with the linear scan sees nothing wrong")
			} else {
				t.Logf("caught: %s", d)
			}
		})
	}
}
