package server

import (
	"errors"
	"slices"
	"time"

	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/store"
)

// errKernelOverlap refuses a mapping whose FILTER or PEER element the
// kernel would hold beside another one of the same internal address in one
// order only (pinhole.Conflicts): answered NO_RESOURCES, as the kernel's
// refusal in the other order always was.
var errKernelOverlap = errors.New("a FILTER or PEER element would overlap another the kernel holds for this address in part (conflicting intervals)")

// overlapsHeld reports whether next, replacing prev (nil: a new lease),
// would add a kernel element that conflicts (pinhole.Conflicts) with
// another element of next's own or of another live lease on its address.
//
// Security and reliability (issue 9, h/hunt): the kernel's interval sets
// refuse an element whose first or last key lies inside one they hold,
// so a conflicting pair is accepted in one order and refused in the
// other. A client holding a PEER to [R]:4000 could then add a MAP with
// FILTER R/48 on the same port (accepted), and after a renewal of the
// PEER (a lease renewed moves to the end of its tuple's list) every
// re-install of all leases met them in the refused order: a repair after
// `nft flush ruleset` failed whole, every client's pinholes in the same
// transaction left out of the kernel at each retry, and a start with an
// empty kernel dropped the lease and reset the epoch for every client.
// Refusing the second of any conflicting pair, whichever it is, keeps
// every set of elements pcpd holds installable in any order.
//
// Only elements next adds are checked: a renewal that changes none costs
// nothing, and an unfiltered MAP or NAT-PMP mapping (hash sets only)
// returns at once. Candidates are the leases on next's tuple and, on
// IPv6, its protocol's all-ports tuple (whose element spans every port);
// an all-ports lease's are every lease of its owner on the address.
func (s *Server) overlapsHeld(now time.Time, prev, next *store.Lease) bool {
	if next.Kind != store.KindPeer && len(next.Filters) == 0 {
		return false
	}
	mine := appendPinholes(nil, next)
	var had []pinhole.Pinhole
	if prev != nil {
		had = appendPinholes(nil, prev)
	}
	var fresh []pinhole.Pinhole
	for _, p := range mine {
		if !slices.Contains(had, p) {
			fresh = append(fresh, p)
		}
	}
	if len(fresh) == 0 {
		return false
	}
	// Every fresh element one key (a PEER's, a FILTER of one remote and
	// port): two different one-key elements never overlap in part, so the
	// tuple's other PEERs are passed over undecoded. Before (review
	// h/revhunt, BenchmarkOverlapsHeld), each was decoded into a fresh
	// lease and compared: a new PEER's request on a tuple of 255 PEERs
	// cost 405-605 µs against 156-177 µs without the check.
	points := true
	for _, p := range fresh {
		points = points && onePoint(p)
	}
	conflicts := func(held []pinhole.Pinhole) bool {
		for _, p := range fresh {
			for _, q := range held {
				if pinhole.Conflicts(p, q) {
					return true
				}
			}
		}
		return false
	}
	if conflicts(mine) {
		return true
	}
	var held []pinhole.Pinhole
	other := func(l *store.Lease) bool {
		if l.Key == next.Key || !l.Expires.After(now) {
			return false
		}
		held = appendPinholes(held[:0], l)
		return conflicts(held)
	}
	var l store.Lease
	onTuple := func(tp tuple) bool {
		for ref := range s.tab.tupleRefs(tp) {
			if r := s.tab.rec(ref); points && store.Kind(r.kind) == store.KindPeer && r.rport != 0 && r.iport != 0 && r.eport != 0 {
				continue
			}
			s.tab.decode(ref, &l)
			if other(&l) {
				return true
			}
		}
		return false
	}
	k := next.Key
	switch {
	case k.InternalPort == 0 && k.Protocol != 0:
		for _, l := range s.tab.leasesAt(k.Owner, k.InternalAddr, k.Protocol, true, nil) {
			if other(&l) {
				return true
			}
		}
	default:
		if onTuple(tupleOf(k)) {
			return true
		}
		if k.InternalAddr.Is6() && k.InternalPort != 0 && onTuple(tuple{proto: k.Protocol, addr: k.InternalAddr}) {
			return true
		}
	}
	return false
}

// onePoint reports whether p's element is one key: one port, one remote
// address and one remote port.
func onePoint(p pinhole.Pinhole) bool {
	return p.RemotePrefix.IsSingleIP() && p.RemotePort != 0 && p.InternalPort != 0 && p.ExternalPort != 0
}
