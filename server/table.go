package server

import (
	"hash/maphash"
	"iter"
	"net/netip"
	"slices"
	"sync/atomic"
	"time"

	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// tuple is a mapping's internal side. One tuple has one external endpoint
// (endpoint-independent mapping): a MAP and the PEERs on one tuple share it
// (MAP-08).
type tuple struct {
	proto uint8
	addr  netip.Addr
	port  uint16
}

// endpoint is an external address, protocol and port.
type endpoint struct {
	addr  netip.Addr
	proto uint8
	port  uint16
}

// hold records which internal address and port an external endpoint leads
// to, and how many leases share it.
type hold struct {
	addr netip.Addr
	port uint16
	n    int
}

// table is the in-memory lease table. It is owned by the engine loop (under
// Server.mu) and indexed every way a request needs: by key, by owner (for
// quotas), by internal tuple, by external endpoint (allocation, PMP-06), and
// by expiry.
//
// Memory matters: 1 000 000 leases must fit in a few hundred MB, and the
// garbage collector must not have to trace them. So nothing per lease holds
// a pointer:
//
//   - a lease is a fixed-size rec (136 bytes) in pages of a slab; addresses
//     are 16 bytes and a family/zone tag, times Unix nanoseconds, the owner
//     and the serving address small interned numbers. The rare variable
//     parts (FILTERs, DESCRIPTION) live in a side map keyed by slot.
//   - the key, tuple and endpoint indexes are open-addressing hash tables of
//     uint32 slot references (4 bytes a bucket, load ≤ 3/4): the key lives
//     in the slot, not in the index. Leases sharing a tuple or an endpoint
//     are chained through the slots (nextTup, nextExt).
//   - expiry is an indexed 4-ary min-heap of (time, slot); a slot knows its
//     heap position, so a renewal moves its entry instead of leaving a stale
//     one behind.
//
// Freed slots go on a free list and are reused (not while a listing has
// the table pinned: pin). Leases leave the table as store.Lease values
// decoded from their slot: get and onTuple return fresh copies, all a
// scratch copy; changing them changes nothing in the table.
//
// 180 bytes a lease all included at 1 000 000 bench-shaped leases, 192 at
// 100 000 (BenchmarkTableMemory; the map-of-pointers table it replaces
// kept 814 and 652).
type table struct {
	pages [][]rec // slab; slot ref r (1-based) is pages[(r-1)>>pageShift][(r-1)&pageMask]
	top   uint32  // refs 1..top have been handed out
	free  uint32  // free list head (linked through nextTup); 0 = none
	n     int     // live leases

	byKey, byTup, byExt index
	exp                 []hitem
	extra               map[uint32]extra

	// held4 has a bit set for each external IPv4 port with a holder (a
	// byExt chain), per address and protocol; byIn4 the slots of each
	// internal IPv4 address's leases (pool4.go: the IPv4 pool's scan).
	held4 map[port4]*portBits
	byIn4 map[[4]byte][]uint32
	// held4n counts the external IPv4 endpoints with a holder (held4's
	// bits, all addresses and protocols), atomic: housekeep reads it
	// without s.mu (hostPorts.refresh: the idle read of the host's DNAT
	// rules is made only while an IPv4 lease may be renewed).
	held4n atomic.Int64
	// on6 counts the leases of each IPv6 address, internal or external
	// (flowprune.go: pruneFlowed asks it under s.mu).
	on6 map[[16]byte]int32
	// ival6 lists, per owner number, the slots of the owner's IPv6 leases
	// with interval elements (a PEER, a MAP with FILTERs; rec.in4 is the
	// position, unused by IPv6 leases): what a filtered all-ports MAP's
	// element may overlap (overlapsHeld, ivalAt).
	ival6 map[uint32][]uint32

	// byOwner counts leases per owner (quotas, Status).
	byOwner map[string]int
	owners  []string // owner number → ID; "" = free
	ownerNo map[string]uint32
	ownFree []uint32

	zones  []string // zone number-1 → zone; never shrinks (interface names)
	zoneNo map[string]uint16
	srvs   []netip.AddrPort // serving address number-1 → address; never shrinks (the host's own)
	srvNo  map[netip.AddrPort]uint32

	seed maphash.Seed
	buf  store.Lease // all's reused lease
	// decodes counts decode calls (tests: what a walk costs, untimed).
	decodes uint64

	// Pinning (listings, see pin): while pins > 0 a deleted lease's slot
	// keeps its content and its owner number stays taken; both wait in
	// pend and pendOwners until the last unpin. pinEpoch changes when a
	// pin is broken (too much waiting: pinMax).
	pins       int
	pinEpoch   uint64
	pend       []uint32
	pendOwners []uint32
}

const (
	pageShift = 10
	pageLen   = 1 << pageShift
	pageMask  = pageLen - 1
)

// caddr is a netip.Addr without its pointer: m is 0 (invalid), 1 (IPv4) or
// 2 (IPv6) in its low two bits and an interned zone number above them.
type caddr struct {
	a [16]byte
	m uint16
}

const maxZones = 1<<14 - 1

// rec is one lease in the slab. It holds no pointer.
type rec struct {
	exp, created int64  // Unix ns; minInt64 = zero time
	owner        uint32 // owner number
	srv          uint32 // serving address number; 0 = invalid
	nextTup      uint32 // next lease on the same tuple (free list: next free slot)
	nextExt      uint32 // next lease holding the same external endpoint
	hpos         uint32 // position in the expiry heap
	iaddr, eaddr caddr
	remote       caddr
	client       caddr
	iport, eport uint16
	rport, cport uint16
	nonce        [12]byte
	proto        uint8
	kind         uint8
	flags        uint8
	in4          uint32 // position in byIn4's list of its internal IPv4 address (pool4.go); in the padding: rec stays 136 B
}

const (
	fLive   = 1 << iota // the slot holds a lease
	fExtra              // extra[slot] exists
	fThird              // ThirdParty
	fPrefer             // PreferFailure
	fIval               // in ival6
)

// extra is the variable part of a lease, kept only when not empty.
type extra struct {
	filters []store.Filter
	desc    string
}

// hitem is an expiry heap entry.
type hitem struct {
	at  int64
	ref uint32
}

const zeroTime = -1 << 63

func newTable() *table {
	return &table{
		extra:   map[uint32]extra{},
		held4:   map[port4]*portBits{},
		byIn4:   map[[4]byte][]uint32{},
		on6:     map[[16]byte]int32{},
		ival6:   map[uint32][]uint32{},
		byOwner: map[string]int{},
		ownerNo: map[string]uint32{},
		zoneNo:  map[string]uint16{},
		srvNo:   map[netip.AddrPort]uint32{},
		seed:    maphash.MakeSeed(),
	}
}

// grow sizes an empty table's indexes for n leases (restart): growing a
// hash table of a million entries step by step rehashes it ~20 times.
func (t *table) grow(n int) {
	if t.len() > 0 || n == 0 {
		return
	}
	t.byKey.size(n)
	t.byTup.size(n)
	t.byExt.size(n)
	t.exp = make([]hitem, 0, n)
	t.pages = make([][]rec, 0, (n+pageLen-1)/pageLen)
}

func tupleOf(k store.Key) tuple {
	return tuple{proto: k.Protocol, addr: k.InternalAddr, port: k.InternalPort}
}

func endpointOf(l *store.Lease) endpoint {
	return endpoint{addr: l.ExternalAddr, proto: l.Protocol, port: l.ExternalPort}
}

func (t *table) len() int { return t.n }

func (t *table) rec(ref uint32) *rec {
	return &t.pages[(ref-1)>>pageShift][(ref-1)&pageMask]
}

// --- encoding ---

// enc encodes a; with intern false an unknown zone reports false (a lookup
// of an address no lease has).
func (t *table) enc(a netip.Addr, intern bool) (caddr, bool) {
	var c caddr
	switch {
	case !a.IsValid():
		return c, true
	case a.Is4():
		b := a.As4()
		copy(c.a[:], b[:])
		c.m = 1
		return c, true
	}
	c.a, c.m = a.As16(), 2
	z := a.Zone()
	if z == "" {
		return c, true
	}
	n, ok := t.zoneNo[z]
	if !ok {
		if len(t.zones) >= maxZones {
			// Past maxZones (interface names: never in practice) the
			// zone is dropped rather than refusing the lease, and a
			// lookup drops it as the lease's was.
			return c, true
		}
		if !intern {
			// No lease has this zone. This returned true with the zone
			// dropped: a lookup of fe80::1%eth1 found fe80::1's lease
			// (review h/revrq2, TestMappingsOfMatchesWalk).
			return c, false
		}
		t.zones = append(t.zones, z)
		n = uint16(len(t.zones))
		t.zoneNo[z] = n
	}
	c.m |= n << 2
	return c, true
}

func (t *table) dec(c caddr) netip.Addr {
	switch c.m & 3 {
	case 0:
		return netip.Addr{}
	case 1:
		return netip.AddrFrom4([4]byte(c.a[:4]))
	}
	a := netip.AddrFrom16(c.a)
	if z := c.m >> 2; z != 0 {
		a = a.WithZone(t.zones[z-1])
	}
	return a
}

func encTime(tm time.Time) int64 {
	if tm.IsZero() {
		return zeroTime
	}
	return tm.UnixNano()
}

func decTime(n int64) time.Time {
	if n == zeroTime {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

func (t *table) ownerOf(id string) uint32 {
	if n, ok := t.ownerNo[id]; ok {
		return n
	}
	var n uint32
	if k := len(t.ownFree); k > 0 {
		n = t.ownFree[k-1]
		t.ownFree = t.ownFree[:k-1]
		t.owners[n] = id
	} else {
		n = uint32(len(t.owners))
		t.owners = append(t.owners, id)
	}
	t.ownerNo[id] = n
	return n
}

func (t *table) srvOf(a netip.AddrPort) uint32 {
	if a == (netip.AddrPort{}) {
		return 0
	}
	if n, ok := t.srvNo[a]; ok {
		return n
	}
	t.srvs = append(t.srvs, a)
	n := uint32(len(t.srvs))
	t.srvNo[a] = n
	return n
}

// encode fills r from l, interning what it must. The links and heap
// position are left alone.
func (t *table) encode(r *rec, l *store.Lease) {
	r.exp, r.created = encTime(l.Expires), encTime(l.Created)
	r.owner = t.ownerOf(l.Owner)
	r.srv = t.srvOf(l.ServerAddr)
	r.iaddr, _ = t.enc(l.InternalAddr, true)
	r.eaddr, _ = t.enc(l.ExternalAddr, true)
	r.remote, _ = t.enc(l.Remote.Addr(), true)
	r.client, _ = t.enc(l.ClientAddr.Addr(), true)
	r.iport, r.eport, r.rport, r.cport = l.InternalPort, l.ExternalPort, l.Remote.Port(), l.ClientAddr.Port()
	r.nonce, r.proto, r.kind = l.Nonce, l.Protocol, uint8(l.Kind)
	r.flags = fLive
	if l.ThirdParty {
		r.flags |= fThird
	}
	if l.PreferFailure {
		r.flags |= fPrefer
	}
	if len(l.Filters) > 0 || l.Description != "" {
		r.flags |= fExtra
	}
}

// decode writes the lease in slot ref to l. Filters are shared with the
// table (as they were when the table held pointers): clone before changing.
func (t *table) decode(ref uint32, l *store.Lease) {
	t.decodes++
	r := t.rec(ref)
	*l = store.Lease{
		Key: store.Key{
			Owner:        t.owners[r.owner],
			InternalAddr: t.dec(r.iaddr),
			InternalPort: r.iport,
			Protocol:     r.proto,
		},
		ExternalAddr:  t.dec(r.eaddr),
		ExternalPort:  r.eport,
		Created:       decTime(r.created),
		Expires:       decTime(r.exp),
		Nonce:         r.nonce,
		Kind:          store.Kind(r.kind),
		ThirdParty:    r.flags&fThird != 0,
		PreferFailure: r.flags&fPrefer != 0,
	}
	if r.remote.m != 0 || r.rport != 0 {
		l.Remote = netip.AddrPortFrom(t.dec(r.remote), r.rport)
	}
	if r.client.m != 0 || r.cport != 0 {
		l.ClientAddr = netip.AddrPortFrom(t.dec(r.client), r.cport)
	}
	if r.srv != 0 {
		l.ServerAddr = t.srvs[r.srv-1]
	}
	if r.flags&fExtra != 0 {
		x := t.extra[ref]
		l.Filters, l.Description = x.filters, x.desc
	}
}

// --- hashing ---

// The index kinds; each hashes and compares its own fields of a rec.
const (
	ixKey = iota
	ixTup
	ixExt
)

func putAddr(b []byte, c caddr) {
	copy(b, c.a[:])
	b[16], b[17] = byte(c.m), byte(c.m>>8)
}

func (t *table) hash(kind int, r *rec) uint64 {
	var b [48]byte
	switch kind {
	case ixKey:
		putAddr(b[:], r.iaddr)
		putAddr(b[18:], r.remote)
		b[36], b[37], b[38], b[39] = byte(r.owner), byte(r.owner>>8), byte(r.owner>>16), byte(r.owner>>24)
		b[40], b[41], b[42], b[43], b[44] = byte(r.iport), byte(r.iport>>8), byte(r.rport), byte(r.rport>>8), r.proto
		return maphash.Bytes(t.seed, b[:45])
	case ixTup:
		putAddr(b[:], r.iaddr)
		b[18], b[19], b[20] = byte(r.iport), byte(r.iport>>8), r.proto
		return maphash.Bytes(t.seed, b[:21])
	}
	putAddr(b[:], r.eaddr)
	b[18], b[19], b[20] = byte(r.eport), byte(r.eport>>8), r.proto
	return maphash.Bytes(t.seed, b[:21])
}

func same(kind int, a, b *rec) bool {
	switch kind {
	case ixKey:
		return a.owner == b.owner && a.iaddr == b.iaddr && a.iport == b.iport && a.proto == b.proto &&
			a.remote == b.remote && a.rport == b.rport
	case ixTup:
		return a.iaddr == b.iaddr && a.iport == b.iport && a.proto == b.proto
	}
	return a.eaddr == b.eaddr && a.eport == b.eport && a.proto == b.proto
}

// index is an open-addressing hash table (linear probing, backward-shift
// deletion) of slot refs; 0 is an empty bucket. The key of an entry is in
// its slot, so the index holds 4 bytes a bucket and no pointer. A bucket's
// top tagBits bits are bits of its key's hash: a probe passes buckets of
// other keys without reading their slots (each a likely cache miss at
// 1 000 000 leases) but one time in 64.
type index struct {
	b []uint32
	n int
	// old is the previous bucket array while a rehash moves it into b a
	// few buckets at a time (each add and remove moves migrateStep); nil
	// otherwise. old[:mig] is empty; oldN entries are left in it. A lookup
	// that finds its entry in old moves it to b first, so every bucket
	// index handed out is one of b.
	//
	// Rehashing all at once stalled the engine whenever the table doubled:
	// three indexes of 98 304 leases took 25-30 ms (open-loop p99 at 80 %
	// of the max rate), a million ~0.3 s.
	old  []uint32
	oldN int
	mig  int
}

// migrateStep is how many old buckets each add or remove moves: with 8,
// the old array is empty long before b is 3/4 full again (b has twice
// its buckets).
const migrateStep = 8

const (
	tagBits = 6
	refBits = 32 - tagBits
	refMask = 1<<refBits - 1 // the table holds at most refMask leases (67 108 863)
)

func tagOf(h uint64) uint32 { return uint32(h>>(64-tagBits)) << refBits }

// entries yields every bucket of b and, during a rehash, of old (empty
// ones too).
func (x *index) entries() iter.Seq[uint32] {
	return func(yield func(uint32) bool) {
		for _, arr := range [2][]uint32{x.b, x.old} {
			for _, e := range arr {
				if !yield(e) {
					return
				}
			}
		}
	}
}

// ref is the slot ref in bucket i.
func (x *index) ref(i int) uint32 { return x.b[i] & refMask }

func (x *index) size(n int) {
	c := 8
	for c*3/4 < n {
		c *= 2
	}
	if c > len(x.b) {
		x.b = make([]uint32, c)
		x.n = 0
		x.old, x.oldN, x.mig = nil, 0, 0
	}
}

func (t *table) ix(kind int) *index {
	switch kind {
	case ixKey:
		return &t.byKey
	case ixTup:
		return &t.byTup
	}
	return &t.byExt
}

// find returns the bucket of the entry whose slot matches q's kind fields,
// or -1.
func (t *table) find(kind int, q *rec) int {
	x := t.ix(kind)
	if x.n+x.oldN == 0 {
		return -1
	}
	h := t.hash(kind, q)
	if i := t.probe(kind, x.b, h, q); i >= 0 || x.old == nil {
		return i
	}
	j := t.probe(kind, x.old, h, q)
	if j < 0 {
		return -1
	}
	return t.moveOld(kind, j)
}

// probe looks for q (hash h) in bucket array b.
func (t *table) probe(kind int, b []uint32, h uint64, q *rec) int {
	mask := len(b) - 1
	tag := tagOf(h)
	for i := int(h) & mask; ; i = (i + 1) & mask {
		e := b[i]
		if e == 0 {
			return -1
		}
		if e&^refMask == tag && same(kind, t.rec(e&refMask), q) {
			return i
		}
	}
}

// bucket returns the bucket holding ref itself.
func (t *table) bucket(kind int, ref uint32) int {
	x := t.ix(kind)
	h := t.hash(kind, t.rec(ref))
	if i := refAt(x.b, h, ref); i >= 0 {
		return i
	}
	if x.old != nil {
		if j := refAt(x.old, h, ref); j >= 0 {
			return t.moveOld(kind, j)
		}
	}
	panic("server: lease table index lost a slot")
}

func refAt(b []uint32, h uint64, ref uint32) int {
	mask := len(b) - 1
	for i := int(h) & mask; ; i = (i + 1) & mask {
		switch b[i] & refMask {
		case ref:
			return i
		case 0:
			return -1
		}
	}
}

// add puts ref in the index; no entry with its key may be there.
func (t *table) add(kind int, ref uint32) {
	x := t.ix(kind)
	t.migrate(kind)
	if (x.n+1)*4 > len(x.b)*3 {
		if x.old != nil {
			t.finishMigration(kind) // not reached with migrateStep ≥ 2
		}
		x.old, x.oldN, x.mig = x.b, x.n, 0
		x.b, x.n = make([]uint32, max(len(x.b)*2, 8)), 0
		if x.oldN == 0 {
			x.old = nil
		}
	}
	h := t.hash(kind, t.rec(ref))
	x.b[place(x.b, h)] = ref | tagOf(h)
	x.n++
}

// place returns the free bucket of b where an entry of hash h goes.
func place(b []uint32, h uint64) int {
	mask := len(b) - 1
	i := int(h) & mask
	for b[i] != 0 {
		i = (i + 1) & mask
	}
	return i
}

// moveOld moves the entry in old bucket j to b and returns its new bucket.
func (t *table) moveOld(kind int, j int) int {
	x := t.ix(kind)
	e := x.old[j]
	t.removeIn(kind, x.old, j)
	x.oldN--
	i := place(x.b, t.hash(kind, t.rec(e&refMask)))
	x.b[i] = e // the tag is the key's hash's: unchanged
	x.n++
	if x.oldN == 0 {
		x.old, x.mig = nil, 0
	}
	return i
}

// migrate moves up to migrateStep old buckets' entries to b.
func (t *table) migrate(kind int) {
	x := t.ix(kind)
	for steps := 0; x.old != nil && steps < migrateStep; steps++ {
		for x.mig < len(x.old) && x.old[x.mig] == 0 {
			x.mig++
		}
		if x.mig == len(x.old) {
			x.old, x.oldN, x.mig = nil, 0, 0 // oldN was 0 already
			return
		}
		// Removing from old shifts later entries back, never below mig
		// (old[:mig] is empty, so no run of entries reaches into it).
		t.moveOld(kind, x.mig)
	}
}

func (t *table) finishMigration(kind int) {
	for x := t.ix(kind); x.old != nil; {
		t.migrate(kind)
	}
}

// remove empties bucket i of b, shifting back the entries after it that
// would otherwise no longer be found.
func (t *table) remove(kind int, i int) {
	x := t.ix(kind)
	t.removeIn(kind, x.b, i)
	x.n--
	t.migrate(kind)
}

func (t *table) removeIn(kind int, b []uint32, i int) {
	mask := len(b) - 1
	for j := (i + 1) & mask; b[j] != 0; j = (j + 1) & mask {
		h := int(t.hash(kind, t.rec(b[j]&refMask))) & mask
		// The entry at j stays if its home h lies cyclically in (i, j].
		if (i < j && i < h && h <= j) || (i > j && (h > i || h <= j)) {
			continue
		}
		b[i] = b[j]
		i = j
	}
	b[i] = 0
}

// --- chains ---

func (r *rec) next(kind int) *uint32 {
	if kind == ixTup {
		return &r.nextTup
	}
	return &r.nextExt
}

// link appends ref to the chain of its tuple or endpoint (kind ixTup or
// ixExt). Oldest first: the head is who holds an endpoint (holder).
func (t *table) link(kind int, ref uint32) {
	r := t.rec(ref)
	*r.next(kind) = 0
	i := t.find(kind, r)
	if i < 0 {
		t.add(kind, ref)
		if kind == ixExt {
			t.held4Set(r)
		}
		return
	}
	p := t.rec(t.ix(kind).ref(i))
	for *p.next(kind) != 0 {
		p = t.rec(*p.next(kind))
	}
	*p.next(kind) = ref
}

func (t *table) unlink(kind int, ref uint32) {
	r := t.rec(ref)
	x := t.ix(kind)
	i := t.find(kind, r)
	head := x.ref(i)
	if head == ref {
		if nx := *r.next(kind); nx != 0 {
			x.b[i] = nx | x.b[i]&^refMask // same key: same bucket, same tag
		} else {
			t.remove(kind, i)
			if kind == ixExt {
				t.held4Clear(r)
			}
		}
		return
	}
	p := t.rec(head)
	for *p.next(kind) != ref {
		p = t.rec(*p.next(kind))
	}
	*p.next(kind) = *r.next(kind)
}

// --- expiry heap (4-ary, indexed by slot) ---

func (t *table) hset(i int, it hitem) {
	t.exp[i] = it
	t.rec(it.ref).hpos = uint32(i)
}

func (t *table) hup(i int) {
	it := t.exp[i]
	for i > 0 {
		p := (i - 1) / 4
		if t.exp[p].at <= it.at {
			break
		}
		t.hset(i, t.exp[p])
		i = p
	}
	t.hset(i, it)
}

func (t *table) hdown(i int) {
	it := t.exp[i]
	n := len(t.exp)
	for {
		c := 4*i + 1
		if c >= n {
			break
		}
		m := c
		for k := c + 1; k < min(c+4, n); k++ {
			if t.exp[k].at < t.exp[m].at {
				m = k
			}
		}
		if t.exp[m].at >= it.at {
			break
		}
		t.hset(i, t.exp[m])
		i = m
	}
	t.hset(i, it)
}

func (t *table) hremove(i int) {
	last := len(t.exp) - 1
	if i != last {
		moved := t.exp[last]
		t.exp = t.exp[:last]
		t.hset(i, moved)
		t.hdown(i)
		t.hup(int(t.rec(moved.ref).hpos))
		return
	}
	t.exp = t.exp[:last]
}

// --- the table's operations ---

// keyRec is a query rec for k; false if no lease can have that key (its
// owner or a zone was never seen).
func (t *table) keyRec(k store.Key) (rec, bool) {
	var q rec
	n, ok := t.ownerNo[k.Owner]
	if !ok {
		return q, false
	}
	q.owner = n
	q.proto, q.iport, q.rport = k.Protocol, k.InternalPort, k.Remote.Port()
	var ok1, ok2 bool
	q.iaddr, ok1 = t.enc(k.InternalAddr, false)
	q.remote, ok2 = t.enc(k.Remote.Addr(), false)
	return q, ok1 && ok2
}

func (t *table) lookup(k store.Key) uint32 {
	q, ok := t.keyRec(k)
	if !ok {
		return 0
	}
	i := t.find(ixKey, &q)
	if i < 0 {
		return 0
	}
	return t.byKey.ref(i)
}

// get returns a copy of the lease at k.
func (t *table) get(k store.Key) (*store.Lease, bool) {
	ref := t.lookup(k)
	if ref == 0 {
		return nil, false
	}
	l := new(store.Lease)
	t.decode(ref, l)
	return l, true
}

// getInto decodes the lease at k into l, as get but without allocating
// one (tx.changes reads every lease a batch wrote).
func (t *table) getInto(k store.Key, l *store.Lease) bool {
	ref := t.lookup(k)
	if ref == 0 {
		return false
	}
	t.decode(ref, l)
	return true
}

// put inserts or replaces a lease. The table keeps its own copy (Filters
// shared: the caller must not change them afterwards).
func (t *table) put(l store.Lease) {
	t.insert(&l)
}

// insert is put by pointer (restore: no 288-byte copy per lease).
func (t *table) insert(l *store.Lease) {
	if ref := t.lookup(l.Key); ref != 0 {
		t.delRef(ref)
	}
	// While pinned, a renewal (delete + insert) must not move a lease into a
	// free slot behind a walk's cursor (all, announceTargets): take a new one.
	ref := t.free
	if ref != 0 && t.pins == 0 {
		t.free = t.rec(ref).nextTup
	} else {
		ref = 0
		if t.top == refMask {
			panic("server: lease table full (67 108 863 leases)")
		}
		if t.top&pageMask == 0 && int(t.top>>pageShift) == len(t.pages) {
			t.pages = append(t.pages, make([]rec, pageLen))
		}
		t.top++
		ref = t.top
	}
	r := t.rec(ref)
	t.encode(r, l)
	if r.flags&fExtra != 0 {
		t.extra[ref] = extra{filters: l.Filters, desc: l.Description}
	}
	t.byOwner[l.Owner]++
	t.add(ixKey, ref)
	t.link(ixTup, ref)
	t.link(ixExt, ref)
	t.in4Add(ref)
	t.on6Add(r)
	t.ivalAdd(ref, l)
	t.exp = append(t.exp, hitem{at: r.exp, ref: ref})
	t.hup(len(t.exp) - 1)
	t.n++
}

// extend moves the expiry of the lease at k to at and changes nothing
// else: the slot, its index entries and its heap item stay, where put
// removes and re-inserts all of them (delRef and insert: 10 % of pcpd's
// CPU in the absorbed-renewal bench, BENCHMARKS.md item 25). It refuses
// (false) while a listing has the table pinned, since the listing reads
// slots outside the lock and a renewal must then leave the old slot as it
// was (pin), and when there is no such lease; the caller then puts.
func (t *table) extend(k store.Key, at time.Time) bool {
	if t.pins > 0 {
		return false
	}
	ref := t.lookup(k)
	if ref == 0 {
		return false
	}
	r := t.rec(ref)
	old := r.exp
	r.exp = encTime(at)
	i := int(r.hpos)
	t.exp[i].at = r.exp
	if r.exp < old {
		t.hup(i)
	} else {
		t.hdown(i)
	}
	return true
}

// del removes a lease; it reports whether there was one.
func (t *table) del(k store.Key) bool {
	ref := t.lookup(k)
	if ref == 0 {
		return false
	}
	t.delRef(ref)
	return true
}

func (t *table) delRef(ref uint32) {
	r := t.rec(ref)
	t.remove(ixKey, t.bucket(ixKey, ref))
	t.unlink(ixTup, ref)
	t.unlink(ixExt, ref)
	t.in4Del(ref)
	t.on6Del(r)
	t.ivalDel(ref)
	t.hremove(int(r.hpos))
	t.n--
	id := t.owners[r.owner]
	ownerGone := false
	if t.byOwner[id]--; t.byOwner[id] <= 0 {
		delete(t.byOwner, id)
		delete(t.ownerNo, id)
		ownerGone = true
	}
	if t.pins > 0 {
		// A listing may still read it: keep the content, free later.
		r.flags &^= fLive
		t.pend = append(t.pend, ref)
		if ownerGone {
			t.pendOwners = append(t.pendOwners, r.owner)
		}
		if len(t.pend) > max(pinMax, t.n/4) {
			t.breakPins()
		}
		return
	}
	if ownerGone {
		t.freeOwner(r.owner)
	}
	t.freeSlot(ref)
}

func (t *table) freeOwner(n uint32) {
	t.owners[n] = ""
	t.ownFree = append(t.ownFree, n)
}

func (t *table) freeSlot(ref uint32) {
	r := t.rec(ref)
	if r.flags&fExtra != 0 {
		delete(t.extra, ref)
	}
	*r = rec{nextTup: t.free}
	t.free = ref
}

// pinMax is how many deleted slots a listing may hold back (renewals each
// delete one) before its pin is broken: ≈ 9 MB of slab. A listing's client
// that stops reading must not make the table grow without end.
const pinMax = 65536

// pin keeps the content of every slot as it is now until unpin, so a
// listing can read the leases of a moment outside the lock: a deleted
// lease's slot is not reused or cleared (put is a delete and an insert, so
// a renewed lease's old slot stays as it was too). It returns the epoch
// unpin and pinned need.
func (t *table) pin() uint64 {
	t.pins++
	return t.pinEpoch
}

// pinned reports whether the pin taken at epoch still holds.
func (t *table) pinned(epoch uint64) bool { return t.pins > 0 && t.pinEpoch == epoch }

// unpin ends a pin; the last one frees what waited.
func (t *table) unpin(epoch uint64) {
	if !t.pinned(epoch) {
		return // broken meanwhile
	}
	if t.pins--; t.pins == 0 {
		t.releasePins()
	}
}

// breakPins ends every pin at once (pinned reports false to their holders).
func (t *table) breakPins() {
	t.pins = 0
	t.pinEpoch++
	t.releasePins()
}

func (t *table) releasePins() {
	for _, ref := range t.pend {
		t.freeSlot(ref)
	}
	for _, n := range t.pendOwners {
		t.freeOwner(n)
	}
	t.pend, t.pendOwners = nil, nil
}

// onTuple returns copies of the leases on an internal tuple, oldest first.
func (t *table) onTuple(tp tuple) []*store.Lease {
	var out []*store.Lease
	for ref := range t.tupleRefs(tp) {
		l := new(store.Lease)
		t.decode(ref, l)
		out = append(out, l)
	}
	return out
}

// onTupleInto is onTuple into buf's leases (reused, grown as needed)
// instead of fresh ones: a written-through renewal's diff (tx.diff) reads
// the tuple's leases once a request, and each fresh copy is 288 bytes.
func (t *table) onTupleInto(tp tuple, buf []store.Lease) []store.Lease {
	buf = buf[:0]
	for ref := range t.tupleRefs(tp) {
		buf = append(buf, store.Lease{})
		t.decode(ref, &buf[len(buf)-1])
	}
	return buf
}

// tupleRefs yields the slots of the leases on an internal tuple, oldest
// first.
func (t *table) tupleRefs(tp tuple) iter.Seq[uint32] {
	return func(yield func(uint32) bool) {
		var q rec
		var ok bool
		if q.iaddr, ok = t.enc(tp.addr, false); !ok {
			return
		}
		q.proto, q.iport = tp.proto, tp.port
		i := t.find(ixTup, &q)
		if i < 0 {
			return
		}
		for ref := t.byTup.ref(i); ref != 0; ref = t.rec(ref).nextTup {
			if !yield(ref) {
				return
			}
		}
	}
}

// holder tells who holds an external endpoint: the internal address and
// port of its oldest holder (the engine gives an endpoint to one internal
// endpoint only), and how many leases hold it.
func (t *table) holder(e endpoint) (hold, bool) {
	var q rec
	var ok bool
	if q.eaddr, ok = t.enc(e.addr, false); !ok {
		return hold{}, false
	}
	q.proto, q.eport = e.proto, e.port
	i := t.find(ixExt, &q)
	if i < 0 {
		return hold{}, false
	}
	head := t.byExt.ref(i)
	r := t.rec(head)
	h := hold{addr: t.dec(r.iaddr), port: r.iport}
	for ref := head; ref != 0; ref = t.rec(ref).nextExt {
		h.n++
	}
	return h, true
}

// all yields every lease, in slot order. The lease is the table's scratch
// copy, overwritten at the next step (or by another walk): copy it to keep
// it. The table may change between steps (a walk that lets go of s.mu now
// and then, announceTargets): leases deleted meanwhile are not yielded,
// leases added meanwhile may or may not be.
func (t *table) all() iter.Seq2[store.Key, *store.Lease] {
	return func(yield func(store.Key, *store.Lease) bool) {
		for ref := uint32(1); ref <= t.top; ref++ {
			if t.rec(ref).flags&fLive == 0 {
				continue
			}
			t.decode(ref, &t.buf)
			if !yield(t.buf.Key, &t.buf) {
				return
			}
		}
	}
}

// mappingsOf appends to dst the live leases of owner on internal address
// a and protocol proto but its PEER ones: what a NAT-PMP delete of every
// mapping of a client (PMP-08) ends. It reads only each slot's owner,
// protocol, kind and address, decodes the matches alone, and stops once
// it has seen all of owner's leases (byOwner); an owner with none costs
// nothing. all() decoded every lease of the table: 15 ms a request at
// 65 536 leases, which a client sending them at its rate limit made the
// engine's whole time (review h/revreq, BenchmarkPMPDeleteAll).
func (t *table) mappingsOf(owner string, a netip.Addr, proto uint8, dst []store.Lease) []store.Lease {
	return t.leasesAt(owner, a, proto, false, dst)
}

// leasesAt is mappingsOf, with the PEER leases too when peers is set
// (overlapsHeld: every element on the address).
func (t *table) leasesAt(owner string, a netip.Addr, proto uint8, peers bool, dst []store.Lease) []store.Lease {
	left := t.byOwner[owner]
	n, ok := t.ownerNo[owner]
	if left <= 0 || !ok {
		return dst
	}
	if a.Is4() {
		// Only the address's own leases (byIn4, pool4.go), in slot order
		// as the walk below gives them: 1 ms a request at 262 144 leases
		// with the owner's last (BenchmarkPMPDeleteAll).
		refs := t.byIn4[a.As4()]
		slices.Sort(refs) // its order is not kept anyway
		for i, ref := range refs {
			t.rec(ref).in4 = uint32(i) // moved by the sort (in4Del)
			if r := t.rec(ref); r.owner == n && r.proto == proto && (peers || store.Kind(r.kind) != store.KindPeer) {
				dst = append(dst, store.Lease{})
				t.decode(ref, &dst[len(dst)-1])
			}
		}
		return dst
	}
	ca, ok := t.enc(a, false)
	if !ok {
		// A zone no lease has: with it dropped, ca was the unzoned
		// address, and its leases were taken for a's (review h/revrq2,
		// TestMappingsOfMatchesWalk).
		return dst
	}
	for ref := uint32(1); ref <= t.top && left > 0; ref++ {
		r := t.rec(ref)
		if r.flags&fLive == 0 || r.owner != n {
			continue
		}
		left--
		if r.proto != proto || r.iaddr != ca || (!peers && store.Kind(r.kind) == store.KindPeer) {
			continue
		}
		var l store.Lease
		t.decode(ref, &l)
		dst = append(dst, l)
	}
	return dst
}

// selected appends to dst the keys of the leases in slots from..from+n-1
// that are owner's (every lease's with all), and returns the slot to start
// the next step at (0: the walk reached the end), as unowned does.
func (t *table) selected(from uint32, n int, owner string, all bool, dst []store.Key) ([]store.Key, uint32) {
	return t.selectedBy(from, n, func(t *table, r *rec) bool { return all || t.owners[r.owner] == owner }, dst)
}

// selectedBy appends to dst the keys of the live leases in slots
// from..from+n-1 that match, and returns the slot to start the next step
// at (0: the walk reached the end), as selected does.
func (t *table) selectedBy(from uint32, n int, match func(*table, *rec) bool, dst []store.Key) ([]store.Key, uint32) {
	if from == 0 {
		from = 1
	}
	end := min(uint64(from)+uint64(n), uint64(t.top)+1)
	var l store.Lease
	for ref := from; uint64(ref) < end; ref++ {
		r := t.rec(ref)
		if r.flags&fLive == 0 || !match(t, r) {
			continue
		}
		t.decode(ref, &l)
		dst = append(dst, l.Key)
	}
	if end > uint64(t.top) {
		return dst, 0
	}
	return dst, uint32(end)
}

// liveIn calls fn with each live lease in slots from..from+n-1 (and its
// slot), in slot order, decoded into a scratch copy that fn must not keep, and returns
// the slot to start the next step at (0: the walk reached the end), as
// unowned does. fn returning false stops the walk before that lease: the
// slot returned is its own, so the next step starts with it. fn must not
// change the table; the table may change between steps (slots are not
// moved: a lease added meanwhile in a slot already passed is not
// yielded, one deleted meanwhile is not yielded).
func (t *table) liveIn(from uint32, n int, fn func(ref uint32, l *store.Lease) bool) uint32 {
	if from == 0 {
		from = 1
	}
	end := min(uint64(from)+uint64(n), uint64(t.top)+1)
	var l store.Lease
	for ref := from; uint64(ref) < end; ref++ {
		if t.rec(ref).flags&fLive == 0 {
			continue
		}
		t.decode(ref, &l)
		if !fn(ref, &l) {
			return ref
		}
	}
	if end > uint64(t.top) {
		return 0
	}
	return uint32(end)
}

// unowned appends to dst the keys of the leases in slots from..from+n-1
// whose internal address own does not give to their owner, and returns the
// slot to start the next step at (0: the walk reached the end). It reads
// only the address and owner of a slot, not the whole lease, and looks an
// address up once for a run of leases on it (a client's leases tend to sit
// together), so a step of n slots costs about n lookups at worst.
func (t *table) unowned(from uint32, n int, own policy.Ownership, dst []store.Key) ([]store.Key, uint32) {
	if from == 0 {
		from = 1
	}
	end := min(uint64(from)+uint64(n), uint64(t.top)+1)
	var last caddr
	var lastOwner policy.Owner
	var lastOK, have bool
	for ref := from; uint64(ref) < end; ref++ {
		r := t.rec(ref)
		if r.flags&fLive == 0 {
			continue
		}
		if !have || r.iaddr != last {
			last, have = r.iaddr, true
			lastOwner, lastOK = own.Lookup(t.dec(r.iaddr))
		}
		if !lastOK || string(lastOwner.ID) != t.owners[r.owner] {
			var l store.Lease
			t.decode(ref, &l)
			dst = append(dst, l.Key)
		}
	}
	if end > uint64(t.top) {
		return dst, 0
	}
	return dst, uint32(end)
}

// expired lists the keys of every lease whose expiry is at or before now,
// earliest first. They stay in the table (and are listed again) until
// deleted.
func (t *table) expired(now time.Time) []store.Key {
	at := now.UnixNano()
	if len(t.exp) == 0 || t.exp[0].at > at {
		return nil
	}
	// The entries due form a subtree at the heap's root.
	var due []hitem
	stack := []int{0}
	for len(stack) > 0 {
		i := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if i >= len(t.exp) || t.exp[i].at > at {
			continue
		}
		due = append(due, t.exp[i])
		for c := 4*i + 1; c <= 4*i+4; c++ {
			stack = append(stack, c)
		}
	}
	slices.SortFunc(due, func(a, b hitem) int {
		if a.at != b.at {
			return cmp64(a.at, b.at)
		}
		return int(a.ref) - int(b.ref)
	})
	out := make([]store.Key, len(due))
	var l store.Lease
	for i, it := range due {
		t.decode(it.ref, &l)
		out[i] = l.Key
	}
	return out
}

func cmp64(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// next is the earliest expiry, if any.
func (t *table) next() (time.Time, bool) {
	if len(t.exp) == 0 {
		return time.Time{}, false
	}
	return decTime(t.exp[0].at), true
}

// installs emits an Install op for each pinhole of each lease, in no
// particular order; a pinhole leases on one tuple share (a PEER and a
// filtered MAP) once, with the latest expiry among them. A lease's expiry
// is until(l) (nil: l.Expires): the server gives the kernel view
// (kernelExpiry, an absorbed renewal's synced expiry); nothing is emitted
// for a pinhole whose expiry is less than a millisecond after now (before
// review h/revbigaudit, one for a millisecond: an absorbed renewal not
// flushed past its synced expiry got its element back, ended). It stops
// when emit returns false. emit must not change the table.
func (t *table) installs(now time.Time, until func(*store.Lease) time.Time, emit func(pinhole.Op) bool) {
	left := func(at time.Time) time.Duration { return max(at.Sub(now), time.Millisecond) }
	expiry := func(l *store.Lease) time.Time {
		if until == nil {
			return l.Expires
		}
		return until(l)
	}
	var l store.Lease
	type shared struct {
		p  pinhole.Pinhole
		at time.Time
	}
	var sh []shared
	for b := range t.byTup.entries() {
		head := b & refMask
		if head == 0 {
			continue
		}
		if t.rec(head).nextTup == 0 {
			// Nearly always: one lease on the tuple.
			t.decode(head, &l)
			at := expiry(&l)
			if at.Sub(now) < time.Millisecond {
				continue
			}
			for _, p := range pinholesOf(&l) {
				if !emit(pinhole.Op{Kind: pinhole.Install, Pinhole: p, Timeout: left(at)}) {
					return
				}
			}
			continue
		}
		sh = sh[:0]
		for ref := head; ref != 0; ref = t.rec(ref).nextTup {
			t.decode(ref, &l)
			at := expiry(&l)
			for _, p := range pinholesOf(&l) {
				i := slices.IndexFunc(sh, func(s shared) bool { return s.p == p })
				switch {
				case i < 0:
					sh = append(sh, shared{p, at})
				case at.After(sh[i].at):
					sh[i].at = at
				}
			}
		}
		for _, s := range sh {
			if s.at.Sub(now) < time.Millisecond {
				continue
			}
			if !emit(pinhole.Op{Kind: pinhole.Install, Pinhole: s.p, Timeout: left(s.at)}) {
				return
			}
		}
	}
}

// timeout is the kernel timeout of pinhole p of lease l: the latest expiry
// among the leases on l's tuple that hold p.
func (t *table) timeout(p pinhole.Pinhole, l *store.Lease, now time.Time) time.Duration {
	at := l.Expires
	for _, o := range t.onTuple(tupleOf(l.Key)) {
		if o.Expires.After(at) && slices.Contains(pinholesOf(o), p) {
			at = o.Expires
		}
	}
	return max(at.Sub(now), time.Millisecond)
}
