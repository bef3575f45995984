package server

import (
	"iter"
	"math/bits"
	"net/netip"
	"slices"
	"time"
)

// The IPv4 pool's index (h/pool4). A new IPv4 mapping whose internal port
// is taken gets the lowest usable port of the pool (MAP-09/11/12), and
// usable looked every port up in the table's endpoint index (twice:
// PMP-06) until one was free: 3.4 ms a request at half a 64 512-port pool
// held, 7-9 ms at 99 % and for every refusal of a full one, under s.mu
// (BenchmarkIPv4PoolScan). The table therefore also keeps, per external
// IPv4 address and protocol, a bit per port that has a holder (a byExt
// chain), and per internal IPv4 address the slots of its leases. Both are
// bounded by the IPv4 leases (8 KB a bitmap, one per external IPv4
// address and protocol in use; a slot number per IPv4 lease): the
// IPv6 leases cost nothing more.
//
// freePorts4 yields only the ports usable could accept; usable still
// judges each, so the lowest free port and every rule of usable stay as
// they were (TestPoolScanMatchesLinear).

// port4 names one bitmap: an external IPv4 address and a protocol.
type port4 struct {
	a     [4]byte
	proto uint8
}

// portBits is a set of ports, one bit each, and how many it holds. One
// is made for each external IPv4 address and protocol a lease holds a
// port of, and kept (the addresses are the host's own: a handful).
type portBits struct {
	w [1 << 10]uint64
	n int
}

func (b *portBits) has(p uint16) bool { return b != nil && b.w[p>>6]&(1<<(p&63)) != 0 }

func (b *portBits) word(i int) uint64 {
	if b == nil {
		return 0
	}
	return b.w[i]
}

// as4 is c's IPv4 address; false if c is not IPv4.
func as4(c caddr) ([4]byte, bool) {
	return [4]byte(c.a[:4]), c.m&3 == 1
}

// extPort4 is the held4 key of slot r: its external IPv4 address and
// protocol; false for an IPv6 one.
func extPort4(r *rec) (port4, bool) {
	a, ok := as4(r.eaddr)
	return port4{a: a, proto: r.proto}, ok
}

// held4Set records that the endpoint of slot r has a holder now (its
// byExt chain was made); held4Clear that it has none (its chain is gone).
func (t *table) held4Set(r *rec) {
	k, ok := extPort4(r)
	if !ok {
		return
	}
	b := t.held4[k]
	if b == nil {
		b = new(portBits)
		t.held4[k] = b
	}
	b.w[r.eport>>6] |= 1 << (r.eport & 63)
	b.n++
	t.held4n.Add(1)
}

func (t *table) held4Clear(r *rec) {
	k, ok := extPort4(r)
	if !ok {
		return
	}
	b := t.held4[k]
	b.w[r.eport>>6] &^= 1 << (r.eport & 63)
	b.n-- // an empty one stays: a lone mapping made and deleted over and over allocated 8 KB each time
	t.held4n.Add(-1)
}

// in4Add and in4Del keep byIn4, the slots of the leases of each internal
// IPv4 address (order not kept), and each slot's position in its list
// (rec.in4). in4Del looked the slot up in the list instead: a delete cost
// O(leases of the address), all of one address's leases ended (expiry,
// revocation, delete-all) O(n²) under s.mu, 366 ms at 65 536 against
// 29 ms without the index (review h/revpool,
// BenchmarkOneAddressDeleteAll).
func (t *table) in4Add(ref uint32) {
	r := t.rec(ref)
	if a, ok := as4(r.iaddr); ok {
		r.in4 = uint32(len(t.byIn4[a]))
		t.byIn4[a] = append(t.byIn4[a], ref)
	}
}

func (t *table) in4Del(ref uint32) {
	r := t.rec(ref)
	a, ok := as4(r.iaddr)
	if !ok {
		return
	}
	l := t.byIn4[a]
	i, last := r.in4, l[len(l)-1]
	l[i] = last
	t.rec(last).in4 = i
	if l = l[:len(l)-1]; len(l) == 0 {
		delete(t.byIn4, a)
	} else {
		t.byIn4[a] = l
	}
}

// otherProto is the protocol whose same port PMP-06 keeps (usable).
func otherProto(proto uint8) uint8 {
	if proto == protoTCP {
		return protoUDP
	}
	return protoTCP
}

// quarBits are the ports of one external IPv4 address and protocol
// quarantined (MAP-22) until min or later: usable refuses each to any
// ask but one of its last holder's internal address until then. A zero
// min asks for a rebuild (rebuilt, before the scan that finds it over).
type quarBits struct {
	portBits
	min time.Time
}

// quar4 indexes the server's IPv4 quarantines (s.quar, kept in step by
// quarPut and quarDel) for the pool's scan: per external address and
// protocol the ports quarantined for a while yet, and per internal
// address its quarantines' endpoints.
type quar4 struct {
	bits map[port4]*quarBits
	byIn map[[4]byte][]endpoint
}

// quarSlack: a rebuild leaves out the quarantines ending within it, so a
// rebuild comes at most this often while quarantines end one by one; a
// port left out is only tried (usable judges it), not given away.
const quarSlack = 30 * time.Second

// farFuture is the min of a quarBits with no port set.
var farFuture = time.Unix(1<<40, 0)

func (q *quar4) put(e endpoint, v quarantine) {
	if !e.addr.Is4() {
		return
	}
	k := port4{a: e.addr.As4(), proto: e.proto}
	b := q.bits[k]
	if b == nil {
		b = &quarBits{min: v.until}
		q.bits[k] = b
	}
	if !b.has(e.port) {
		b.w[e.port>>6] |= 1 << (e.port & 63)
		b.n++
	}
	if v.until.Before(b.min) {
		b.min = v.until
	}
	if v.addr.Is4() {
		a := v.addr.As4()
		q.byIn[a] = append(q.byIn[a], e)
	}
}

func (q *quar4) del(e endpoint, old quarantine) {
	if !e.addr.Is4() {
		return
	}
	if b := q.bits[port4{a: e.addr.As4(), proto: e.proto}]; b.has(e.port) {
		b.w[e.port>>6] &^= 1 << (e.port & 63)
		b.n--
	}
	if old.addr.Is4() {
		a := old.addr.As4()
		l := q.byIn[a]
		i := slices.Index(l, e)
		l[i] = l[len(l)-1]
		if l = l[:len(l)-1]; len(l) == 0 {
			delete(q.byIn, a)
		} else {
			q.byIn[a] = l
		}
	}
}

// stale makes every quarBits rebuild before its next use (rebase moved
// the quarantines' ends).
func (q *quar4) stale() {
	for _, b := range q.bits {
		b.min = time.Time{}
	}
}

// quarantined is the ports of ext and proto quarantined beyond now
// (s.mu held), rebuilt from s.quar first if one of them may have ended.
func (s *Server) quarantined(now time.Time, ext netip.Addr, proto uint8) *portBits {
	b := s.quar4.bits[port4{a: ext.As4(), proto: proto}]
	if b == nil {
		return nil
	}
	if !now.Before(b.min) {
		b.portBits = portBits{}
		b.min = farFuture
		soon := now.Add(quarSlack)
		for e, q := range s.quar {
			if e.addr == ext && e.proto == proto && q.until.After(soon) {
				b.w[e.port>>6] |= 1 << (e.port & 63)
				b.n++
				b.min = minTime(b.min, q.until)
			}
		}
	}
	return &b.portBits
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// freePorts4 yields, lowest first, the ports of first..last on ext for
// protocol proto that usable may accept at now for a mapping of internal
// address in: those no lease holds in proto or in the other protocol
// (PMP-06) and no quarantine keeps beyond now (MAP-22), and those a lease
// or a quarantine of in's holds on ext. Every port it leaves out usable
// refuses: a holder in proto other than in's is not the ask's tuple, one
// in the other protocol other than in's is another client, and a port
// quarantined beyond now for another address is not the ask's.
func (s *Server) freePorts4(now time.Time, ext netip.Addr, proto uint8, in netip.Addr, first, last uint16) iter.Seq[uint16] {
	return func(yield func(uint16) bool) {
		if !ext.Is4() || first > last {
			return
		}
		t := s.tab
		ea := ext.As4()
		var mine []uint16
		if in.Is4() {
			for _, ref := range t.byIn4[in.As4()] {
				r := t.rec(ref)
				if a, ok := as4(r.eaddr); ok && a == ea {
					mine = append(mine, r.eport)
				}
			}
			for _, e := range s.quar4.byIn[in.As4()] {
				if e.addr == ext && e.proto == proto {
					mine = append(mine, e.port)
				}
			}
			slices.Sort(mine)
		}
		held := t.held4[port4{a: ea, proto: proto}]
		other := t.held4[port4{a: ea, proto: otherProto(proto)}]
		quar := s.quarantined(now, ext, proto)
		for w := int(first >> 6); w <= int(last>>6); w++ {
			m := ^(held.word(w) | other.word(w) | quar.word(w))
			for len(mine) > 0 && int(mine[0]>>6) <= w {
				if int(mine[0]>>6) == w {
					m |= 1 << (mine[0] & 63)
				}
				mine = mine[1:]
			}
			if w == int(first>>6) {
				m &= ^uint64(0) << (first & 63)
			}
			if w == int(last>>6) {
				m &= ^uint64(0) >> (63 - last&63)
			}
			for m != 0 {
				b := bits.TrailingZeros64(m)
				m &= m - 1
				if !yield(uint16(w<<6 | b)) {
					return
				}
			}
		}
	}
}
