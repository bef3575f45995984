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
	return endpointOf(l), quarantine{owner: l.Owner, addr: l.InternalAddr, port: l.InternalPort, nonce: l.Nonce, until: now.Add(quarIdle(l.Protocol))}
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
		s.quar4.del(e, old)
	}
	s.quar[e] = q
	s.quarBy[q.owner] = append(s.quarBy[q.owner], e)
	s.quar4.put(e, q)
}

// quarDel ends e's quarantine, keeping quarBy in step.
func (s *Server) quarDel(e endpoint) {
	if old, ok := s.quar[e]; ok {
		s.quarUnlist(old.owner, e)
		s.quar4.del(e, old)
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

// Quarantines are durable (store/quarantine.go): every change to s.quar
// is written to the store in the same commit as the lease change that
// caused it, so a restart, a kill -9 included, keeps a freed port for its
// last holder as a running pcpd would (TestMAP22FreedPortQuarantine
// "deleted, then pcpd restarted"). The store's quarantines mirror s.quar:
// one record per external endpoint, so however many ports are freed and
// taken again, the store holds at most one quarantine per IPv4 port and
// protocol. An entry that ends when a request finds it over (usable) goes
// with that request's commit, or with the next one (quarDebt); restore
// drops the stored ones that ended while pcpd was down, and quarantines
// the ports of leases that expired meanwhile from their expiry
// (restoring.lapse) and of leases it can not put back (reconcile).

// storeQuar is e's quarantine q as the store keeps it.
func storeQuar(e endpoint, q quarantine) store.Quarantine {
	return store.Quarantine{
		Endpoint:     storeEndpoint(e),
		Owner:        q.owner,
		InternalAddr: q.addr,
		InternalPort: q.port,
		Nonce:        q.nonce,
		Until:        q.until,
	}
}

func storeEndpoint(e endpoint) store.Endpoint {
	return store.Endpoint{Addr: e.addr, Port: e.port, Protocol: e.proto}
}

// quarIdle is the MAP-22 quarantine time of a port of proto: the
// protocol's idle time.
func quarIdle(proto uint8) time.Duration {
	if proto == protoTCP {
		return 124 * time.Minute
	}
	return 2 * time.Minute
}

// appendQuarState appends e's current state to qc: its quarantine, or its
// end.
func (s *Server) appendQuarState(qc *store.QuarChange, e endpoint) {
	if q, ok := s.quar[e]; ok {
		qc.Put = append(qc.Put, storeQuar(e, q))
	} else {
		qc.Del = append(qc.Del, storeEndpoint(e))
	}
}

// quarChanges fills t.qc with what the store must write for the
// quarantines t touched (their current state, or with before their state
// before t) and, for those in the store's debt t did not touch, their
// current state. Nil when there is nothing to write.
func (t *tx) quarChanges(before bool) *store.QuarChange {
	qc := &t.qc
	clear(qc.Put)
	qc.Put, qc.Del = qc.Put[:0], qc.Del[:0]
	debt := t.s.quarDebt
	if len(t.qund) == 0 && len(debt) == 0 {
		return nil
	}
	if t.qseen == nil {
		t.qseen = map[endpoint]struct{}{}
	}
	clear(t.qseen)
	for _, u := range t.qund {
		if _, dup := t.qseen[u.e]; dup {
			continue // the first record holds the state before t
		}
		t.qseen[u.e] = struct{}{}
		switch {
		case !before:
			t.s.appendQuarState(qc, u.e)
		case u.had:
			qc.Put = append(qc.Put, storeQuar(u.e, u.prev))
		default:
			qc.Del = append(qc.Del, storeEndpoint(u.e))
		}
	}
	for e := range debt {
		if _, touched := t.qseen[e]; !touched {
			t.s.appendQuarState(qc, e)
		}
	}
	return qc
}

// oweQuar records that the store may not hold the state of the
// quarantines t touched: the next commit that succeeds writes it.
func (t *tx) oweQuar() {
	for _, u := range t.qund {
		t.s.quarDebt[u.e] = struct{}{}
	}
}

// restoreQuarantines brings the stored quarantines back once the table is
// whole, oldest first (the order the cap releases them in), and lists in
// r.qtouched those it drops: ended while pcpd was down, on an address no
// longer ours, on a port a restored lease holds, or beyond their owner's
// cap (the cap holds across a restart, also when it was lowered), and
// those it cuts to their idle time from now (the clock behind).
func (r *restoring) restoreQuarantines(qs []store.Quarantine) {
	s := r.s
	freed := func(q *store.Quarantine) time.Time { return q.Until.Add(-quarIdle(q.Protocol)) }
	slices.SortFunc(qs, func(a, b store.Quarantine) int { return freed(&a).Compare(freed(&b)) })
	for i := range qs {
		sq := &qs[i]
		e := endpoint{addr: sq.Addr, proto: sq.Protocol, port: sq.Port}
		_, held := s.tab.holder(e)
		if held || !sq.Until.After(r.now) || !e.addr.Is4() || e.addr != s.cfg.ExternalIPv4 {
			r.qtouched = append(r.qtouched, e)
			continue
		}
		until := sq.Until
		if most := r.now.Add(quarIdle(e.proto)); until.After(most) {
			// The clock is behind (or was stepped back): no quarantine
			// has more than its idle time left, as no restored lease has
			// more than the max lifetime (clampRestored). Unclamped, the
			// port stayed out of the pool for the clock's error too
			// (TestMAP22QuarantineClockBehindRestart).
			until = most
			r.qtouched = append(r.qtouched, e)
		}
		s.quarPut(e, quarantine{owner: sq.Owner, addr: sq.InternalAddr, port: sq.InternalPort, nonce: sq.Nonce, until: until})
	}
	for owner := range s.quarBy {
		s.quarCap(owner, r.now, func(e endpoint) {
			s.quarDel(e)
			r.qtouched = append(r.qtouched, e)
		})
	}
}
