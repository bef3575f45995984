package pinhole

import "net/netip"

// Conflicts reports whether the kernel may refuse to hold p and q at
// once: they are two different elements of one interval set (a FILTER's
// or a PEER's pinhole; for IPv4 NAPT also their SNAT companions) and the
// first or last key of one lies inside the other. The kernel's
// concatenated-range set (pipapo) refuses an element whose first or last
// key falls inside one it holds, unless it is the same element ("conflicting
// entry", ErrConflict), so such a pair goes in in one order only: a PEER
// to [2001:db8:5::]:4000 installed before a MAP with FILTER
// 2001:db8:5::/48 is held, the other way round it is refused, and a
// re-install of every lease (a repair after `nft flush ruleset`, a
// restore into an empty kernel) that meets them in the refused order
// fails: the whole transaction, other clients' pinholes in it too
// (issue 9, h/hunt). Elements of hash sets (unfiltered pinholes) never
// conflict: equal keys are the same element. p and q must be normalized
// (a lease's pinholes are).
func Conflicts(p, q Pinhole) bool {
	if p.Odd() || q.Odd() || p == q {
		return false
	}
	k := kindOf(p)
	if k != kindOf(q) {
		return false
	}
	switch k {
	case kindFilter, kindRedirect6Filter, kindNAPT4Filter, kindAddrFilter:
	default:
		return false
	}
	if overlapCorner(boxOf(k, p), boxOf(k, q)) {
		return true
	}
	// The SNAT companions (snat4_filter, keyed by the internal side).
	return k == kindNAPT4Filter && overlapCorner(snatBox(p), snatBox(q))
}

// box is an interval set element as per-field closed ranges: the point
// fields (an address, the protocol) are ranges of one.
type box struct {
	addr             netip.Addr
	proto            uint8
	portLo, portHi   uint16
	remLo, remHi     netip.Addr
	rportLo, rportHi uint16
}

// boxOf is p's element of set k as ranges (appendElement's fields).
func boxOf(k kind, p Pinhole) box {
	b := box{addr: p.InternalAddr}
	b.remLo, b.remHi = prefixRange(p.RemotePrefix)
	if k == kindAddrFilter {
		return b
	}
	port := p.InternalPort
	if k != kindFilter {
		b.addr, port = p.ExternalAddr, p.ExternalPort
	}
	b.proto = p.Protocol
	b.portLo, b.portHi = portRange(port)
	b.rportLo, b.rportHi = portRange(p.RemotePort)
	return b
}

// snatBox is a NAPT pinhole's snat4_filter companion as ranges.
func snatBox(p Pinhole) box {
	b := box{addr: p.InternalAddr, proto: p.Protocol}
	b.portLo, b.portHi = portRange(p.InternalPort)
	b.remLo, b.remHi = prefixRange(p.RemotePrefix)
	b.rportLo, b.rportHi = portRange(p.RemotePort)
	return b
}

// overlapCorner: a and b differ and a corner (first or last key) of one
// lies inside the other.
func overlapCorner(a, b box) bool {
	if a == b {
		return false
	}
	return b.holds(a.first()) || b.holds(a.last()) || a.holds(b.first()) || a.holds(b.last())
}

// corner is one key of a box: every field at its low or high end.
type corner struct {
	addr  netip.Addr
	proto uint8
	port  uint16
	rem   netip.Addr
	rport uint16
}

func (b box) first() corner { return corner{b.addr, b.proto, b.portLo, b.remLo, b.rportLo} }
func (b box) last() corner  { return corner{b.addr, b.proto, b.portHi, b.remHi, b.rportHi} }

// holds reports whether the key c matches b, field by field.
func (b box) holds(c corner) bool {
	return c.addr == b.addr && c.proto == b.proto &&
		b.portLo <= c.port && c.port <= b.portHi &&
		b.remLo.Compare(c.rem) <= 0 && c.rem.Compare(b.remHi) <= 0 &&
		b.rportLo <= c.rport && c.rport <= b.rportHi
}
