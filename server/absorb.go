package server

import (
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/store"
)

// Absorbed early renewals (issue 8).
//
// A client renews long before its mapping ends (RFC 6887 §11.2.1: at
// about half the lifetime; pcpload's renewal scenario renews again and
// again). Written through, every such renewal costs a kernel transaction
// and a durable store commit. Most of them need neither: the kernel and
// the store already hold an expiry far in the future. Such a renewal is
// absorbed: the table takes the new expiry (what the client is told, what
// `pcpd leases` shows), the lease is marked dirty with the expiry the
// kernel and the store still hold (its synced expiry, Server.dirty), and
// the reply goes out without waiting for a commit. A dirty lease is
// written (flushDue) only when its synced expiry comes within flushLead:
// until then nothing depends on the write (see below), and a client that
// keeps renewing has its renewal written through once the synced expiry
// is no longer far enough ahead, so most dirty leases are never flushed at
// all. All of them are written before Serve returns (flushDirty).
//
// Why this is safe:
//
//   - Only a renewal that changes nothing but the expiry, and only to a
//     later one, is absorbed (shortening renewals, a new nonce, other
//     filters, another client address or description are written
//     through): the kernel's pinholes and the stored lease are right but
//     for the expiry, and the client's source port (below).
//   - A renewal from another source port of the same client address is
//     absorbed too (a client that opened a new socket; the benchmark's
//     open-loop generator, whose one socket differs from its prefill's,
//     so that every lease's first renewal of the measured phase was
//     written through: BENCHMARKS.md item 61). The port is nothing the
//     kernel holds: it is where the unsolicited ANNOUNCE of the next
//     start goes (ANN-06, store.Lease.ClientAddr, read from the store
//     only then). The table takes it at once (`pcpd leases`), the store
//     with the flush, a later write-through, or shutdown. After a crash
//     before that, the restart's unicast ANNOUNCE goes to the client's
//     old port, as it does for every client that moved its port since
//     its last written request; the lease is restored whole (the stored
//     expiry covers the client's next renewal, below), and that renewal
//     carries the epoch: the client learns of the restart then, and has
//     lost no mapping. The multicast ANNOUNCE is unchanged.
//   - The kernel never holds more than was promised: its element keeps
//     the synced expiry, which some earlier SUCCESS promised, and the
//     client was since promised more (LIFE-04 holds).
//   - A lease is absorbed only while its synced expiry is at least
//     max(grant·5/8, absorbMinLeft) away (absorbLeft). An RFC client
//     renews at 1/2 to 5/8 of its lifetime, uniformly at random (RFC 6887
//     §11.2.1; a NAT-PMP client at 1/2; with grant/2 here, one renewing
//     after half its lifetime could come after the stored expiry), so if
//     pcpd crashes before the flush, the stored
//     expiry (restored into the kernel at the next start) still covers
//     the client's next renewal, which then writes through. Nothing the
//     client relies on before that renewal is lost. A client that does
//     not renew in time loses at most the difference, never the
//     pinhole's restoration.
//   - Not while a re-install of every lease is owed (reinstallOwed: a
//     repair's or the restore's failed): the kernel may lack the lease's
//     element, and only a write puts it back.
//   - Only committed leases are absorbed: not one the current batch
//     changed (its undo record exists), which may still roll back, and
//     not one in the store's debt, where the store may hold something
//     else entirely. An absorbed renewal has no undo record, so a
//     rollback of its batch leaves it as it is, which is right: it
//     never depended on the commit. Its SUCCESS stands too: the
//     one-by-one retry of a failed batch skips it (commitOutcomes), as
//     handled again later it could be written through and fail.
//   - Whatever writes a dirty lease (renewal written through, delete,
//     revocation, expiry, the flush) goes through tx.set, which diffs
//     the kernel from the synced expiry, clears the mark, and on
//     rollback restores it. A shared kernel element's timeout (diff's
//     others) is computed with the other leases' synced expiries: what
//     the kernel holds.
//
// A replacement by the same owner with a new nonce that changes nothing
// else (a rebooted client, or issue 9's flood) is absorbed only as a
// bare replacement (bareReplacement). In general it is not safe: after a
// crash the store would hold the old nonce, and the client's next request
// would be handled as a replacement rather than a renewal (a refusal under
// strict nonces, MAP-14). A replacement starts from the request's filters
// and description where a renewal keeps the mapping's (FLT-03), so a
// client renewing without repeating its FILTERs would find its pinhole
// opened to every remote; a NAPT mapping's replacement picks its external
// port again.

// absorbMinLeft is the least synced lifetime left for a renewal to be
// absorbed, whatever the grant: a short lease is written through.
const absorbMinLeft = 15 * time.Second

// Flushing. A flush step writes at most flushChunk dirty leases, those
// whose synced expiry is within flushLead, as one group commit (one
// kernel transaction, one store commit: ≈ 15 µs a lease on the 2-core box,
// so a step holds the engine ≈ 4 ms), and the next step follows flushGap
// later while more are due, so the engine serves requests in between. A
// flush of every dirty lease at once held it 59 ms for 4 000 leases,
// every second, in the renewal benchmark. At most maxDirty leases are
// dirty (renewals beyond are written through), so everything due is
// written well within flushLead - absorbFlush even if all of them fall
// due together: a step also scans the dirty map twice (≈ 1.5 ms at
// 65 536), so 256 steps take ≈ 256 × (4 + 1.5 + 5) ms ≈ 2.7 s, a fake
// firewall and store 0.4 s (review); under load the engine interleaves
// batches, hence 10 s of lead, not 4. absorbMinLeft > flushLead, so a
// lease is never due when absorbed.
//
// Variables for tests.
var (
	absorbFlush = 250 * time.Millisecond // how often the engine looks for due leases
	flushLead   = 10 * time.Second
	flushChunk  = 256
	flushGap    = 5 * time.Millisecond
	maxDirty    = 65536
)

// absorbLeft is the least synced lifetime left for a renewal granted
// grant to be absorbed (see above).
func absorbLeft(grant time.Duration) time.Duration { return max(grant*5/8, absorbMinLeft) }

// bareReplacement reports whether next, which replaces ex with a new
// nonce (choice (c)), may be absorbed like a renewal: only where the
// replacement the client's next request makes after a crash (the store
// still holding ex) ends the same way as the renewal it makes without
// one. That holds for a plain pinhole: a MAP whose external endpoint is
// its internal one (no NAPT port to pick again), with no FILTER and no
// DESCRIPTION on either side (a replacement starts from the request's
// filters and description, a renewal keeps the mapping's), and lenient
// nonces (strict ones refuse the replacement, MAP-14). The stored nonce
// and creation time lag until the flush, which nothing before the
// client's next renewal reads. A flood of such replacements from one
// source (issue 9, known bug 1) then costs no commit each.
func (s *Server) bareReplacement(ex, next *store.Lease) bool {
	return !s.cfg.StrictNonce && ex.Kind == store.KindMap && next.Kind == store.KindMap &&
		ex.ExternalAddr == ex.InternalAddr && ex.ExternalPort == ex.InternalPort &&
		len(ex.Filters) == 0 && len(next.Filters) == 0 && ex.Description == "" && next.Description == ""
}

// absorb answers the renewal of ex (the table's lease) to next, granted
// grant, without a kernel op or a store write, if it can (see above). It
// reports whether it did; then the table holds next.
func (s *Server) absorb(t *tx, ex, next *store.Lease, grant time.Duration) bool {
	if next.Expires.Before(ex.Expires) {
		return false // shortening (LIFE-03): written through
	}
	same := *next
	same.Expires = ex.Expires
	if next.Nonce != ex.Nonce && s.bareReplacement(ex, next) {
		same.Nonce, same.Created = ex.Nonce, ex.Created
	}
	if same.ClientAddr.Addr() == ex.ClientAddr.Addr() {
		same.ClientAddr = ex.ClientAddr // a new source port only (see above)
	}
	if !leaseEqual(&same, ex) {
		return false
	}
	synced, dirty := s.dirty[ex.Key]
	if !dirty {
		synced = ex.Expires
	}
	if synced.Sub(t.now) < absorbLeft(grant) {
		return false // due: the crash guarantee needs a fresh synced expiry
	}
	if _, owed := s.storeDebt[ex.Key]; owed || t.staged(ex.Key) {
		return false
	}
	if s.reinstallOwed {
		// A repair's (or the restore's) re-install of every lease failed
		// and is backing off (≤ reinstallSkipMax checks, ≈ 2.6 min):
		// the kernel may lack this lease's element (a flushed set), and
		// an absorbed renewal would be told SUCCESS with no pinhole
		// passing its traffic. Written through, it puts its own element
		// back or gets the failure code (h/left10,
		// TestE2ERenewalDuringReinstallBackoff).
		return false
	}
	if !dirty && len(s.dirty) >= maxDirty {
		return false // the flush's bound (above): written through
	}
	if next.Nonce != ex.Nonce || !next.Created.Equal(ex.Created) || next.ClientAddr != ex.ClientAddr || !s.tab.extend(ex.Key, next.Expires) {
		// A bare replacement's new nonce, a new client port (or a
		// pinned table): the whole lease goes in. Otherwise next is ex
		// with a later expiry (leaseEqual above), and extend changes
		// just that.
		s.tab.put(*next)
	}
	if !dirty {
		s.dirty[ex.Key] = synced
		if s.dirtyNext.IsZero() || synced.Before(s.dirtyNext) {
			s.dirtyNext = synced
		}
	}
	t.absorbs++
	s.m.absorbed.Inc()
	return true
}

// flushDirty writes every dirty lease, kernel and store, as one group
// commit (before Serve returns, and tests). On failure the leases stay
// dirty.
func (s *Server) flushDirty(why string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.flushLocked(why, time.Time{}, len(s.dirty))
	s.dirtyRescan(time.Time{})
}

// flushDue is one flush step: it writes up to flushChunk of the dirty
// leases whose synced expiry is within flushLead, and reports whether more
// are due (the engine then runs the next step after flushGap; after a
// failed step, the next tick retries). Without a lease due it costs a
// comparison: dirtyNext is the earliest synced expiry, or earlier.
func (s *Server) flushDue() (more bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	if len(s.dirty) == 0 || now.Before(s.dirtyNext.Add(-flushLead)) {
		return false
	}
	horizon := now.Add(flushLead)
	ok := s.flushLocked("due", horizon, flushChunk)
	return s.dirtyRescan(horizon) && ok
}

// dirtyRescan sets dirtyNext to the earliest synced expiry of the dirty
// leases and reports whether any is at or before horizon.
func (s *Server) dirtyRescan(horizon time.Time) (due bool) {
	s.dirtyNext = time.Time{}
	for _, at := range s.dirty {
		if s.dirtyNext.IsZero() || at.Before(s.dirtyNext) {
			s.dirtyNext = at
		}
		due = due || !at.After(horizon)
	}
	return due
}

// flushLocked writes up to max dirty leases, those whose synced expiry is
// at or before horizon (zero: all), as one group commit. It reports false
// if the commit failed (they stay dirty).
func (s *Server) flushLocked(why string, horizon time.Time, max int) bool {
	if len(s.dirty) == 0 {
		return true
	}
	now := s.now()
	// Leases past their (promised) expiry end here, not in the flush: a
	// flush of one would re-add its element for a millisecond.
	s.expireLocked(now)
	if len(s.dirty) == 0 {
		return true
	}
	start := time.Now()
	t := s.begin(now)
	for key, at := range s.dirty {
		if len(t.undo) >= max {
			break
		}
		if !horizon.IsZero() && at.After(horizon) {
			continue
		}
		cur, ok := s.tab.get(key)
		if !ok {
			// Cannot happen: whatever removes a lease goes through
			// tx.set, which clears its mark.
			delete(s.dirty, key)
			continue
		}
		// The table's lease again: the diff goes from the synced expiry
		// (set reads it from s.dirty and clears the mark) to the
		// table's, the store gets the table's lease.
		t.set(key, cur, false)
	}
	n := len(t.undo)
	if n == 0 {
		s.release(t)
		return true
	}
	if err := t.commit(); err != nil {
		t.rollback()
		s.release(t)
		s.log.Warn("cannot write absorbed renewals; they stay in memory and the next flush retries",
			zap.String("when", why), zap.Int("leases", n), zap.Error(err))
		return false
	}
	s.release(t)
	s.m.flushLeases.Observe(float64(n))
	s.m.flushSeconds.Observe(time.Since(start).Seconds())
	return true
}
