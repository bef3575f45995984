package policy

import (
	"cmp"
	"encoding/binary"
	"math/bits"
	"net/netip"
	"slices"
)

// Prefix length limits below which a prefix confers no ownership: a peer
// with a default route (::/0, 0.0.0.0/0) or a huge aggregate must not own
// the internet. /32 is the smallest IPv6 allocation a RIR gives an ISP; /8
// still admits a whole RFC 1918 10.0.0.0/8 routed to a site-to-site peer.
const (
	MinOwnedBits6 = 32
	MinOwnedBits4 = 8
)

// u128 is an address in one 128-bit space: IPv6 as is, IPv4 as its
// IPv4-mapped form (::ffff:a.b.c.d), so both families share one table.
type u128 struct{ hi, lo uint64 }

func key(a netip.Addr) u128 {
	b := a.As16()
	return u128{binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])}
}

func (u u128) less(v u128) bool { return u.hi < v.hi || (u.hi == v.hi && u.lo < v.lo) }

func (u u128) addOne() (u128, bool) {
	lo, c := bits.Add64(u.lo, 1, 0)
	hi, c := bits.Add64(u.hi, 0, c)
	return u128{hi, lo}, c != 0
}

func (u u128) subOne() u128 {
	lo, b := bits.Sub64(u.lo, 1, 0)
	hi, _ := bits.Sub64(u.hi, 0, b)
	return u128{hi, lo}
}

func (u u128) addr() netip.Addr {
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], u.hi)
	binary.BigEndian.PutUint64(b[8:], u.lo)
	return netip.AddrFrom16(b)
}

// mask128 returns the host-part mask of a /n prefix in the 128-bit space.
func hostMask(n int) u128 {
	switch {
	case n <= 0:
		return u128{^uint64(0), ^uint64(0)}
	case n < 64:
		return u128{^uint64(0) >> n, ^uint64(0)}
	case n < 128:
		return u128{0, ^uint64(0) >> (n - 64)}
	}
	return u128{}
}

// span is a masked prefix as a closed range [first, last] in the 128-bit
// space, with its length in that space (IPv4 /n is /96+n).
type span struct {
	first, last u128
	bits        int
	owner       int32 // index into table.owners, or noOwner for a deliberate hole
}

func spanOf(p netip.Prefix) span {
	p = p.Masked()
	n := p.Bits()
	if p.Addr().Is4() {
		n += 96
	}
	f := key(p.Addr())
	m := hostMask(n)
	return span{first: f, last: u128{f.hi | m.hi, f.lo | m.lo}, bits: n}
}

const noOwner int32 = -1

// table is an immutable longest-prefix-match index: the prefixes, which are
// nested or disjoint, flattened into sorted elementary intervals, each
// labelled with its most specific owner. A lookup is one binary search over
// ~2n starts with no allocation and no lock; a refresh builds a new table and
// swaps a pointer.
type table struct {
	starts []u128  // starts[0] is always ::
	owner  []int32 // owner of [starts[i], starts[i+1])
	owners []Owner
	byID   map[OwnerID]int32
	// holes are the prefixes labelled noOwner (WireGuard's overlaps across
	// interfaces), in address order: Holes hands them to the kernel's
	// owner meter, which must not let the enclosing owner's range cover them.
	holes []netip.Prefix
	// ifaces, for ownership bound to interfaces (WireGuard), is one table
	// per interface, by kernel name, holding only the AllowedIPs of that
	// interface's peers (ownable ones, labelled with their peer; one
	// prefix of two peers of one interface, which WireGuard does not
	// allow, nobody's): what WireGuard's own source check on that
	// interface sees (findOn). Sub-tables share owners and have no
	// ifaces of their own. Nil for ownership bound to no interface
	// (static).
	ifaces map[string]*table
	// only is the kernel name of the one interface when ifaces has one
	// (the common case): its sub-table then labels every address as
	// this table does (no holes across interfaces), and findOn needs
	// only compare the name.
	only string
	// Per family, one exact-match map per prefix length present, longest
	// first: with the handful of lengths real configurations use, a lookup
	// is a few hash probes, where the binary search over 2n intervals costs
	// a cache miss per level. Nil when a family uses more than
	// maxHashLengths lengths; find then falls back to the search.
	len4, len6 []lengthMap
}

// lengthMap holds the prefixes of one length. Most keys fit in 64 bits
// (IPv4 in the low half, IPv6 up to /64 in the high half); those use a
// uint64-keyed map, which Go hashes faster and stores more densely.
type lengthMap struct {
	mask u128 // network mask of the length, in the 128-bit space
	half uint8
	m64  map[uint64]int32
	m128 map[u128]int32
}

const (
	keyBoth uint8 = iota // needs all 128 bits
	keyHi                // IPv6 /64 or shorter: the low half is masked off
	keyLo                // IPv4: the high half is always zero
)

// maxHashLengths bounds the probes of a hashed lookup.
const maxHashLengths = 8

// build flattens spans (exact duplicates already resolved by the caller)
// into a table.
func build(owners []Owner, spans []span) *table {
	sortSpans(spans)
	t := &table{
		starts: make([]u128, 0, 2*len(spans)+1),
		owner:  make([]int32, 0, 2*len(spans)+1),
		owners: owners,
		byID:   make(map[OwnerID]int32, len(owners)),
	}
	for i, o := range owners {
		t.byID[o.ID] = int32(i)
	}
	emit := func(at u128, o int32) {
		if n := len(t.starts); n > 0 && t.starts[n-1] == at {
			t.starts, t.owner = t.starts[:n-1], t.owner[:n-1]
		}
		if n := len(t.owner); n > 0 && t.owner[n-1] == o {
			return
		}
		t.starts = append(t.starts, at)
		t.owner = append(t.owner, o)
	}
	emit(u128{}, noOwner)
	type open struct {
		last  u128
		owner int32
	}
	var stack []open
	top := func() int32 {
		if len(stack) == 0 {
			return noOwner
		}
		return stack[len(stack)-1].owner
	}
	// closeUntil pops every open span that ends before at, handing the
	// range after it back to the span that encloses it.
	closeUntil := func(at u128, all bool) {
		for len(stack) > 0 && (all || stack[len(stack)-1].last.less(at)) {
			s := stack[len(stack)-1]
			stack = stack[:len(stack)-1]
			if next, overflow := s.last.addOne(); !overflow {
				emit(next, top())
			}
		}
	}
	for _, s := range spans {
		closeUntil(s.first, false)
		emit(s.first, s.owner)
		stack = append(stack, open{s.last, s.owner})
		if s.owner == noOwner {
			t.holes = append(t.holes, prefixOf(s.first, s.bits))
		}
	}
	closeUntil(u128{}, true)
	t.len4, t.len6 = hashByLength(spans, true), hashByLength(spans, false)
	return t
}

// hashByLength indexes one family's spans by prefix length, or returns nil
// if they use more than maxHashLengths lengths.
func hashByLength(spans []span, v4 bool) []lengthMap {
	byLen := make(map[int][]span)
	for _, s := range spans {
		if isV4Span(s) != v4 {
			continue
		}
		if _, ok := byLen[s.bits]; !ok && len(byLen) == maxHashLengths {
			return nil
		}
		byLen[s.bits] = append(byLen[s.bits], s)
	}
	out := make([]lengthMap, 0, len(byLen))
	for n, ss := range byLen {
		h := hostMask(n)
		l := lengthMap{mask: u128{^h.hi, ^h.lo}}
		switch {
		case v4:
			l.half = keyLo
		case n <= 64:
			l.half = keyHi
		}
		if l.half == keyBoth {
			l.m128 = make(map[u128]int32, len(ss))
		} else {
			l.m64 = make(map[uint64]int32, len(ss))
		}
		for _, s := range ss {
			switch l.half {
			case keyLo:
				l.m64[s.first.lo] = s.owner
			case keyHi:
				l.m64[s.first.hi] = s.owner
			default:
				l.m128[s.first] = s.owner
			}
		}
		out = append(out, l)
	}
	// Longest first: the first hit is the longest match.
	slices.SortFunc(out, func(a, b lengthMap) int { return cmp.Compare(b.mask.ones(), a.mask.ones()) })
	return out
}

func (u u128) ones() int { return bits.OnesCount64(u.hi) + bits.OnesCount64(u.lo) }

// isV4Span reports whether a span lies in the IPv4-mapped range (IPv6
// spans never reach into it: checkOwnedPrefix rejects those).
func isV4Span(s span) bool { return s.bits >= 96 && s.first.hi == 0 && s.first.lo>>32 == 0xffff }

// sortSpans orders spans by first address, enclosing (shorter) ones first.
func sortSpans(spans []span) {
	slices.SortFunc(spans, func(a, b span) int {
		if a.first != b.first {
			if a.first.less(b.first) {
				return -1
			}
			return 1
		}
		return cmp.Compare(a.bits, b.bits)
	})
}

// find returns the owner index for a, or noOwner.
func (t *table) find(a netip.Addr) int32 {
	k := key(a)
	lens := t.len6
	if a.Is4() {
		lens = t.len4
	}
	if lens != nil {
		for i := range lens {
			l := &lens[i]
			var (
				o  int32
				ok bool
			)
			switch l.half {
			case keyLo:
				o, ok = l.m64[k.lo&l.mask.lo]
			case keyHi:
				o, ok = l.m64[k.hi&l.mask.hi]
			default:
				o, ok = l.m128[u128{k.hi & l.mask.hi, k.lo & l.mask.lo}]
			}
			if ok {
				return o
			}
		}
		return noOwner
	}
	return t.search(k)
}

// search finds k's owner by binary search over the intervals.
func (t *table) search(k u128) int32 {
	s := t.starts
	lo, hi := 0, len(s)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if k.less(s[m]) {
			hi = m
		} else {
			lo = m + 1
		}
	}
	return t.owner[lo-1]
}

func (t *table) lookup(a netip.Addr) (Owner, bool) {
	if !a.IsValid() || a.Is4In6() || a.Zone() != "" {
		return Owner{}, false
	}
	i := t.find(a)
	if i < 0 {
		return Owner{}, false
	}
	return t.owners[i], true
}

// findOn returns the owner index of a request from a that arrived on the
// interface whose kernel name is iface: a's owner (find), provided that
// owner's peer holds on iface an AllowedIP containing a, so that
// WireGuard's source check on iface took the packet as that peer's;
// noOwner otherwise. a must be valid, unmapped and unzoned.
//
// Checking the most specific AllowedIP of iface's peers is exact: a's
// owner P holds on iface a prefix containing a exactly when iface's most
// specific ownable prefix there is P's, since a more specific one of
// another peer of iface inside P's would make P's prefix (if on iface)
// lose WireGuard's match there, and one of P's more specific prefixes on
// another interface inside it is a hole (buildLocked), and a would have
// no owner at all. Prefixes too short to own are shorter than any owned
// one and never win. Ownership bound to no interface (t.ifaces nil:
// static) is find.
func (t *table) findOn(a netip.Addr, iface string) int32 {
	i := t.find(a)
	if i < 0 || t.ifaces == nil {
		return i
	}
	if t.only != "" {
		if iface != t.only {
			return noOwner
		}
		return i
	}
	if sub := t.ifaces[iface]; sub == nil || sub.find(a) != i {
		return noOwner
	}
	return i
}

// ownsOnSome reports whether a, whose owner in t is i (find(a) == i, i ≥
// 0), is i's on some interface there: findOn(a, k) == i for a kernel name
// k of t, tried first for prefer (the request's arrival interface). It is
// the ownership of a THIRD_PARTY target: the requester may name an
// address its peer holds on another served interface (the same peer on
// several interfaces is one owner, and it could send from that address
// there), but not one held only by a gone interface in its grace (no
// per-interface table: it counts for no request) or by a renamed one
// before its re-read (without). Ownership bound to no interface (static)
// is find.
func (t *table) ownsOnSome(a netip.Addr, i int32, prefer string) bool {
	if t.ifaces == nil || t.only != "" {
		// Static, or one interface whose sub-table is t.
		return true
	}
	if sub := t.ifaces[prefer]; sub != nil && sub.find(a) == i {
		return true
	}
	for k, sub := range t.ifaces {
		if k != prefer && sub.find(a) == i {
			return true
		}
	}
	return false
}

// without returns t with no per-interface table for the kernel names in
// names: findOn takes nothing arriving there as anybody's. Everything else
// (owners, spans, holes) is t's, shared.
func (t *table) without(names map[string]bool) *table {
	if t.ifaces == nil {
		return t
	}
	c := *t
	c.ifaces = make(map[string]*table, len(t.ifaces))
	for k, sub := range t.ifaces {
		if !names[k] {
			c.ifaces[k] = sub
		}
	}
	if names[c.only] {
		c.only = ""
	}
	return &c
}

func (t *table) lookupOn(a netip.Addr, iface string) (Owner, bool) {
	if !a.IsValid() || a.Is4In6() || a.Zone() != "" {
		return Owner{}, false
	}
	i := t.findOn(a, iface)
	if i < 0 {
		return Owner{}, false
	}
	return t.owners[i], true
}

// holesCopy returns the holes, safe to keep and modify.
func (t *table) holesCopy() []netip.Prefix { return slices.Clone(t.holes) }

func (t *table) snapshot() []Owner {
	out := make([]Owner, len(t.owners))
	for i, o := range t.owners {
		o.Prefixes = slices.Clone(o.Prefixes)
		out[i] = o
	}
	return out
}

// appendRange decomposes [a, b] into the fewest prefixes, reported in their
// natural family (IPv4 ranges inside ::ffff:0:0/96 as IPv4 prefixes).
func appendRange(out []netip.Prefix, a, b u128) []netip.Prefix {
	for {
		// The largest aligned block starting at a that does not pass b.
		n := 128 - trailingZeros(a)
		for n < 128 {
			m := hostMask(n)
			if !b.less(u128{a.hi | m.hi, a.lo | m.lo}) {
				break
			}
			n++
		}
		m := hostMask(n)
		end := u128{a.hi | m.hi, a.lo | m.lo}
		out = append(out, prefixOf(a, n))
		next, overflow := end.addOne()
		if overflow || b.less(next) {
			return out
		}
		a = next
	}
}

func trailingZeros(u u128) int {
	if u.lo != 0 {
		return bits.TrailingZeros64(u.lo)
	}
	if u.hi != 0 {
		return 64 + bits.TrailingZeros64(u.hi)
	}
	return 128
}

func prefixOf(a u128, n int) netip.Prefix {
	addr := a.addr()
	if addr.Is4In6() && n >= 96 {
		return netip.PrefixFrom(addr.Unmap(), n-96)
	}
	return netip.PrefixFrom(addr, n)
}
