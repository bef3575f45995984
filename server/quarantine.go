package server

import (
	"slices"
	"time"

	"github.com/pcpd/pcpd/store"
)

// MAP-22 keeps a freed IPv4 external port for its last holder for the
// protocol's idle time (124 min TCP, 2 min UDP). Unbounded, that let one
// client, never over its lease quota (MAP-15), map and delete one port
// after another and keep the whole IPv4 pool quarantined for two hours,
// so that every other client got NO_RESOURCES (TestMAP22QuarantineWithinQuota).
//
// A client's quarantined ports are therefore capped at its lease quota
// (--max-leases-per-client); past it, its oldest quarantined port is
// released (the one freed longest ago, closest to the end of its idle
// time anyway). One client then never holds more than twice its quota of
// external ports, leases and quarantine together, and starving the pool
// takes as many clients as exhausting it with leases would take half of.
// MAP-22's purpose stays: a client that loses or deletes mappings, even
// its whole quota at once (NAT-PMP "delete all", a restart), frees at most
// its quota before it re-maps, so it gets each port back; and a port it
// has just freed still goes to no one else. Counting quarantined ports
// against the lease quota instead would refuse (USER_EX_QUOTA) a client
// re-mapping after a delete for up to two hours, which MAP-22 is there to
// make smooth. A port a lease takes again leaves the quarantine (taken),
// so the cap counts free ports only.

// quarSet quarantines e for q.owner, recording the change in t's undo log.
func (t *tx) quarSet(e endpoint, q quarantine) {
	prev, had := t.s.quar[e]
	t.qund = append(t.qund, quarUndo{e: e, prev: prev, had: had})
	t.s.quarPut(e, q)
}

// quarDrop ends e's quarantine, recording the change in t's undo log.
func (t *tx) quarDrop(e endpoint) {
	prev, had := t.s.quar[e]
	if !had {
		return
	}
	t.qund = append(t.qund, quarUndo{e: e, prev: prev, had: had})
	t.s.quarDel(e)
}

// quarBound releases owner's oldest quarantined ports beyond its lease quota.
func (t *tx) quarBound(owner string) { t.s.quarCap(owner, t.now, t.quarDrop) }

// quarCap releases, with drop, owner's quarantined ports beyond its lease
// quota: first those whose quarantine has ended (an entry is otherwise
// removed only when a request probes its endpoint, and counted against the
// cap it released a live one: TestMAP22CapSkipsExpiredQuarantine), then
// the oldest. Under the cap it looks at nothing.
func (s *Server) quarCap(owner string, now time.Time, drop func(endpoint)) {
	limit := max(s.pol.MaxLeasesPerClient(), 1)
	if len(s.quarBy[owner]) <= limit {
		return
	}
	// Backwards over the list as it was: dropping entry i shifts only
	// the entries after it, already seen.
	l := s.quarBy[owner]
	for i := len(l) - 1; i >= 0; i-- {
		if e := l[i]; !s.quar[e].until.After(now) {
			drop(e)
		}
	}
	for len(s.quarBy[owner]) > limit {
		drop(s.quarBy[owner][0])
	}
}

// quarantineOf is the MAP-22 quarantine of the IPv4 external port l frees
// at now: for the protocol's idle time only l's client may reclaim it.
func quarantineOf(l *store.Lease, now time.Time) (endpoint, quarantine) {
	idle := 2 * time.Minute
	if l.Protocol == protoTCP {
		idle = 124 * time.Minute
	}
	return endpointOf(l), quarantine{owner: l.Owner, addr: l.InternalAddr, port: l.InternalPort, nonce: l.Nonce, until: now.Add(idle)}
}

// taken ends the quarantine of the external port l now holds: it is no
// longer free, and must not count against its client's cap.
func (t *tx) taken(l *store.Lease) {
	if !l.ExternalAddr.Is4() {
		return
	}
	t.quarDrop(endpointOf(l))
}

// quarPut sets e's quarantine, keeping quarBy in step. A replaced entry
// leaves its owner's list; the new one joins q.owner's as its newest (a
// rollback restoring an entry thus makes it the newest: it is released
// later than its age says, never earlier).
func (s *Server) quarPut(e endpoint, q quarantine) {
	if old, ok := s.quar[e]; ok {
		s.quarUnlist(old.owner, e)
	}
	s.quar[e] = q
	s.quarBy[q.owner] = append(s.quarBy[q.owner], e)
}

// quarDel ends e's quarantine, keeping quarBy in step.
func (s *Server) quarDel(e endpoint) {
	if old, ok := s.quar[e]; ok {
		s.quarUnlist(old.owner, e)
		delete(s.quar, e)
	}
}

func (s *Server) quarUnlist(owner string, e endpoint) {
	l := s.quarBy[owner]
	if i := slices.Index(l, e); i >= 0 {
		l = slices.Delete(l, i, i+1)
	}
	if len(l) == 0 {
		delete(s.quarBy, owner)
	} else {
		s.quarBy[owner] = l
	}
}
