package server

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/store"
)

// tx collects the state changes of one batch of requests: the lease table
// is changed at once (later requests of the batch see earlier ones), the
// kernel and the store only at commit, together: one Firewall.Apply and one
// Store.Commit for the whole batch (group commit), run at the same time. If
// either fails, the other is undone, the table is rolled back and the
// kernel restored, so an error changes nothing (HDR-06, choice (g)).
//
// A tx is reused from batch to batch (Server.spare): its slices keep their
// capacity, so a steady load stages its changes without allocating.
type tx struct {
	s    *Server
	now  time.Time
	ops  []pinhole.Op
	inv  []pinhole.Op // undo for ops, applied in reverse if the store fails
	undo []undoRec
	qund []quarUndo
	// retry: the request is handled again alone after its batch failed.
	retry bool
	// revoking: the tx ends leases whose owner no longer owns them
	// (revokeKeysLocked for the ownership sweep, revokeUnowned). Its
	// kernel changes stand if the store fails (commit): the store is owed
	// them (storeDebt), as an expiry's are.
	revoking bool
	// ended are leases removed for good (delete, revocation, expiry),
	// moved, or whose FILTERs narrowed (filtersNarrowed), as they were:
	// their connections are flushed after the commit, but for those a
	// live lease admits.
	ended []store.Lease
	// absorbs counts the renewals absorbed while t was open (absorb.go):
	// they are in the table, with no undo record.
	absorbs int

	// Scratch space of diff and commit, kept for the next batch.
	old, neu, tmp []pinhole.Pinhole
	dropped       []int       // indexes in inv of the filtered elements the tx deleted (diff)
	kprev         store.Lease // set's kernel view of a dirty lease
	others        []*store.Lease
	tup           []store.Lease // diff's copies of a tuple's leases; others points into it
	put           []store.Lease
	del           []store.Key
	seen          map[store.Key]struct{}
	qc            store.QuarChange      // quarChanges' result
	qcp           *store.QuarChange     // what storeCommit writes (&qc or nil)
	qseen         map[endpoint]struct{} // quarChanges' scratch
	storeErr      chan error
	storeDur      time.Duration
}

// undoRec is the state of the lease at key before a set: prev if had;
// dirty if it was an absorbed renewal's (Server.dirty), synced the expiry
// the kernel and the store held for it then.
type undoRec struct {
	key    store.Key
	had    bool
	dirty  bool
	prev   store.Lease
	synced time.Time
}

type quarUndo struct {
	e    endpoint
	prev quarantine
	had  bool
}

// begin starts a tx, reusing the one the last finished tx left behind.
func (s *Server) begin(now time.Time) *tx {
	t := s.spare
	if t == nil {
		t = &tx{s: s, storeErr: make(chan error, 1)}
	}
	s.spare = nil
	t.now = now
	return t
}

// release hands a finished (committed or rolled back) tx back for reuse.
// Nothing may use t afterwards.
func (s *Server) release(t *tx) {
	t.shrink()
	t.reset()
	t.retry, t.revoking = false, false
	s.spare = t
}

// maxKeptTx bounds the entries a released tx keeps in each buffer: far
// above a request batch's (a batch is cut at pinhole.MaxBatch kernel ops),
// so a steady load still stages its changes without allocating, while the
// buffers of a rare large tx (an operator or ownership revocation of many
// leases) are not kept for the daemon's life: a revocation of 1 000 000
// leases kept 1.5 GB (TestRestartRevokeKeepsNoBuffers).
const maxKeptTx = 4096

// shrink drops the buffers of t larger than maxKeptTx.
func (t *tx) shrink() {
	if cap(t.undo) > maxKeptTx || len(t.seen) > maxKeptTx {
		t.undo, t.seen = nil, nil // seen is sized from undo
	}
	if len(t.qseen) > maxKeptTx {
		t.qseen = nil
	}
	t.qc.Put, t.qc.Del = capped(t.qc.Put), capped(t.qc.Del)
	t.ended = capped(t.ended)
	t.ops, t.inv = capped(t.ops), capped(t.inv)
	t.qund = capped(t.qund)
	t.put, t.del = capped(t.put), capped(t.del)
	t.others, t.tup = capped(t.others), capped(t.tup)
	t.old, t.neu, t.tmp = capped(t.old), capped(t.neu), capped(t.tmp)
}

// capped is b, or nil if its capacity is over maxKeptTx.
func capped[E any](b []E) []E {
	if cap(b) > maxKeptTx {
		return nil
	}
	return b
}

// reset empties t, keeping its buffers. The leases in undo and ended are
// cleared so the buffers do not keep old descriptions and filters alive.
func (t *tx) reset() {
	clear(t.undo)
	clear(t.ended)
	clear(t.others)
	clear(t.tup)
	clear(t.put)
	clear(t.qc.Put)
	t.qcp = nil
	t.kprev = store.Lease{}
	t.absorbs = 0
	t.undo, t.qund, t.ops, t.inv, t.ended = t.undo[:0], t.qund[:0], t.ops[:0], t.inv[:0], t.ended[:0]
	t.put, t.del = t.put[:0], t.del[:0]
	t.dropped = t.dropped[:0]
}

// staged reports whether the tx changed the lease at key already (it has
// an undo record): such a lease is not committed yet.
func (t *tx) staged(key store.Key) bool {
	for i := range t.undo {
		if t.undo[i].key == key {
			return true
		}
	}
	return false
}

// mark is a position in the undo log: a request changed state iff the mark
// moved while it was handled.
func (t *tx) mark() int { return len(t.undo) }

func (t *tx) empty() bool { return len(t.undo) == 0 }

// set moves the lease at key from its current state to next (nil: deleted).
// The kernel always follows, expiry included: its element normally lapsed
// at the same moment, but one restored with a longer timeout (a restart
// with the clock behind) or re-added must not outlive the lease (LIFE-04);
// deleting an absent element is a no-op. ended says the lease ends for
// good (delete, revocation, expiry), so its connections are flushed too.
func (t *tx) set(key store.Key, next *store.Lease, ended bool) {
	t.undo = append(t.undo, undoRec{key: key})
	u := &t.undo[len(t.undo)-1]
	var prev, kprev *store.Lease
	if t.s.tab.getInto(key, &u.prev) {
		// The undo record holds its own copy: the table's may be reused
		// once the lease is replaced.
		u.had = true
		prev, kprev = &u.prev, &u.prev
		if at, ok := t.s.dirty[key]; ok {
			// An absorbed renewal's lease: the kernel still holds its
			// synced expiry, not the table's, and the diff must start
			// from what the kernel holds. This commit writes the lease
			// through, so it is no longer dirty; rollback marks it
			// again.
			u.dirty, u.synced = true, at
			delete(t.s.dirty, key)
			t.kprev = u.prev
			t.kprev.Expires = at
			kprev = &t.kprev
		}
	}
	t.diff(key, kprev, next)
	if next == nil {
		t.s.tab.del(key)
		if prev != nil {
			t.freed(prev)
			if ended {
				t.ended = append(t.ended, *prev)
			}
		}
	} else {
		t.s.tab.put(*next)
		t.taken(next)
		if prev != nil && endpointOf(prev) != endpointOf(next) {
			// A replacement that moved the mapping (a new nonce, PROTOCOL.md
			// choice (c)) frees its old external port as a delete would,
			// and ends its connections there (PMP-12; the flush leaves
			// alone what a live lease admits when it runs).
			t.freed(prev)
			t.ended = append(t.ended, *prev)
		} else if prev != nil && filtersNarrowed(prev.Filters, next.Filters) {
			// A renewal or replacement whose FILTERs admit fewer
			// remotes: the connections of those it no longer admits
			// end (the flush spares what a live lease, this one
			// included, admits). Before, they kept passing through
			// the guard's "ct state established accept" (issue 9).
			t.ended = append(t.ended, *prev)
		}
	}
}

// filtersNarrowed reports whether a mapping's FILTERs going from prev to
// next (none: every remote) drop a remote prev admitted: next has filters
// and one of prev's (or prev's "every remote") is inside none of next's.
// A filter of prev that only the union of several of next's covers counts
// as dropped: the flush then ends nothing more (what next admits is
// spared), at the cost of a walk. A filter of every remote (an IPv4
// 0.0.0.0/0, any port: the pcp package refuses FILTERs of the other
// family, and an IPv6 /0 clears) admits what none does: before (review
// h/revpeer), adding one to a mapping without FILTERs counted as a
// narrowing, a walk the reply waited for that could end nothing.
func filtersNarrowed(prev, next []store.Filter) bool {
	if len(next) == 0 || slices.ContainsFunc(next, func(g store.Filter) bool { return g.Prefix.Bits() == 0 && g.Port == 0 }) {
		return false
	}
	if len(prev) == 0 {
		return true
	}
	for _, f := range prev {
		fp := f.Prefix.Masked()
		if !slices.ContainsFunc(next, func(g store.Filter) bool {
			gp := g.Prefix.Masked()
			return gp.Bits() <= fp.Bits() && gp.Contains(fp.Addr()) && (g.Port == 0 || g.Port == f.Port)
		}) {
			return true
		}
	}
	return false
}

// freed quarantines an IPv4 external port that no lease holds any more
// (MAP-22): for the protocol's idle time only the same client may reclaim it.
func (t *tx) freed(l *store.Lease) {
	if !l.ExternalAddr.Is4() {
		return
	}
	e, q := quarantineOf(l, t.now)
	if _, held := t.s.tab.holder(e); held {
		return
	}
	t.quarSet(e, q)
	t.quarBound(l.Owner)
}

// diff queues the kernel operations that turn prev's pinholes into next's
// (both the lease at key). Leases on one internal tuple can share a kernel
// element (a PEER to R:p and a MAP with FILTER R/128:p): an element stays
// while any live lease holds it, with the latest expiry among them, so
// ending or shortening one lease never cuts another's pinhole.
func (t *tx) diff(key store.Key, prev, next *store.Lease) {
	old, neu := t.old[:0], t.neu[:0]
	if prev != nil {
		old = appendPinholes(old, prev)
	}
	if next != nil {
		neu = appendPinholes(neu, next)
	}
	t.old, t.neu = old, neu
	if len(old) == 0 && len(neu) == 0 {
		return
	}
	others := t.others[:0]
	t.tup = t.s.tab.onTupleInto(tupleOf(key), t.tup)
	for i := range t.tup {
		l := &t.tup[i]
		if l.Key == key {
			continue
		}
		if at, ok := t.s.dirty[l.Key]; ok {
			// What the kernel holds for it (l is a copy): a shared
			// element's timeout is computed from the kernel's view, so
			// it never lapses before a lease written through here, and
			// the dirty lease's own flush raises it later.
			l.Expires = at
		}
		if l.Expires.After(t.now) {
			others = append(others, l)
		}
	}
	t.others = others
	// held returns the latest expiry of another live lease holding p.
	held := func(p pinhole.Pinhole) (time.Time, bool) {
		var at time.Time
		ok := false
		for _, l := range others {
			if !l.Expires.After(at) {
				continue
			}
			t.tmp = appendPinholes(t.tmp[:0], l)
			if slices.Contains(t.tmp, p) {
				at, ok = l.Expires, true
			}
		}
		return at, ok
	}
	later := func(a time.Time, l *store.Lease) time.Time {
		if l.Expires.After(a) {
			return l.Expires
		}
		return a
	}
	left := func(at time.Time) time.Duration { return max(at.Sub(t.now), time.Millisecond) }
	// dropped: the inverse ops (installs) of the filtered elements this
	// tx deleted, in this diff or an earlier one of the batch. A new
	// element that overlaps one of them in part (pinhole.Conflicts: a
	// FILTER replaced by a narrower one, FLT-03's [0, new]; a mapping
	// deleted and a PEER or a narrower MAP inside its FILTER in the same
	// batch) is installed After the deletes, and the undo's re-install
	// After the new element's delete: Apply sends a phase's adds before
	// its deletes, and the kernel refused the new element while the old
	// one was there, NO_RESOURCES for a legitimate replacement (h/hunt,
	// TestFilterNarrowedKernel) or, across requests, a rolled-back batch
	// whose every request was handled again alone (review h/revhunt,
	// TestBatchDeleteThenOverlapKernel). Only filtered elements (interval
	// sets) can overlap.
	dropped := t.dropped
	for _, p := range old {
		if slices.Contains(neu, p) {
			continue
		}
		at, ok := held(p)
		before := later(at, prev)
		switch {
		case !ok:
			t.ops = append(t.ops, pinhole.Op{Kind: pinhole.Delete, Pinhole: p})
			t.inv = append(t.inv, pinhole.Op{Kind: pinhole.Install, Pinhole: p, Timeout: left(before)})
			if p.RemotePrefix.IsValid() {
				dropped = append(dropped, len(t.inv)-1)
			}
		case !at.Equal(before):
			t.ops = append(t.ops, pinhole.Op{Kind: pinhole.Refresh, Pinhole: p, Timeout: left(at)})
			t.inv = append(t.inv, pinhole.Op{Kind: pinhole.Refresh, Pinhole: p, Timeout: left(before)})
		}
	}
	t.dropped = dropped
	for _, p := range neu {
		at, ok := held(p)
		after := later(at, next)
		switch {
		case slices.Contains(old, p) || ok:
			before := at
			if slices.Contains(old, p) {
				before = later(at, prev)
			}
			// While a re-install of every lease is owed (a repair's
			// failed: the damage may have taken the element), an
			// element kept is written too: the request's SUCCESS
			// then means it is in the kernel, whatever another
			// lease holding it for longer left to do (review
			// h/revleft10, TestE2ERenewalUnchangedDuringReinstallBackoff).
			if !after.Equal(before) || t.s.reinstallOwed {
				t.ops = append(t.ops, pinhole.Op{Kind: pinhole.Refresh, Pinhole: p, Timeout: left(after)})
				t.inv = append(t.inv, pinhole.Op{Kind: pinhole.Refresh, Pinhole: p, Timeout: left(before)})
			}
		default:
			op := pinhole.Op{Kind: pinhole.Install, Pinhole: p, Timeout: left(after)}
			for _, i := range dropped {
				if pinhole.Conflicts(p, t.inv[i].Pinhole) {
					op.After, t.inv[i].After = true, true
				}
			}
			t.ops = append(t.ops, op)
			t.inv = append(t.inv, pinhole.Op{Kind: pinhole.Delete, Pinhole: p})
		}
	}
}

// rollback restores the table and quarantine to the state before the tx.
func (t *tx) rollback() {
	for i := len(t.undo) - 1; i >= 0; i-- {
		u := &t.undo[i]
		if !u.had {
			t.s.tab.del(u.key)
		} else {
			t.s.tab.put(u.prev)
		}
		if u.dirty {
			t.s.dirty[u.key] = u.synced
		}
	}
	for i := len(t.qund) - 1; i >= 0; i-- {
		q := t.qund[i]
		if q.had {
			t.s.quarPut(q.e, q.prev)
		} else {
			t.s.quarDel(q.e)
		}
	}
	t.reset()
}

// changes lists what the store must write: the table's current lease for
// every key the tx touched (put), or its deletion (del). With before set,
// it lists the state before the tx instead (to undo a commit). Either way
// it adds the table's current state for every key in the store's debt
// (Server.storeDebt) that the tx did not touch: for those the table holds
// the state before and after the tx alike.
func (t *tx) changes(before bool) ([]store.Lease, []store.Key) {
	put, del := t.put[:0], t.del[:0]
	debt := t.s.storeDebt
	one := len(t.undo) == 1 && len(debt) == 0
	if !one {
		if t.seen == nil {
			t.seen = make(map[store.Key]struct{}, len(t.undo))
		}
		clear(t.seen)
	}
	current := func(key store.Key) {
		// Decoded straight into put's next slot: a batch of new MAPs
		// otherwise allocated one lease copy per request here.
		put = slices.Grow(put, 1)
		if t.s.tab.getInto(key, &put[:len(put)+1][len(put)]) {
			put = put[:len(put)+1]
		} else {
			del = append(del, key)
		}
	}
	for i := range t.undo {
		u := &t.undo[i]
		if !one {
			if _, dup := t.seen[u.key]; dup {
				// The first record of a key holds its state before the
				// tx; the table holds the state after it.
				continue
			}
			t.seen[u.key] = struct{}{}
		}
		switch {
		case !before:
			current(u.key)
		case u.had:
			put = append(put, u.prev)
		default:
			del = append(del, u.key)
		}
	}
	for key := range debt {
		if _, touched := t.seen[key]; !touched {
			current(key)
		}
	}
	t.put, t.del = put, del
	return put, del
}

// owe records that the store may hold, for every key the tx touched, a
// state the table does not (the write-back after a kernel failure
// failed): the next store commit writes the table's state for them.
func (t *tx) owe() {
	for i := range t.undo {
		t.s.storeDebt[t.undo[i].key] = struct{}{}
	}
	t.oweQuar()
}

// paid clears the store's debt: a commit that included it succeeded.
func (s *Server) paid() {
	s.debtPaid(len(s.storeDebt))
	clear(s.storeDebt)
	clear(s.quarDebt)
}

// debtPaid logs that the store holds the table's state again for the n
// owed leases, and ends the debt's run of refused write-backs (s.mu held).
func (s *Server) debtPaid(n int) {
	const msg = "store is consistent with the lease table again"
	switch {
	case s.debtWarn.failing():
		s.debtWarn.end(s.log, s.steady(), msg, zap.Int("leases", n))
	case n > 0:
		s.log.Info(msg, zap.Int("leases", n))
	}
}

// payStoreDebt writes the table's state for the keys in the store's debt,
// alone (housekeep calls it, so a debt is paid without waiting for the
// next request).
func (s *Server) payStoreDebt() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.payStoreDebtLocked()
}

// payStoreDebtLocked is payStoreDebt with s.mu held; it reports whether
// the store holds the table's state for every key now (no debt, or the
// commit succeeded).
func (s *Server) payStoreDebtLocked() bool {
	if len(s.storeDebt) == 0 && len(s.quarDebt) == 0 {
		return true
	}
	var put []store.Lease
	var del []store.Key
	for key := range s.storeDebt {
		if cur, ok := s.tab.get(key); ok && cur != nil {
			put = append(put, *cur)
		} else {
			del = append(del, key)
		}
	}
	var qc store.QuarChange
	for e := range s.quarDebt {
		s.appendQuarState(&qc, e)
	}
	if err := s.st.CommitQuar(put, del, &qc); err != nil {
		s.m.storeErrors.Inc()
		s.debtWarn.warn(s.log, s.steady(), "cannot write the lease table's state back to the store; retrying", err, zap.Int("leases", len(s.storeDebt)))
		return false
	}
	s.paid()
	return true
}

// commit makes the tx durable: the kernel transaction and the store commit
// run at the same time, so a batch waits for the slower of the two, not
// for both in turn (a retry of a failed batch's request runs them one
// after the other, kernel first, and skips the store if the kernel fails). If one fails the other is undone (the kernel with
// inv, the store by writing the leases' previous state back) and the error
// returned; the caller rolls the table back. A SUCCESS is only ever sent
// after both succeeded.
//
// A crash while they run can leave a pinhole without its lease (or with a
// newer timeout than the stored lease) or a stored lease without its
// pinhole (or its new timeout). The reconcile at the next start re-installs
// every stored live lease with its stored expiry, and the audit removes
// kernel entries no lease explains, so both are repaired; neither was ever
// answered with a SUCCESS.
func (t *tx) commit() error {
	if len(t.undo) == 0 && len(t.qund) == 0 {
		return nil
	}
	// owing: a revocation while the store refuses writes (its last
	// refusal not followed by a commit that succeeded: debtWarn) is owed
	// at once, the store not tried. Its commit would carry every key owed
	// before it (changes adds the debt) and fail again: the full sweep's
	// chunks handed a refusing store O(n²/revokeChunk) keys, each
	// encoded under s.mu, and logged a warning a chunk (review h/revh6,
	// TestRevokeSweepOwesStoreOnce). housekeep's payStoreDebt, or the
	// next request's commit, writes the debt.
	owing := t.revoking && t.s.debtWarn.failing()
	if !owing {
		t.changes(false)
		t.qcp = t.quarChanges(false)
	}
	// The store commit runs beside the kernel transaction; the engine
	// waits for both below. Without kernel ops there is nothing to
	// overlap. A retry (one request of a failed batch, alone) goes kernel
	// first, store second: it is the likeliest to fail in the kernel
	// again, and then it costs no store commit and no write-back.
	overlap := len(t.ops) > 0 && !t.retry && !owing
	if overlap {
		go t.storeCommit()
	}
	start := time.Now()
	retaken, tos, again := t.s.natRetargets(t)
	if len(retaken) > 0 {
		t.s.cutRetargeted(retaken, tos, t.ended)
	}
	kerr := t.s.applyAtomic(t.ops, t.inv)
	if kerr == nil && again {
		// The ended element DNAT-ed until the commit (retarget.go).
		t.s.cutRetargeted(retaken, tos, t.ended)
	}
	kdur := time.Since(start)
	var serr error
	stored := true // the store commit ran
	switch {
	case overlap:
		serr = <-t.storeErr
	case kerr == nil && owing:
		serr = errStoreOwing
	case kerr == nil:
		t.storeCommit()
		serr = <-t.storeErr
	default:
		stored = false
	}
	sdur := t.storeDur
	switch {
	case kerr != nil && !stored:
		t.s.m.kernelErrors.Inc()
		return fmt.Errorf("server: kernel: %w", kerr)
	case kerr != nil && serr != nil:
		t.s.m.kernelErrors.Inc()
		t.s.m.storeErrors.Inc()
		return fmt.Errorf("server: kernel: %w; store: %w", kerr, serr)
	case kerr != nil:
		t.s.m.kernelErrors.Inc()
		// The store holds the batch, and the debt it carried is paid:
		// write back what it held before the batch.
		owed := len(t.s.storeDebt)
		clear(t.s.storeDebt)
		clear(t.s.quarDebt)
		put, del := t.changes(true)
		if uerr := t.s.st.CommitQuar(put, del, t.quarChanges(true)); uerr == nil {
			t.s.debtPaid(owed)
		} else {
			// The store keeps the batch's leases, which the client was
			// told NO_RESOURCES (a new one would get its pinhole back at
			// the next start; a deleted one would be lost): the table's
			// state for them goes with the next commit.
			t.s.m.storeErrors.Inc()
			t.owe()
			t.s.log.Error("cannot undo store changes after a kernel failure; the next store commit writes them back", zap.Int("leases", len(t.s.storeDebt)), zapErr(uerr))
		}
		return fmt.Errorf("server: kernel: %w", kerr)
	case serr != nil && t.revoking:
		// A revocation is not a request: no reply waits for it to be
		// durable, and undone it left the pinholes of an address its
		// owner lost open (into the address's new owner, or to the host's
		// own) for as long as the store refused writes: a state directory
		// remounted read-only after an I/O error, a full disk (h/hunt6,
		// TestRevokeUnownedWhileStoreFails, TestRevokeWhileStateReadOnly).
		// So the kernel's deletes stand and the store is owed them: the
		// next commit or housekeep's payStoreDebt writes them, and a
		// restart before that restores the leases and its sweep revokes
		// them again.
		t.owe()
		t.s.flushConntrack(t.ended)
		if serr != errStoreOwing {
			// One line per run of refusals, as the debt's retries
			// (repeatWarn), ended by the commit that pays the debt.
			t.s.m.storeErrors.Inc()
			t.s.debtWarn.warn(t.s.log, t.s.steady(), "cannot record revoked leases; they are out of the kernel, and the store is written when it takes writes again",
				serr, zap.Int("leases", len(t.undo)), zap.Int("owed", len(t.s.storeDebt)))
		}
		return nil
	case serr != nil:
		t.s.m.storeErrors.Inc()
		if err := t.s.applyAll(reversed(t.inv)); err != nil {
			t.s.log.Error("cannot undo kernel changes after a store failure; the next reconcile repairs them", zapErr(err))
		}
		return fmt.Errorf("server: store: %w", serr)
	}
	t.s.paid()
	t.s.flushConntrack(t.ended)
	t.s.m.kernelSeconds.Observe(kdur.Seconds())
	t.s.m.storeSeconds.Observe(sdur.Seconds())
	return nil
}

// errStoreOwing stands for the store commit a revoking tx does not try
// while the store refuses writes (tx.commit's owing).
var errStoreOwing = errors.New("server: store refusing writes; owed")

// storeCommit writes t.put and t.del and reports on t.storeErr (its
// duration in t.storeDur, valid once the error is received).
func (t *tx) storeCommit() {
	start := time.Now()
	err := t.s.st.CommitQuar(t.put, t.del, t.qcp)
	t.storeDur = time.Since(start)
	t.storeErr <- err
}

const (
	protoTCP = 6
	protoUDP = 17
)

// pinholesOf translates a lease into kernel pinholes: one per FILTER that
// no broader FILTER of the lease covers (filterCovered), or one for any
// remote without filters; one for a PEER's remote peer.
func pinholesOf(l *store.Lease) []pinhole.Pinhole { return appendPinholes(nil, l) }

// appendPinholes appends l's pinholes (pinholesOf) to dst.
func appendPinholes(dst []pinhole.Pinhole, l *store.Lease) []pinhole.Pinhole {
	base := pinhole.Pinhole{
		Protocol:     l.Protocol,
		InternalAddr: l.InternalAddr,
		InternalPort: l.InternalPort,
		ExternalAddr: l.ExternalAddr,
		ExternalPort: l.ExternalPort,
	}
	if l.Kind == store.KindPeer {
		r := l.Remote.Addr().Unmap()
		base.RemotePrefix = netip.PrefixFrom(r, r.BitLen())
		base.RemotePort = l.Remote.Port()
		return append(dst, base)
	}
	if len(l.Filters) == 0 {
		return append(dst, base)
	}
	n := len(dst)
	for i, f := range l.Filters {
		if len(l.Filters) > 1 && filterCovered(l.Filters, i) {
			continue // a broader filter's element admits it
		}
		p := base
		p.RemotePrefix = f.Prefix.Masked()
		p.RemotePort = f.Port
		if !slices.Contains(dst[n:], p) {
			dst = append(dst, p)
		}
	}
	return dst
}

// applyAtomic applies ops as one kernel transaction when they fit in one
// (the engine keeps batches that small); larger ones go as several, and if
// a later one fails the earlier ones are undone with inv (inv[i] undoes
// ops[i]).
func (s *Server) applyAtomic(ops, inv []pinhole.Op) error {
	for i := 0; i < len(ops); i += pinhole.MaxBatch {
		j := min(i+pinhole.MaxBatch, len(ops))
		if err := s.fw.Apply(ops[i:j]); err != nil {
			if i > 0 {
				if uerr := s.applyAll(reversed(inv[:i])); uerr != nil {
					s.log.Error("cannot undo a partly applied change; the tamper check repairs it", zapErr(uerr))
				}
			}
			return err
		}
	}
	return nil
}

// applyAll applies ops in transactions of at most pinhole.MaxBatch, for
// repairs that need no rollback; it goes on after a failed chunk and
// returns the first error.
func (s *Server) applyAll(ops []pinhole.Op) error {
	var first error
	for i := 0; i < len(ops); i += pinhole.MaxBatch {
		if err := s.fw.Apply(ops[i:min(i+pinhole.MaxBatch, len(ops))]); err != nil && first == nil {
			first = err
		}
	}
	return first
}

func reversed(ops []pinhole.Op) []pinhole.Op {
	out := slices.Clone(ops)
	slices.Reverse(out)
	return out
}
