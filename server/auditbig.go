package server

import (
	"context"
	"errors"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/store"
)

// The audit above auditMaxLeases (h/bigaudit, issue 9). There the kernel's
// dump of the pinhole sets is quadratic (minutes at 1 000 000), so the
// audit does not read the kernel at all: it installs every live lease's
// pinholes again, a step at a time, each step one hold of s.mu and one
// kernel transaction (at most pinhole.MaxBatch ops; a try the kernel
// refuses as a conflict is retried in a hold of its own), as the start's
// ownership sweep (sweepMore) and the operator's revoke chunk theirs. A
// pinhole the kernel lacks (deleted by hand while the watch was off or
// deaf) is added back; one it holds has its timeout set again to what the
// kernel should hold (pinhole's Install: on Linux ≥ 6.10 an in-place
// update that ends with the timeout asked or 50 ms less, never more;
// before 6.10 the element is re-created with exactly that timeout, in the
// same transaction; pinhole's TestRefreshInPlace checks both). Before,
// the audit was skipped above auditMaxLeases, and such a pinhole stayed
// missing until the lease's renewal, while the client had been told
// SUCCESS. Orphans (elements no lease explains) cannot be found without
// the dump: above auditMaxLeases those pcpd installed end with their
// kernel timeouts (never beyond the lease that installed them); one
// someone added by hand without a timeout stays until the lease count
// falls below auditMaxLeases and an audit dumps it.
//
// What is installed, and for how long (security: this path writes
// pinholes without a request):
//   - only the pinholes of leases in the table at the step's hold of
//     s.mu, which is committed state (the engine changes table, kernel
//     and store of a batch in one hold: fwwatch.go); a lease deleted,
//     revoked, replaced or expired before the step is not in the table
//     or is skipped as not live, and one deleted after the step deletes
//     its pinholes itself, later, in its own hold;
//   - never for a lease whose expiry is at or before the step's clock
//     (s.now(), under s.mu, the clock expiry runs on);
//   - a pinhole's timeout is the latest expiry, as the kernel should hold
//     it, among the live leases on its tuple that hold it (a PEER and a
//     filtered MAP to the same remote share one: table.installs,
//     tx.diff), less the step's clock, rounded down to the millisecond
//     and shortened by the time the step took to build its ops and, for
//     the ops applied after a refused try in the same hold, that try
//     (lateBy, applyAuditStep); a step the kernel refuses as a conflict
//     is tried again in a hold of its own, read from the table anew:
//     every try holds all of the above at its own hold and clock;
//     never beyond the lease's remaining lifetime but by the kernel's own
//     commit latency and jiffy. For a lease whose renewal was absorbed
//     (absorb.go) that expiry is its synced one, what the kernel and the
//     store hold (tx.diff computes shared elements the same way): the
//     audit never writes the kernel beyond the stored lease, so a crash
//     before the flush leaves no pinhole outliving what a restart
//     restores.

// auditStepSlots bounds the table slots one step of the audit above
// auditMaxLeases reads when it finds fewer than pinhole.MaxBatch pinholes
// (a sparse table), as sweepSlots does the ownership sweep's.
const auditStepSlots = 8192

// auditConflictRetries bounds how many times a step drops a conflicting op
// (ErrConflict: the kernel holds another mapping under the external key,
// an element changed by hand; pcpd's own failed deletes are retried first,
// retryUndeleted) and applies the rest again: the kernel discards a failed
// transaction whole.
const auditConflictRetries = 4

// auditLargeHook, if set, is called at the end of each auditLarge that
// walked the whole table (tests).
var auditLargeHook func(installed int)

// auditHoldHook, if set, is called after each hold of s.mu of auditLarge
// with its length and whether the kernel refused a conflict in it (tests).
var auditHoldHook func(hold time.Duration, conflict bool)

// kernelExpiry is when the kernel should end l's pinholes: its expiry, or
// its synced one if its renewal was absorbed (absorb.go). Under s.mu.
func (s *Server) kernelExpiry(l *store.Lease) time.Time {
	if at, ok := s.dirty[l.Key]; ok && at.Before(l.Expires) {
		return at
	}
	return l.Expires
}

// auditScratch is what the steps of one large audit reuse.
type auditScratch struct {
	ops  []pinhole.Op
	refs []uint32 // the slot of the lease each op of ops is for
	held []pinhole.Pinhole
	tup  []store.Lease
	oth  []pinhole.Pinhole
	// refused are the pinholes the kernel refused as conflicts in this
	// audit: left out of its later steps and tries.
	refused map[pinhole.Pinhole]struct{}
}

// auditStepLocked appends to sc.ops the Install ops of the live leases'
// pinholes in the table's slots from from on (but those the kernel refused
// as conflicts in this audit: sc.refused), until the next lease's would
// take the ops past pinhole.MaxBatch or auditStepSlots slots are read,
// and returns the slot to start the next step at (0: the end). Under s.mu.
func (s *Server) auditStepLocked(from uint32, now time.Time, sc *auditScratch) uint32 {
	sc.ops, sc.refs = sc.ops[:0], sc.refs[:0]
	return s.tab.liveIn(from, auditStepSlots, func(ref uint32, l *store.Lease) bool {
		until := s.kernelExpiry(l)
		if until.Sub(now) < time.Millisecond {
			// Ended, or ends within a millisecond: nothing is installed
			// for it. Another live lease holding one of its pinholes
			// installs that on its own turn.
			return true
		}
		sc.held = appendPinholes(sc.held[:0], l)
		if len(sc.ops) > 0 && len(sc.ops)+len(sc.held) > pinhole.MaxBatch {
			return false // the next step starts with l
		}
		sc.tup = s.tab.onTupleInto(tupleOf(l.Key), sc.tup)
		for _, p := range sc.held {
			if _, no := sc.refused[p]; no {
				continue
			}
			at := until
			for i := range sc.tup {
				o := &sc.tup[i]
				if o.Key == l.Key {
					continue
				}
				if oat := s.kernelExpiry(o); oat.After(at) {
					sc.oth = appendPinholes(sc.oth[:0], o)
					for _, q := range sc.oth {
						if q == p {
							at = oat
							break
						}
					}
				}
			}
			// Rounded down: the kernel rounds a timeout up to the
			// millisecond (pinhole's ceilMillis), so it ends no later
			// than at.
			sc.ops = append(sc.ops, pinhole.Op{Kind: pinhole.Install, Pinhole: p, Timeout: at.Sub(now).Truncate(time.Millisecond)})
			sc.refs = append(sc.refs, ref)
		}
		return true
	})
}

// lateBy shortens ops, timed from a clock read late ago (a step's
// building of them), by late rounded up to the millisecond, and drops those
// left with less than a millisecond: the kernel starts an element's
// countdown at its commit, so it then ends no later than its lease but by
// the transaction's own latency (and a jiffy's rounding), which every
// write of the engine has too. refs, if not empty, is ops' lease slots:
// what is dropped of ops is dropped of it too.
func lateBy(ops []pinhole.Op, refs []uint32, late time.Duration) ([]pinhole.Op, []uint32) {
	if late <= 0 {
		return ops, refs
	}
	late = (late + time.Millisecond - 1).Truncate(time.Millisecond)
	out := ops[:0]
	var outRefs []uint32
	if len(refs) > 0 {
		outRefs = refs[:0]
	}
	for i, op := range ops {
		if op.Timeout -= late; op.Timeout >= time.Millisecond {
			out = append(out, op)
			if len(refs) > 0 {
				outRefs = append(outRefs, refs[i])
			}
		}
	}
	return out, outRefs
}

// applyAuditStep applies a step's ops, timed from the clock read timed:
// one transaction (several only for a lease with more than
// pinhole.MaxBatch pinholes), the ops first shortened by the time since
// timed (lateBy: the step's build). An op the kernel refuses as a
// conflict is returned (refused, ok) and nothing applied: auditLarge then
// releases s.mu and tries the step again in a hold of its own, its ops
// read from the table anew, without that pinhole, up to
// auditConflictRetries times. Before (h/watchleft), the retries ran in
// the step's one hold, each a refused transaction and the backend's blame
// (it replays prefixes of the batch to find the op): the engine waited
// for s.mu through all of them (36 ms at 1 000 000 leases with 6
// conflicts in a step, BENCHMARKS.md item 60).
//
// On the last try (last), a conflict applies the ops before it (which
// the backend's blame applied in its replay), shortened again by the time
// since timed (the refused transaction and its blame), and resume is the
// slot of the conflicting op's lease: the walk goes on from there in the
// next step, without that pinhole. Before (review h/revbigaudit), the
// step failed whole: none of its up to pinhole.MaxBatch pinholes went
// back, at every audit alike while the elements changed by hand stayed
// (TestAuditAboveMaxManyConflicts).
//
// It returns how many ops were applied, the pinhole refused, the slot to
// resume at (0: the step's own end), and the error that ended it (nil if
// applied or refused). Under s.mu.
func (s *Server) applyAuditStep(ops []pinhole.Op, refs []uint32, timed time.Time, last bool) (applied int, refused pinhole.Pinhole, ok bool, resume uint32, err error) {
	cut := s.now().Sub(timed)
	ops, refs = lateBy(ops, refs, cut)
	cut = (cut + time.Millisecond - 1).Truncate(time.Millisecond) // as lateBy
	if len(ops) == 0 {
		return 0, refused, false, 0, nil
	}
	if len(ops) > pinhole.MaxBatch {
		if err := s.applyAll(ops); err != nil {
			return 0, refused, false, 0, err
		}
		return len(ops), refused, false, 0, nil
	}
	err = s.fw.Apply(ops)
	if err == nil {
		return len(ops), refused, false, 0, nil
	}
	var oe *pinhole.OpError
	if !errors.Is(err, pinhole.ErrConflict) || !errors.As(err, &oe) || oe.Index < 0 || oe.Index >= len(ops) {
		return 0, refused, false, 0, err
	}
	refused = ops[oe.Index].Pinhole
	s.log.Warn("firewall audit: the kernel holds another mapping under a lease's external key (not pcpd's: an element changed by hand); the lease's pinhole waits for that element's timeout, no dump finds it above the audit's limit",
		zap.Stringer("pinhole", refused), zap.Error(err))
	if !last {
		return 0, refused, true, 0, nil
	}
	if len(refs) != len(ops) {
		return 0, refused, true, 0, err
	}
	// The rest in the next step, from the conflicting op's lease.
	resume = refs[oe.Index]
	before, _ := lateBy(ops[:oe.Index], nil, s.now().Sub(timed)-cut)
	if len(before) > 0 {
		if err := s.fw.Apply(before); err != nil {
			return 0, refused, true, 0, err
		}
	}
	return len(before), refused, true, resume, nil
}

// auditLarge is the audit above auditMaxLeases (see above): every live
// lease's pinholes installed again, a step at a time, on the caller's
// goroutine (the audit's own: watchFirewall's auditRun). It ends early
// when ctx does, or when a set is missing: it then reports that a
// firewall check is owed (its repair re-installs every lease), which the
// caller runs.
//
// No stale-snapshot guard like the dumping audit's (relaid, auditStale)
// is needed, and none would change what it writes (checked for
// h/auditend): that guard exists because the dump is read without s.mu
// and compared later, so it may predate a repair. Here nothing is read
// from the kernel, and each step's ops are built from the lease table and
// applied to the kernel within one hold of s.mu (auditStepLocked, then
// applyAuditStep, its refused-conflict retry and applyAll included), the
// hold in which the engine, the watch and a repair (repairLocked) make
// their writes too. What crosses holds is only the slot cursor (at,
// resume), the refused pinholes (sc.refused) and the retry count, each
// of which can only leave an Install out, never add one. So a lease
// deleted, revoked, replaced or expired before a step is not in its
// table (or not live): its pinholes are never re-added; one deleted
// after it deletes its own pinholes in its later hold. A repair between
// two steps installs every live lease itself; the steps after it
// install the same live leases' pinholes with the same kernel view
// (kernelExpiry): redundant, never an undo. A set missing at a step
// fails it (ErrMissing): the audit stops, the check repairs, and an audit
// follows the repair (auditAfterRepair).
func (s *Server) auditLarge(ctx context.Context, leases int) (checkOwed bool) {
	start := time.Now()
	sc := auditScratch{refused: make(map[pinhole.Pinhole]struct{})}
	var at uint32
	var installed, dropped, steps, failed, tries int
	var longest time.Duration
	var first error
	for {
		if ctx.Err() != nil {
			s.log.Info("firewall audit above the dump limit stopped", zap.Int("pinholes_installed", installed), zap.Duration("took", time.Since(start)))
			return false
		}
		s.mu.Lock()
		held := time.Now()
		now := s.now()
		next := s.auditStepLocked(at, now, &sc)
		n, refused, conflict, resume, err := s.applyAuditStep(sc.ops, sc.refs, now, tries >= auditConflictRetries)
		hold := time.Since(held)
		s.mu.Unlock()
		if auditHoldHook != nil {
			auditHoldHook(hold, conflict)
		}
		longest = max(longest, hold)
		installed += n
		if conflict {
			sc.refused[refused] = struct{}{}
			dropped++
			if resume == 0 && err == nil {
				// The same step again, in a hold of its own: the
				// table read anew, without the refused pinhole.
				tries++
				continue
			}
			if resume != 0 {
				// From the conflicting op's lease, without the
				// refused pinhole: the walk always goes on.
				next = resume
			}
		}
		tries = 0
		steps++
		if errors.Is(err, pinhole.ErrMissing) {
			s.log.Warn("firewall audit: a pinhole set is missing; checking the firewall now", zap.Error(err))
			return true
		}
		if err != nil {
			s.m.kernelErrors.Inc()
			failed++
			if first == nil {
				first = err
			}
		}
		if next == 0 {
			break
		}
		at = next
	}
	if failed > 0 {
		s.log.Error("firewall audit: cannot install some leases' pinholes again; the next audit retries", zap.Int("failed_steps", failed), zap.Error(first))
	}
	s.log.Info("firewall audit: too many leases to dump the kernel's sets; installed every live lease's pinholes again (missing ones back, the rest's timeouts set to their leases' remaining lifetimes); orphan pinholes end with their timeouts",
		zap.Int("leases", leases), zap.Int("max", auditMaxLeases), zap.Int("pinholes", installed), zap.Int("conflicts", dropped),
		zap.Int("steps", steps), zap.Duration("longest_hold", longest), zap.Duration("took", time.Since(start)))
	if auditLargeHook != nil {
		auditLargeHook(installed)
	}
	return false
}
