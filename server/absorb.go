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
// the reply goes out without waiting for a commit. The engine writes all
// dirty leases every absorbFlush, and before Serve returns, as one group
// commit (flushDirty).
//
// Why this is safe:
//
//   - Only a renewal that changes nothing but the expiry, and only to a
//     later one, is absorbed (shortening renewals, a new nonce, other
//     filters, another client port or description are written through):
//     the kernel's pinholes and the stored lease are right but for the
//     expiry.
//   - The kernel never holds more than was promised: its element keeps
//     the synced expiry, which some earlier SUCCESS promised, and the
//     client was since promised more (LIFE-04 holds).
//   - A lease is absorbed only while its synced expiry is at least
//     max(grant/2, absorbMinLeft) away. An RFC client renews at about
//     half its lifetime, so if pcpd crashes before the flush, the stored
//     expiry (restored into the kernel at the next start) still covers
//     the client's next renewal, which then writes through. Nothing the
//     client relies on before that renewal is lost. A client that does
//     not renew in time loses at most the difference, never the
//     pinhole's restoration.
//   - Only committed leases are absorbed: not one the current batch
//     changed (its undo record exists), which may still roll back, and
//     not one in the store's debt, where the store may hold something
//     else entirely. An absorbed renewal has no undo record, so a
//     rollback of its batch leaves it as it is, which is right: it
//     never depended on the commit.
//   - Whatever writes a dirty lease (renewal written through, delete,
//     revocation, expiry, the flush) goes through tx.set, which diffs
//     the kernel from the synced expiry, clears the mark, and on
//     rollback restores it. A shared kernel element's timeout (diff's
//     others) is computed with the other leases' synced expiries: what
//     the kernel holds.
//
// Not absorbed: a replacement by the same owner with a new nonce that
// changes nothing else (a rebooted client, or issue 9's flood). After a
// crash the store would hold the old nonce, and the client's next request
// would be handled as a replacement rather than a renewal (a refusal under
// strict nonces, MAP-14). A replacement starts from the request's filters
// and description where a renewal keeps the mapping's (FLT-03), so a
// client renewing without repeating its FILTERs would find its pinhole
// opened to every remote: not the same outcome, so not safe.

// absorbMinLeft is the least synced lifetime left for a renewal to be
// absorbed, whatever the grant: a short lease is written through.
const absorbMinLeft = 5 * time.Second

// absorbFlush is how often the engine writes the dirty leases (a variable
// for tests).
var absorbFlush = time.Second

// absorb answers the renewal of ex (the table's lease) to next, granted
// grant, without a kernel op or a store write, if it can (see above). It
// reports whether it did; then the table holds next.
func (s *Server) absorb(t *tx, ex, next *store.Lease, grant time.Duration) bool {
	if next.Expires.Before(ex.Expires) {
		return false // shortening (LIFE-03): written through
	}
	same := *next
	same.Expires = ex.Expires
	if !leaseEqual(&same, ex) {
		return false
	}
	synced, dirty := s.dirty[ex.Key]
	if !dirty {
		synced = ex.Expires
	}
	if synced.Sub(t.now) < max(grant/2, absorbMinLeft) {
		return false // due: the crash guarantee needs a fresh synced expiry
	}
	if _, owed := s.storeDebt[ex.Key]; owed || t.staged(ex.Key) {
		return false
	}
	s.tab.put(*next)
	if !dirty {
		s.dirty[ex.Key] = synced
	}
	s.m.absorbed.Inc()
	return true
}

// flushDirty writes every dirty lease, kernel and store, as one group
// commit. On failure the leases stay dirty and the next flush retries.
func (s *Server) flushDirty(why string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.flushLocked(why)
}

func (s *Server) flushLocked(why string) {
	if len(s.dirty) == 0 {
		return
	}
	now := s.now()
	// Leases past their (promised) expiry end here, not in the flush: a
	// flush of one would re-add its element for a millisecond.
	s.expireLocked(now)
	if len(s.dirty) == 0 {
		return
	}
	start := time.Now()
	t := s.begin(now)
	for key := range s.dirty {
		cur, ok := s.tab.get(key)
		if !ok {
			// Cannot happen: whatever removes a lease goes through
			// tx.set, which clears its mark.
			delete(s.dirty, key)
			continue
		}
		// The table's lease again: the diff goes from the synced expiry
		// (set reads it from s.dirty) to the table's, the store gets the
		// table's lease.
		t.set(key, cur, false)
	}
	n := len(t.undo)
	if err := t.commit(); err != nil {
		t.rollback()
		s.release(t)
		s.log.Warn("cannot write absorbed renewals; they stay in memory and the next flush retries",
			zap.String("when", why), zap.Int("leases", n), zap.Error(err))
		return
	}
	s.release(t)
	s.m.flushLeases.Observe(float64(n))
	s.m.flushSeconds.Observe(time.Since(start).Seconds())
}
