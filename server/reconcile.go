package server

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"iter"
	"net/netip"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// restore brings the kernel in line with the stored leases before anything
// is served: expired leases are dropped, missing pinholes re-added, stale
// timeouts refreshed, and pinholes of ours that no lease explains removed.
// The epoch continues only if every live lease is back in the kernel and
// the store vouches for its state (EPO-04); otherwise it resets (EPO-03)
// and clients learn of it from the unsolicited ANNOUNCE (ANN-03).
//
// The stored leases go into the lease table one by one (restoring.add) and
// are not kept: the table is the only copy, and the kernel is reconciled
// from it. A store that hands them over as it reads them (State.Stream,
// store.WithLeasesLater) feeds add directly: then no copy of them all is
// ever held beside the table (at 1 000 000 leases the 280 MB of decoded
// stored leases set the restart's peak, BENCHMARKS.md "Peak memory while
// restoring 1 000 000 leases").
func (s *Server) restore(ctx context.Context) error {
	now := s.now()
	st := s.deps.State
	s.started = now
	if st.Recovered != "" {
		s.log.Warn("store recovered", zap.String("detail", st.Recovered))
	}
	if err := s.fw.Setup(); partialSetup(err) {
		// All else is in place: serve, and retry the rest (checkFirewall).
		if errors.Is(err, pinhole.ErrOwnerMeter) {
			s.m.meterErrors.Inc()
		}
		s.log.Error("cannot write the kernel's owner meter or protected sets; serving, retrying at the next firewall check", zap.Error(err))
	} else if err != nil {
		return fmt.Errorf("server: firewall setup: %w", err)
	}
	s.updateProtected()
	s.checkFlowedMisses()
	// The server's reference goes now, and each stored lease is cleared
	// once the table has it (the caller's slice too: Start consumes it),
	// so the stored leases' strings and FILTERs are garbage as restore
	// goes, and the slice when restore is done (ls is dead after the loop).
	ls, stream := s.deps.State.Leases, s.deps.State.Stream
	s.deps.State.Leases, s.deps.State.Stream = nil, nil
	st.Leases, st.Stream = nil, nil
	r := s.restoring(now)
	r.ctx = ctx
	if ls == nil && stream != nil {
		// A pass over the stored leases, each decoded into the store's
		// scratch lease, to add them; sized by the census store.Open
		// took (Census), or else by a pass before it.
		if c := s.deps.Census; c.fits(s, now) {
			r.size(c.n, c.drops, c.ends)
		} else if err := r.presize(stream); err != nil {
			return r.readErr(err)
		}
		s.deps.Census = nil
		n := 0
		if err := stream(func(l *store.Lease) error {
			if n++; n%stopCheck == 0 {
				if err := r.stopped(); err != nil {
					return err
				}
			}
			r.add(l)
			return nil
		}); err != nil {
			return r.readErr(err)
		}
		return r.finish(st)
	}
	_ = r.presize(eachOf(ls)) // no store read: fails only when stopped
	if err := r.stopped(); err != nil {
		return err
	}
	for l := range drain(ls) {
		r.add(l)
	}
	return r.finish(st)
}

// stopCheck is how many stored leases a restore reads between two looks
// at its context (StartContext): ≈ 4 ms of a restore at 1 000 000 leases.
const stopCheck = 1 << 12

// stopped is ErrStartStopped once the restore's context has ended.
func (r *restoring) stopped() error {
	if err := r.ctx.Err(); err != nil {
		return fmt.Errorf("%w: %w", ErrStartStopped, err)
	}
	return nil
}

// readErr is the error of a failed read of the stored leases: the stop
// when the restore's context ended (a read given up by stopped).
func (r *restoring) readErr(err error) error {
	if errors.Is(err, ErrStartStopped) {
		return err
	}
	return fmt.Errorf("server: reading the stored leases: %w", err)
}

// eachOf hands fn each lease of ls in turn, as State.Stream does the
// store's (the first error of fn ends it).
func eachOf(ls []store.Lease) func(func(*store.Lease) error) error {
	return func(fn func(*store.Lease) error) error {
		for i := range ls {
			if err := fn(&ls[i]); err != nil {
				return err
			}
		}
		return nil
	}
}

// drain yields pointers to the leases of ls and clears each after use: its
// strings and FILTERs become garbage at once, not when ls goes.
func drain(ls []store.Lease) iter.Seq[*store.Lease] {
	return func(yield func(*store.Lease) bool) {
		for i := range ls {
			ok := yield(&ls[i])
			ls[i] = store.Lease{}
			if !ok {
				return
			}
		}
	}
}

// restoring is a restore in progress: stored leases admitted into the table.
type restoring struct {
	s        *Server
	ctx      context.Context // StartContext's: the restore gives up when it ends
	now      time.Time
	drop     keyChunks         // expired, moved or refused: out of the store
	gone     []pinhole.Pinhole // of moved and refused leases: out of the kernel
	moved    int
	doubtful int
	expired  int
	// Stored leases the rules refuse now (restore_policy.go): how many,
	// the first maxRefusedLogs to log, their connections to flush and
	// their IPv4 ports to quarantine.
	refused int
	logs    []refusedLog
	ends    []ctFilter
	freed   []freedPort
	// Stored leases whose address the ownership does not give their
	// owner now (restore_policy.go, owned): how many, and the last
	// address looked up with its answer (a client's leases sit
	// together, as table.unowned's walk counts on).
	unowned int
	ulogs   int
	own     policy.Ownership
	last    netip.Addr
	lastOwn policy.Owner
	lastOK  bool
	// qtouched are the endpoints whose quarantine restore set or ended:
	// written to the store with the drops (quarChange).
	qtouched []endpoint
	// expEnds are the connections of leases that expired while pcpd was
	// down or whose external IPv4 changed, to flush (flushExpired).
	expEnds []ctFilter
	// natEnds are the NAT mappings (IPv4 NAPT, IPv6 redirect) that
	// expired while pcpd was down or that the rules refuse now: recorded
	// in natPrior once their flush is queued (notePriors).
	natEnds []natEnd
	// lapsed are the MAP-22 quarantines of the IPv4 ports of leases that
	// expired while pcpd was down, running from their expiry as the
	// engine's expiry would have set them (TestMAP22LeaseExpiredWhileDown):
	// restored with the stored ones.
	lapsed []store.Quarantine
}

func (s *Server) restoring(now time.Time) *restoring {
	return &restoring{s: s, now: now, own: s.pol.Ownership()}
}

// dropChunk is how many keys one chunk of restoring.drop holds, and so
// one store commit of them (≈ 80 bytes a key: 5.2 MB).
const dropChunk = 1 << 16

// keyChunks are keys in chunks of at most dropChunk: adding one never
// copies those there (a start dropping 1 000 000 expired leases grew one
// slice to 80 MB, allocating 398 MB on the way), and each chunk is one
// store commit (commitDrops), whose record the store encodes in one
// buffer. The first chunk grows from nothing; the others are made whole.
type keyChunks [][]store.Key

func (c *keyChunks) add(k store.Key) {
	n := len(*c)
	if n == 0 || len((*c)[n-1]) == dropChunk {
		var next []store.Key
		if n > 0 {
			next = make([]store.Key, 0, dropChunk)
		}
		*c = append(*c, next)
		n++
	}
	(*c)[n-1] = append((*c)[n-1], k)
}

// len is how many keys c holds.
func (c keyChunks) len() int {
	n := 0
	for _, ks := range c {
		n += len(ks)
	}
	return n
}

// presize counts the stored leases (each: one pass over them) that add will drop as expired or moved
// (the same test: one pass reading two fields of each) and sizes for them
// r.drop's first chunk and r.expEnds (their connections), and the table
// for the rest. Grown by append, at a start dropping 1 000 000 expired
// leases, the connections allocated 205 MB to hold 40 MB; and the table,
// sized for every stored lease, took 78 MB to hold none. Leases the rules
// refuse (restore_policy.go) are not told apart here (it takes the
// policy): the table is sized for them too, and the drop chunks grow.
// An error of each (a store reading them, State.Stream) is returned, and
// nothing is sized.
func (r *restoring) presize(each func(func(*store.Lease) error) error) error {
	var scratch [2]ctFilter // appendCtFilters adds at most two
	n, drops, ends := 0, 0, 0
	err := each(func(l *store.Lease) error {
		if n++; n%stopCheck == 0 {
			if err := r.stopped(); err != nil {
				return err
			}
		}
		if r.expiredOrMoved(l) {
			drops++
			if !r.s.cfg.KeepConnections {
				ends += len(appendCtFilters(scratch[:0], l))
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	r.size(n, drops, ends)
	return nil
}

// size sizes the table for n stored leases of which add drops drops, and
// r.drop's first chunk and r.expEnds for those and their ends connection
// filters (presize's counts, or a Census's).
func (r *restoring) size(n, drops, ends int) {
	r.s.tab.grow(n - drops)
	if drops > 0 {
		r.drop = keyChunks{make([]store.Key, 0, min(drops, dropChunk))}
	}
	if ends > 0 {
		r.expEnds = make([]ctFilter, 0, ends)
	}
}

// expiredOrMoved reports whether add drops l as expired, or as moved (its
// external IPv4 no longer ours): those whose connections go to expEnds.
func (r *restoring) expiredOrMoved(l *store.Lease) bool {
	return expiredOrMoved(l, r.now, r.s.cfg.ExternalIPv4)
}

// expiredOrMoved: l expired at now, or its external IPv4 is not ext4.
func expiredOrMoved(l *store.Lease, now time.Time, ext4 netip.Addr) bool {
	return !l.Expires.After(now) || l.ExternalAddr.Is4() && l.ExternalAddr != ext4
}

// add admits one stored lease: expired ones, IPv4 ones whose external
// address is no longer ours, ones the rules refuse now and ones whose
// address the ownership no longer gives their owner (restore_policy.go)
// are dropped, the rest clamped and put in the
// table. l may be reused by the caller afterwards (a streaming store
// decoding into one Lease): the table copies the lease and gets its own
// FILTER slice (strings are immutable).
func (r *restoring) add(l *store.Lease) {
	switch {
	case !l.Expires.After(r.now):
		r.drop.add(l.Key)
		r.expired++
		if !r.s.cfg.KeepConnections {
			r.expEnds = appendCtFilters(r.expEnds, l)
		}
		r.noteNATEnd(l)
		r.lapse(l)
	case l.ExternalAddr.Is4() && l.ExternalAddr != r.s.cfg.ExternalIPv4:
		// The external IPv4 changed (or is gone): these mappings
		// cannot be kept, which is a loss of mapping state (EPO-03).
		r.drop.add(l.Key)
		r.gone = append(r.gone, pinholesOf(l)...)
		r.moved++
		if !r.s.cfg.KeepConnections {
			// Their connections end as an expired lease's do (the
			// old address may still be the host's).
			r.expEnds = appendCtFilters(r.expEnds, l)
		}
	default:
		if why := r.s.restoreRefusal(l); why != "" {
			r.refuse(l, why)
			return
		}
		if !r.owned(l) {
			r.refuse(l, whyUnowned)
			return
		}
		if r.s.clampRestored(l, r.now) {
			r.doubtful++
		}
		l.Filters = slices.Clip(slices.Clone(l.Filters))
		r.s.tab.insert(l)
	}
}

// lapse quarantines the IPv4 external port of l, a lease that expired
// while pcpd was down, from l's expiry (MAP-22): had pcpd been up, its
// expiry would have quarantined the port then (tx.freed), and a remote
// still talking to it must not land on another client's service because
// pcpd was down when it ended. restoreQuarantines drops it if that time is
// over, its address is no longer ours or a restored lease holds the port.
func (r *restoring) lapse(l *store.Lease) {
	if !l.ExternalAddr.Is4() || r.s.configForbids(l) { // a reserved port is never handed out
		return
	}
	_, q := quarantineOf(l, l.Expires)
	if !q.until.After(r.now) {
		return
	}
	r.lapsed = append(r.lapsed, storeQuar(endpointOf(l), q))
}

// finish reconciles the kernel with the table, drops from the store what
// was not restored, and continues or resets the epoch.
func (r *restoring) finish(st store.State) error {
	s, now := r.s, r.now
	lost := st.Fresh
	why := "fresh or recovered state"
	if r.doubtful > 0 {
		lost, why = true, "restored leases reach beyond the max lifetime (clock behind?)"
	}
	if r.moved > 0 {
		lost, why = true, "external IPv4 address changed"
	}
	unrestored, ok, missing, err := s.reconcile(r.ctx, r.gone, now)
	r.gone = nil
	if err != nil {
		return err // stopped: nothing written to the store
	}
	if !ok {
		lost, why = true, "some leases could not be restored into the kernel"
	}
	// Every lease kept is in the kernel (the unrestorable ones go): the
	// cut may drop what no element admits (CutArmer). An Arm that fails
	// is retried by the firewall checks (armOwed), as is the whole when
	// pcpd's objects went missing under the restore (missing: the
	// leases kept, not in the kernel; the firewall check repairs).
	s.armAfter(!missing)
	drop := r.drop
	for i := range unrestored {
		l := &unrestored[i]
		drop.add(l.Key)
		// Its IPv4 port is freed now: quarantined for its holder, who
		// gets it back at its next renewal (MAP-22,
		// TestMAP22UnrestorableLeaseQuarantined).
		if l.ExternalAddr.Is4() && !s.configForbids(l) {
			e, q := quarantineOf(l, now)
			r.freed = append(r.freed, freedPort{e, q})
		}
	}
	unrestored, r.drop = nil, nil
	// MAP-22: the stored quarantines come back, and the ports of the
	// expired, refused and unrestorable leases are quarantined, in the
	// commit that drops those leases.
	for i := range r.lapsed { // not in the store yet: written whether kept or not
		e := &r.lapsed[i].Endpoint
		r.qtouched = append(r.qtouched, endpoint{addr: e.Addr, proto: e.Protocol, port: e.Port})
	}
	r.restoreQuarantines(append(st.Quarantines, r.lapsed...))
	s.deps.State.Quarantines, r.lapsed = nil, nil
	r.quarantineRefused()
	if qc := r.quarChange(); len(drop) > 0 || qc != nil {
		r.commitDrops(drop, qc)
	}
	drop = nil
	r.revoked()
	r.flushExpired()
	r.notePriors()
	kept := s.tab.len()
	if !lost && s.epoch.resume(st.EpochOrigin, now) {
		s.restarted = true
		s.log.Info("state restored; epoch continues", zap.Int("leases", kept), zap.Int("expired", r.expired+r.moved),
			zap.Uint32("epoch", uint32(s.epoch.at(now))))
	} else {
		if !lost {
			why = "stored epoch origin is not believable (clock?)"
		}
		s.epoch.reset(now)
		if err := s.st.ResetEpoch(now); err != nil {
			return fmt.Errorf("server: reset epoch: %w", err)
		}
		s.log.Warn("mapping state lost or doubtful: epoch reset to 0", zap.String("why", why), zap.Int("leases", kept))
	}
	return nil
}

// commitDrops drops the keys of drop from the store, one commit a chunk,
// the quarantine change qc (may be nil) with the first. A kill between two
// commits leaves leases in the store that the next start drops again
// (still expired, moved or refused; an unrestorable one restored if it
// can be, its quarantine then dropped as held), never a freed port
// without its quarantine: those are durable with the first. The first
// commit that fails leaves its keys and those of every later chunk owed
// (and qc's endpoints if it was the first): the next commit, or
// housekeep's payStoreDebt, drops them. Left in the store, a refused or
// moved lease came back at a later start on an IPv4 port handed out again
// meanwhile (TestRestoreRefusedStoreDropFails). Each chunk is let go once
// committed.
func (r *restoring) commitDrops(drop keyChunks, qc *store.QuarChange) {
	s := r.s
	if len(drop) == 0 {
		drop = keyChunks{nil} // qc alone
	}
	done := 0
	for i, keys := range drop {
		q := qc
		if i > 0 {
			q = nil
		}
		err := s.st.CommitQuar(nil, keys, q)
		if err == nil {
			done += len(keys)
			drop[i] = nil
			continue
		}
		s.m.storeErrors.Inc()
		owed := 0
		for _, ks := range drop[i:] {
			for _, k := range ks {
				s.storeDebt[k] = struct{}{}
			}
			owed += len(ks)
		}
		if i == 0 {
			for _, e := range r.qtouched {
				s.quarDebt[e] = struct{}{}
			}
		}
		s.log.Warn("cannot drop expired, moved, refused or unrestorable leases from the store; retrying",
			zap.Int("leases", owed), zap.Int("dropped", done), zap.Error(err))
		return
	}
}

// flushExpired ends the connections of the leases that expired while pcpd
// was down: conntrack outlives the process, and the guard lets their
// established flows pass (flushConntrack). Not those a lease live as the
// walk decides admits (spareLive), nor the SNAT-ed ones a live lease's
// companion covers (ctAdmits.snatted; before review h/revpeer: every
// SNAT-ed one of an endpoint a restored lease held). Before, every flow of an endpoint a restored lease held was
// kept: a PEER's restored beside an expired MAP kept the MAP's flows from
// every remote (review h/revctl, TestCtFlushExpiredAtStartSparesOnlyAdmitted).
// A wildcard filter's flows (an IPv6 all-ports MAP's) likewise, one by
// one. Queued: the walk runs beside serving.
func (r *restoring) flushExpired() {
	s := r.s
	// Those of moved leases whose pinhole deletion failed wait for
	// retryUndeleted, as refused ones do (revoked).
	fs := s.pendingEnds(r.expEnds)
	r.expEnds = nil
	if len(fs) > 0 {
		s.ct.add(fs)
	}
}

// natEnd is a NAT mapping ended at the start: its external endpoint, the
// internal one its flows were DNAT-ed to, and whether it was an IPv4 PEER
// (noteNATEnded).
type natEnd struct {
	t    ctTarget
	to   netip.AddrPort
	peer bool
}

// noteNATEnd keeps l's endpoint and target for notePriors if l DNATs (an
// IPv4 NAPT mapping, an IPv6 redirect) and the ruleset may cut its kind.
// Only those: ≈ 72 bytes each until the end of the start (at most two per
// port of the external IPv4; IPv6 redirects are the ones a suggestion
// moved).
func (r *restoring) noteNATEnd(l *store.Lease) {
	if r.s.cutter == nil {
		return
	}
	if t, to, ok := dnatOfLease(l); ok {
		r.natEnds = append(r.natEnds, natEnd{t: t, to: to, peer: l.Kind == store.KindPeer && t.addr.Is4()})
	}
}

// notePriors records in natPrior the endpoints of the NAT mappings that
// ended at the start (expired while pcpd was down, refused now), as
// flushConntrack's noteNATEnded does for an end while running: until the
// start's walk (the flushes flushExpired and revoked queued, seq) has
// ended their flows, an install that retakes such an endpoint for another
// internal endpoint walks it first (natRetargets, cutRetargeted). Before
// (h/holder's left item), nothing recorded them: the retake committed,
// natcut's re-check by external endpoint passed the old flows again, and
// conntrack delivered them to the old target until the start's walk ran
// (behind a long dump, or its retries while the dump fails)
// (TestE2ERetakeBeforeStartWalk). An IPv4 PEER's (no SNAT filter), one
// whose pinhole deletion failed (its filters held back for
// retryUndeleted: pendingEnds) and all with KeepConnections (no walk;
// seedNATPrior records the flows found too) are recorded with seq 0: until
// a retarget walk or pruneNATPrior finds no NAT-ed flow left there.
func (r *restoring) notePriors() {
	s := r.s
	if len(r.natEnds) == 0 {
		return
	}
	seq := s.ct.seq()
	if s.cfg.KeepConnections {
		seq = 0
	}
	var open map[ctTarget]struct{}
	if len(s.undeleted) > 0 {
		open = make(map[ctTarget]struct{}, len(s.undeleted))
		for _, p := range s.undeleted {
			if t, _, ok := dnatOf(p); ok {
				open[t] = struct{}{}
			}
		}
	}
	walked := false
	for _, e := range r.natEnds {
		q := seq
		if _, held := open[e.t]; held || e.peer {
			q = 0
		}
		walked = walked || q != 0
		s.notePrior(e.t, e.to, q)
	}
	r.natEnds = nil
	if walked {
		// Once the start's walk has ended their flows, their records
		// are of no use (h/left10): dropped then, not at the next
		// doubling or housekeeping prune (at 1 000 000 IPv6 redirects
		// ended, ≈ 100 MB held meanwhile). From the flusher, which
		// may call at once (under s.mu here): in a goroutine.
		// A waiter is called after ctHoldAttempts failed walks too (not
		// clean: nothing dropped): the success ending the run drops
		// them then (priorDropAt, reportCtWalk; review h/revleft10).
		s.priorDropAt.Store(seq)
		s.ct.after(seq, func() { go s.dropWalkedPriors() })
	}
}

// maxOrphanTargets bounds the addresses announced to from orphan pinholes.
const maxOrphanTargets = 4096

// reconcile puts the pinholes of the table's leases back into the kernel
// with their remaining lifetimes, in transactions of pinhole.MaxBatch ops
// (re-adding a pinhole that is there only resets its timeout). Leases it
// cannot put in place leave the table; it returns them and whether
// all could. Leases whose install found pcpd's own objects missing (a
// firewall reload during the start) stay in the table, not in the
// kernel: missing, and not ok; the firewall check repairs.
//
// It does not list the kernel's pinholes: a dump of a large set takes the
// kernel time quadratic in its size (~2-7 s per 100 000, minutes at
// 1 000 000), while re-installing is linear (~0.4 s per 100 000). Pinholes
// of ours that no lease explains (orphans) are removed by the first
// firewall audit, in the background once serving has started
// (auditFirewall); until then, and for ever above auditMaxLeases, they are
// left to their kernel timeouts.
//
// The pinholes gone (of leases dropped because the external IPv4 changed,
// or because the rules refuse them now) are removed, unless a live lease
// on the same tuple holds one: they are known without a dump. Sorted
// (gone is reordered), one tuple's are together: its leases are read
// once, and duplicates are adjacent. A deletion that fails leaves orphans
// for retryUndeleted (the next firewall check or audit), and beyond
// maxUndeleted for the first audit.
func (s *Server) reconcile(ctx context.Context, gone []pinhole.Pinhole, now time.Time) (_ []store.Lease, ok, missing bool, _ error) {
	// The context is looked at before each batch: a restore stopped
	// (StartContext) returns ErrStartStopped and none of the leases.
	stop := func() error {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("%w: %w", ErrStartStopped, err)
		}
		return nil
	}
	slices.SortFunc(gone, comparePinholes)
	gone = slices.Compact(gone)
	ops := make([]pinhole.Op, 0, pinhole.MaxBatch)
	var derr error
	over := 0                  // failed deletions beyond maxUndeleted
	var held []pinhole.Pinhole // the live pinholes of gone[i]'s tuple
	for i, p := range gone {
		if i == 0 || p.Protocol != gone[i-1].Protocol || p.InternalAddr != gone[i-1].InternalAddr || p.InternalPort != gone[i-1].InternalPort {
			held = held[:0]
			for _, l := range s.tab.onTuple(tuple{proto: p.Protocol, addr: p.InternalAddr, port: p.InternalPort}) {
				held = appendPinholes(held, l)
			}
		}
		if slices.Contains(held, p) {
			continue
		}
		ops = append(ops, pinhole.Op{Kind: pinhole.Delete, Pinhole: p})
		if len(ops) == pinhole.MaxBatch {
			if err := stop(); err != nil {
				return nil, false, false, err
			}
			if err := s.fw.Apply(ops); err != nil {
				derr = cmp.Or(derr, err)
				over += s.oweDeletes(ops)
			}
			ops = ops[:0]
		}
	}
	if len(ops) > 0 {
		if err := s.fw.Apply(ops); err != nil {
			derr = cmp.Or(derr, err)
			over += s.oweDeletes(ops)
		}
		ops = ops[:0]
	}
	if derr != nil {
		s.log.Error("cannot remove the pinholes of dropped leases; retrying at the next firewall check or audit",
			zap.Int("pinholes", len(s.undeleted)), zap.Int("beyond_retry_list", over), zap.Error(derr))
	}
	err, stopErr := s.installAll(now, stop)
	if stopErr != nil {
		return nil, false, false, stopErr
	}
	if err == nil {
		return nil, true, false, nil
	}
	// Re-installing what went in already is harmless (it only resets the
	// timeout to the same value).
	s.log.Warn("restoring all pinholes failed; trying lease by lease", zap.Error(err))
	var failed []store.Lease
	for _, l := range s.tab.all() {
		if err := stop(); err != nil {
			return nil, false, false, err
		}
		var lops []pinhole.Op
		for _, p := range pinholesOf(l) {
			lops = append(lops, pinhole.Op{Kind: pinhole.Install, Pinhole: p, Timeout: s.tab.timeout(p, l, now)})
		}
		if err := s.fw.Apply(lops); err != nil {
			if errors.Is(err, pinhole.ErrMissing) {
				// pcpd's table or a set of it is gone (an admin's
				// "flush ruleset" during the start): nothing of the
				// lease's. Kept: the firewall check's repair lays the
				// objects out again and installs every lease (review
				// h/revarm, finding 4; before, every lease was
				// dropped, TestE2EReloadDuringRestoreKeepsLeases).
				missing = true
				continue
			}
			s.log.Error("cannot restore lease; dropped", append(leaseFields(l, l.ClientAddr), zap.Error(err))...)
			failed = append(failed, *l)
		}
	}
	for i := range failed {
		s.tab.del(failed[i].Key)
	}
	if missing {
		s.log.Error("pcpd's nftables objects went missing during the restore; leases kept, repairing at the first firewall check")
	}
	// Not ok with leases kept but not in the kernel: the epoch resets.
	return failed, len(failed) == 0 && !missing, missing, nil
}

// installAll puts the pinholes of every lease in the table into the
// kernel (table.installs), in transactions of pinhole.MaxBatch ops, stop
// asked before each; it returns the first Apply's error (the rest not
// tried) or stop's. The table is walked and the ops made in a goroutine
// of their own, at most two batches ahead of the kernel's transactions:
// at 1 000 000 leases the walk (a random read of each lease's record,
// its pinholes) took 0.6-0.9 s of the ≈ 4.5 s reconciliation on the bench
// machine, in series with the kernel's share (BENCHMARKS.md item 62). The
// caller holds s.mu throughout; the walk only reads the table and
// s.dirty, Apply only the ops it is given, so the two share nothing
// but the batches, handed over by channel.
func (s *Server) installAll(now time.Time, stop func() error) (err, stopErr error) {
	const ahead = 2
	full := make(chan []pinhole.Op, ahead)
	free := make(chan []pinhole.Op, ahead+1)
	for range ahead + 1 {
		free <- make([]pinhole.Op, 0, pinhole.MaxBatch)
	}
	quit := make(chan struct{})
	go func() {
		defer close(full)
		ops := <-free
		s.tab.installs(now, s.kernelExpiry, func(op pinhole.Op) bool {
			ops = append(ops, op)
			if len(ops) < pinhole.MaxBatch {
				return true
			}
			select {
			case full <- ops:
			case <-quit:
				return false
			}
			select {
			case ops = <-free:
				return true
			case <-quit:
				return false
			}
		})
		if len(ops) > 0 {
			select {
			case full <- ops:
			case <-quit:
			}
		}
	}()
	defer func() {
		close(quit)
		for range full { // the walk has ended once full is closed
		}
	}()
	for ops := range full {
		if len(ops) == pinhole.MaxBatch {
			if stopErr = stop(); stopErr != nil {
				return nil, stopErr
			}
		}
		if err = s.fw.Apply(ops); err != nil {
			return err, nil
		}
		free <- ops[:0]
	}
	return nil, nil
}

// maxUndeleted bounds Server.undeleted (≈ 100 bytes a pinhole): a kernel
// refusing every deletion at a start that drops 1 000 000 leases keeps
// the first 65 536; the rest are left to the first firewall audit (none
// above auditMaxLeases: they end with their kernel timeouts), and their
// connections are flushed at once.
const maxUndeleted = 1 << 16

// oweDeletes keeps the pinholes of ops, a batch of deletions the kernel
// refused, for retryUndeleted; it returns how many did not fit.
func (s *Server) oweDeletes(ops []pinhole.Op) int {
	n := 0
	for _, op := range ops {
		if len(s.undeleted) == maxUndeleted {
			n++
			continue
		}
		s.undeleted = append(s.undeleted, op.Pinhole)
	}
	return n
}

// pendingEnds keeps back, in Server.undeletedEnds, the connections of ends
// whose pinhole is in Server.undeleted (its deletion failed), and returns
// the rest, to flush now.
func (s *Server) pendingEnds(ends []ctFilter) []ctFilter {
	if len(s.undeleted) == 0 {
		return ends
	}
	open := make(map[ctTarget]struct{}, len(s.undeleted))
	for _, p := range s.undeleted {
		open[ctTarget{addr: p.ExternalAddr, proto: p.Protocol, port: p.ExternalPort}] = struct{}{}
	}
	now := ends[:0]
	for _, f := range ends {
		if _, ok := open[f.t]; ok {
			s.undeletedEnds = append(s.undeletedEnds, f)
		} else {
			now = append(now, f)
		}
	}
	return now
}

// retryUndeleted deletes again the pinholes of leases dropped at start
// whose deletion failed (Server.undeleted), in batches, keeping those of
// batches the kernel refuses again; checkFirewall and auditFirewall call
// it. A pinhole a live lease holds now (one on its tuple holds the same
// element, or its external endpoint went to another internal tuple: the
// kernel's element is that lease's) is dropped, not deleted. Once a
// pinhole is gone, the connections of its lease are flushed but for those
// a live lease admits as the walk decides (spareLive).
func (s *Server) retryUndeleted() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.undeleted) == 0 {
		return
	}
	ops := make([]pinhole.Op, 0, len(s.undeleted))
	for _, p := range s.undeleted {
		if !s.heldNow(p) {
			ops = append(ops, pinhole.Op{Kind: pinhole.Delete, Pinhole: p})
		}
	}
	var left []pinhole.Pinhole
	var err error
	for i := 0; i < len(ops); i += pinhole.MaxBatch {
		batch := ops[i:min(i+pinhole.MaxBatch, len(ops))]
		if e := s.fw.Apply(batch); e != nil {
			s.m.kernelErrors.Inc()
			err = cmp.Or(err, e)
			for _, op := range batch {
				left = append(left, op.Pinhole)
			}
		}
	}
	done := len(s.undeleted) - len(left)
	s.undeleted = left
	if err != nil {
		s.log.Warn("cannot remove the pinholes of leases dropped at start; retrying at the next firewall check",
			zap.Int("pinholes", len(left)), zap.Error(err))
	} else {
		s.log.Info("the pinholes of leases dropped at start whose deletion had failed are gone", zap.Int("count", done))
	}
	ends := s.undeletedEnds
	s.undeletedEnds = nil
	// What a live lease admits is spared (spareLive; a lease that took
	// the endpoint since, DNAT-ing it to another internal tuple, admits
	// none of the old flows: pinhole.Pinhole.AdmitsFlow); before, every
	// flow of an endpoint a live lease held was kept.
	flush := s.pendingEnds(ends)
	if len(flush) > 0 {
		s.ct.add(flush)
	}
}

// heldNow reports whether a live lease holds the pinhole p, or its
// external endpoint with another internal tuple.
func (s *Server) heldNow(p pinhole.Pinhole) bool {
	if h, ok := s.tab.holder(endpoint{addr: p.ExternalAddr, proto: p.Protocol, port: p.ExternalPort}); ok &&
		(h.addr != p.InternalAddr || h.port != p.InternalPort) {
		return true
	}
	var held []pinhole.Pinhole
	for _, l := range s.tab.onTuple(tuple{proto: p.Protocol, addr: p.InternalAddr, port: p.InternalPort}) {
		held = appendPinholes(held, l)
	}
	return slices.Contains(held, p)
}

// partialSetup: Setup put everything in place but the owner meter or the
// protected sets (its error wraps only pinhole.ErrOwnerMeter or
// pinhole.ErrProtected): pinholes can be installed, and checkFirewall
// retries the rest alone.
func partialSetup(err error) bool {
	return err != nil && (errors.Is(err, pinhole.ErrOwnerMeter) || errors.Is(err, pinhole.ErrProtected))
}

// repairPartial repairs what Healthy found damaged when that is only the
// owner meter (herr wraps pinhole.ErrOwnerMeter) or the protected sets
// (pinhole.ErrProtected), or both, by rewriting those alone (RepairOwners,
// RepairProtected): no lock, no re-install of every lease, since neither
// holds a pinhole. It reports false when a full repair is needed (other
// damage, or a firewall that cannot repair that part alone). A repair that
// fails is retried at the next check, again alone: a protected set that
// cannot be written (a SetProtected that failed part way) used to make
// every check a full repair, which also wrote the old prefixes back
// (review of 2026-12-03).
func (s *Server) repairPartial(herr error) bool {
	meter, prot := errors.Is(herr, pinhole.ErrOwnerMeter), errors.Is(herr, pinhole.ErrProtected)
	om, canMeter := s.fw.(OwnerMeter)
	pr, canProt := s.fw.(ProtectedRepairer)
	if !meter && !prot || meter && !canMeter || prot && !canProt {
		return false
	}
	ok := true
	if prot {
		s.log.Warn("protected sets damaged or not written; restoring them", zap.Error(herr))
		if err := pr.RepairProtected(); err != nil {
			ok = false
			s.log.Error("cannot restore the protected sets; retrying at the next firewall check", zap.Error(err))
		}
	}
	if meter {
		s.log.Warn("kernel owner meter damaged or missing; restoring it", zap.Error(herr))
		if err := om.RepairOwners(); err != nil {
			ok = false
			s.m.meterErrors.Inc()
			s.log.Error("cannot restore the kernel's owner meter; retrying at the next firewall check", zap.Error(err))
		}
	}
	if ok {
		s.m.restores.Inc()
	}
	return true
}

// checkFirewall restores pcpd's nftables objects and pinholes when someone
// deleted or damaged them (tamper watch). The check itself (Healthy:
// objects, rule counts and every set's sentinel element) dumps nothing and
// runs without s.mu, so serving goes on; only a repair takes the lock, and
// re-installs every lease's pinholes (a flushed set or a re-created table
// has lost them all). A check that could not tell (pinhole.ErrCheckFailed)
// repairs nothing.
//
// When only the kernel's owner meter is off (its writing failed, or
// someone changed it: Healthy's error wraps pinhole.ErrOwnerMeter), only
// the meter is written again, without the lock or a re-install: it holds
// no pinhole. And when Setup restores everything but the owner meter, the
// pinholes are re-installed all the same (reasons at pinhole's Setup: the
// meter only drops requests, and the leases were each authorised); the
// meter is retried at the next check.
func (s *Server) checkFirewall() {
	s.retryUndeleted()
	if rf, ok := s.fw.(RouteFollower); ok {
		// First, so that Healthy compares the owner chains with the
		// routes as they are now.
		if err := rf.FollowRoutes(); err != nil {
			s.log.Warn("kernel owner meter: cannot follow the routes of the owned prefixes", zap.Error(err))
		}
		s.noteRouteLookups()
	}
	gen := s.unflowed.checks.Add(1)
	herr := s.fw.Healthy()
	// Unless the check could not tell: the conntrack filters left out
	// before it are done, or (damage) walked now (skipUnflowed).
	if herr == nil || errors.Is(herr, pinhole.ErrUnhealthy) {
		s.releaseUnflowed(gen, herr != nil)
	}
	if herr == nil {
		s.rearmOwed()
		s.verifySetup() // one a repair's could not finish (a Setup beside it)
		s.regainFlowed()
		return
	}
	if errors.Is(herr, pinhole.ErrCheckFailed) && !errors.Is(herr, pinhole.ErrUnhealthy) {
		// The check could not tell (its sentinel transaction aborted with
		// ENOMEM): no damage found. A full repair (Setup, every lease's
		// pinholes re-installed under s.mu) for it would only meet the
		// same memory pressure; the next check tells (h/nftenomem).
		s.log.Warn("firewall check failed; checking again at the next firewall check", zap.Error(herr))
		return
	}
	if s.repairPartial(herr) {
		return
	}
	// Setup's read of conntrack (whether labelled flows live: the cut is
	// laid out disarmed until the re-install is done), before s.mu: it
	// reads the whole table when none is labelled, and the engine waited
	// for it (1 000 000 entries: 2.0-2.6 s; TestRepairStallFigure).
	if p, ok := s.fw.(SetupPreparer); ok {
		p.PrepareSetup()
	}
	s.repairLocked(herr)
	// Setup took PrepareSetup's "no flow let in unlabelled", a read older
	// than the layout it wrote by the wait for s.mu: CutsFlows is false
	// for the kind until conntrack is read again, here without s.mu
	// (review h/revleft9, TestPreparedSetupSeesUnlabelledFlow).
	s.verifySetup()
}

// verifySetup reads conntrack again where a repair's Setup took
// PrepareSetup's answers (SetupPreparer.VerifySetup), without s.mu; once
// CutsFlows is true again, the retakes a false CutsFlows held are walked
// (cutHeldRetargets, as after a repair).
func (s *Server) verifySetup() {
	p, ok := s.fw.(SetupPreparer)
	if !ok || !p.VerifySetup() {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cutHeldRetargets()
}

// repairLocked is checkFirewall's repair under s.mu: Setup, every lease's
// pinholes re-installed, the cut armed, the held retakes walked.
func (s *Server) repairLocked(herr error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	defer s.watch.relaid.Add(1) // at the end of the hold (auditStale)
	now := s.now()
	s.expireLocked(now)
	s.log.Warn("firewall objects damaged or missing; restoring", zap.Error(herr))
	if err := s.fw.Setup(); partialSetup(err) {
		if errors.Is(err, pinhole.ErrOwnerMeter) {
			s.m.meterErrors.Inc()
		}
		s.log.Error("restored the firewall objects but not the kernel's owner meter or protected sets; re-installing pinholes, retrying the rest at the next firewall check", zap.Error(err))
	} else if err != nil {
		s.log.Error("cannot restore firewall objects", zap.Error(err))
		return
	}
	// The guard's prefixes are given again (SetProtected writes only what
	// the kernel lacks). The owner meter's are not forced: Setup has just
	// written the firewall's last owners, which s.meterOwners records, and
	// updateMeterOwners still gives any change since. Forcing them wrote
	// the meter a second time right after Setup, and when Setup's write had
	// failed, failed and counted it again: pcpd_owner_meter_errors_total
	// went up by two for one failed repair.
	s.protected = nil
	s.updateProtected()
	n, err := s.reinstallLocked(now)
	s.m.restores.Inc()
	// Every lease is back: the cut may drop what no element admits
	// (CutArmer). Before the held retakes' walk, which asks CutsFlows.
	// On a failure it is left disarmed (a Setup that laid it out so):
	// the leases not back keep their flows, and CutsFlows is false, so
	// deletes wait for the walk; the next check re-installs and arms
	// (armOwed).
	s.armAfter(err == nil)
	if err == nil {
		s.watch.reinstalls.Add(1)
	}
	// The retakes whose walk a damaged layout skipped (retarget.go).
	s.cutHeldRetargets()
	if err != nil {
		s.log.Error("cannot re-install pinholes", zap.Int("pinholes", n), zap.Bool("retried_at_next_check", s.armOwed), zap.Error(err))
		return
	}
	s.log.Warn("re-installed every lease's pinholes", zap.Int("count", n))
}

// reinstallLocked installs every live lease's pinholes again, in
// batches as they are made (a list of every op would be ≈ 120 MB at
// 1 000 000 leases), and returns how many and the first error. Under
// s.mu.
//
// A batch the kernel refuses for one of its ops (ErrConflict,
// ErrInvalid) is applied again op by op, so that one element it will not
// take (a conflicting pair of intervals held since
// before overlapsHeld, or anything else) costs its own pinhole, not every
// other client's in the same transaction: before, the whole batch (up to
// pinhole.MaxBatch elements, other clients' included) stayed out of the
// kernel at every retry (issue 9, h/hunt, TestReinstallFailedBatchOpByOp).
func (s *Server) reinstallLocked(now time.Time) (int, error) {
	ops := make([]pinhole.Op, 0, pinhole.MaxBatch)
	n := 0
	var err error
	apply := func() {
		if e := s.fw.Apply(ops); e != nil {
			err = cmp.Or(err, e)
			if errors.Is(e, pinhole.ErrConflict) || errors.Is(e, pinhole.ErrInvalid) {
				// One op's refusal; not a table gone or memory
				// short, which every op would meet again (a million
				// leases: a million transactions under s.mu).
				for i := range ops {
					s.fw.Apply(ops[i : i+1])
				}
			}
		}
		ops = ops[:0]
	}
	s.tab.installs(now, s.kernelExpiry, func(op pinhole.Op) bool {
		ops = append(ops, op)
		n++
		if len(ops) == pinhole.MaxBatch {
			apply()
		}
		return true
	})
	if len(ops) > 0 {
		apply()
	}
	return n, err
}

// armAfter arms the ruleset's cut after a re-install of every lease
// or a restore (back: every lease's pinholes are in the kernel): unless
// they are not, or Arm fails, in which case armOwed is set and the next
// firewall check that finds the layout healthy re-installs every lease
// and arms (rearmOwed).
// Before, a re-install that failed once left the cut disarmed (and
// CutsFlows false) for the rest of the process: Healthy checks the
// disarmed layout as intact, so no later repair armed it (review
// h/revarm, finding 1; TestE2EReinstallFailedArmsLater). Under s.mu,
// or before Serve.
func (s *Server) armAfter(back bool) {
	if _, ok := s.fw.(CutArmer); !ok {
		return
	}
	s.noteReinstall(back)
	s.armOwed = !back || !s.armCut()
}

// reinstallSkipMax bounds the firewall checks a re-install that keeps
// failing skips (31: ≈ 2.6 min at the default TamperInterval).
const reinstallSkipMax = 31

// noteReinstall records whether every lease's pinholes are back (a
// re-install or the restore): if not, a re-install is owed, tried at the
// next check after the first failure in a row and then after 1, 3, 7 ...
// up to reinstallSkipMax checks skipped. Under s.mu.
func (s *Server) noteReinstall(back bool) {
	s.reinstallOwed = !back
	if back {
		s.reinstallFails, s.reinstallSkip = 0, 0
		return
	}
	s.reinstallFails++
	s.reinstallSkip = min(1<<min(s.reinstallFails-1, 5), reinstallSkipMax+1) - 1
}

// rearmOwed, at a firewall check that found the layout healthy: when a
// repair's re-install or an Arm failed (armOwed), every lease's pinholes
// are installed again if that is what failed (reinstallOwed; installing
// what is there only resets its timeout) and the cut is armed, then the
// retakes a disarmed cut held are walked (cutHeldRetargets, as after a
// repair). Before (review h/revarm's left item), every check while an
// Arm kept failing re-installed every lease too, under s.mu (≈ 0.4 s
// per 100 000 leases: at 1 000 000 the engine held ≈ 4 s every 5 s),
// and so did every check while the re-install kept failing; now an Arm
// alone is retried, and a failing re-install backs off (noteReinstall).
func (s *Server) rearmOwed() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.armOwed {
		return
	}
	now := s.now()
	s.expireLocked(now)
	if s.reinstallOwed {
		if s.reinstallSkip > 0 {
			s.reinstallSkip--
			return
		}
		n, err := s.reinstallLocked(now)
		defer s.watch.relaid.Add(1) // at the end of the hold (auditStale)
		s.armAfter(err == nil)
		if err == nil {
			s.watch.reinstalls.Add(1)
		}
		s.cutHeldRetargets()
		if err != nil {
			s.log.Error("cannot re-install pinholes; trying again at a later firewall check", zap.Int("pinholes", n),
				zap.Int("checks_skipped", s.reinstallSkip), zap.Error(err))
			return
		}
		s.log.Warn("re-installed every lease's pinholes", zap.Int("count", n))
		return
	}
	// Every lease's pinholes went back; only the Arm failed.
	s.armOwed = !s.armCut()
	s.cutHeldRetargets()
}

// armCut arms the ruleset's cut of ended mappings' flows, once every
// lease's pinholes are in the kernel (CutArmer), and reports whether it
// is armed. A failure leaves it disarmed: the server waits for its
// walks as without the cut.
func (s *Server) armCut() bool {
	if a, ok := s.fw.(CutArmer); ok {
		if err := a.Arm(); err != nil {
			s.log.Error("cannot arm the ruleset's cut of ended mappings' flows; deletes wait for the conntrack walk", zap.Error(err))
			return false
		}
	}
	return true
}

// auditMaxLeases: above this many leases the audit does not dump the
// kernel's sets, whose dump of a hash set is quadratic in its size (~2-7 s
// of kernel CPU at 100 000 pinholes, minutes at 1 000 000): it installs
// every live lease's pinholes again in steps instead (auditLarge,
// auditbig.go), and orphans end with their kernel timeouts. A variable for
// tests.
var auditMaxLeases = 200_000

// auditFirewall compares the kernel's pinholes with the lease table: it
// re-installs pinholes no dump showed and removes pinholes of ours that no
// lease explains (orphans: leases lost with the store, or ended while pcpd
// was down, or elements someone deleted by hand). It runs rarely
// (AuditInterval, once after start, after lost watch notifications), in
// the background, on a goroutine of its own (watchFirewall's auditRun:
// the watch's passes, the tamper check and the route follow go on
// meanwhile): the dump goes on its own socket without s.mu (the backend
// lets Apply go on meanwhile), and only the comparison and the fix take
// the lock. A pinhole changed while the dump ran may be seen as missing;
// re-installing it is harmless. Above auditMaxLeases there is no dump:
// auditLarge. A pinhole set found missing is repaired by a firewall check
// at once (audit reports it; watchFirewall runs the check on its own
// goroutine).
func (s *Server) auditFirewall(ctx context.Context) {
	if s.audit(ctx) {
		s.checkFirewall()
	}
}

// auditStaleDumps bounds how many dumps in a row one audit discards
// because a repair re-laid the firewall out while each ran (auditStale);
// the last one is acted on all the same (see there: redundant, not wrong).
const auditStaleDumps = 3

// audit is auditFirewall but for the firewall check a missing pinhole set
// asks for: it reports whether one is owed (pinhole.ErrMissing), and
// never runs the check itself. It runs beside watchFirewall's goroutine
// (auditRun), which runs that check: checkFirewall is that goroutine's
// alone.
func (s *Server) audit(ctx context.Context) (checkOwed bool) {
	s.retryUndeleted() // also above auditMaxLeases
	s.mu.Lock()
	n := s.tab.len()
	s.mu.Unlock()
	if n > auditMaxLeases {
		return s.auditLarge(ctx, n)
	}
	defer s.watch.takePutBacks() // the record ends with the audit
	for try := 1; ; try++ {
		start := time.Now()
		gen := s.watch.relaid.Load()
		// The watch's put-backs from here on are not re-installed
		// (trackPutBacks, fwwatch.go).
		s.watch.trackPutBacks()
		// Each element's Remaining is from a read after this one: on the
		// steady clock, which no rebase moves, and put in the running
		// clock's frame under s.mu (auditDumped).
		listed := s.steady()
		have, err := s.list(ctx)
		if ctx.Err() != nil {
			// Stopped (Serve returns): a dump cut short is never acted
			// on, nor its error reported (ContextLister).
			return false
		}
		if errors.Is(err, pinhole.ErrMissing) {
			// A pinhole set gone (deleted by hand after the rules that use
			// it): tampering, which the firewall check repairs now rather
			// than at its next tick.
			s.log.Warn("firewall audit: a pinhole set is missing; checking the firewall now", zap.Error(err))
			return true
		}
		if err != nil {
			s.log.Warn("firewall audit: cannot list pinholes", zap.Error(err))
			return false
		}
		dumped := time.Since(start)
		if s.auditDumped(have, gen, listed, dumped, try < auditStaleDumps) {
			return false
		}
	}
}

// list is the audit's dump: given up when ctx ends if the firewall can
// (ContextLister). Before (h/auditend), Serve's return waited for the
// rest of a dump in progress (TestE2EStopDuringAuditDump).
func (s *Server) list(ctx context.Context) ([]pinhole.Entry, error) {
	if l, ok := s.fw.(ContextLister); ok {
		return l.ListContext(ctx)
	}
	return s.fw.List()
}

// auditDumped is the audit's comparison and fix for the dump have (read
// from listed on, gen the firewall's relaid count before it): false, and
// nothing done, if a repair re-laid the firewall out since gen and redump
// allows another dump (auditStale).
func (s *Server) auditDumped(have []pinhole.Entry, gen uint64, listed time.Time, dumped time.Duration, redump bool) bool {
	present := make(map[pinhole.Pinhole]struct{}, len(have))
	for _, e := range have {
		if e.NoCompanion {
			// A mapping whose SNAT companion the dump did not show: a
			// live one goes back whole (missing: its Install writes
			// both), an orphan's Delete takes both. Before (review
			// h/revsnat), present: a live mapping's companion deleted
			// while the watch was deaf stayed missing
			// (TestE2EAuditPutsBackDeletedCompanion).
			continue
		}
		present[e.Pinhole] = struct{}{}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.auditStale(gen, redump) {
		return false
	}
	// What the watch put back since the dump began, not told deleted
	// again since, is in the kernel: not missing. Before (h/auditlife), a
	// live lease's element a tool deleted during the dump (one by one: no
	// repair) was put back by the watch and re-installed here again, under
	// s.mu (TestAuditLeavesWatchPutBacks).
	putBack := 0
	for p := range s.watch.takePutBacks() {
		if _, ok := present[p]; !ok {
			present[p] = struct{}{}
			putBack++
		}
	}
	now := s.now()
	// listed in the frame of now and the lease expiries: a rebase while
	// the dump ran (a wall-clock step, clock.go) shifted them, not the
	// kernel's timeouts. Before (review h/revrem,
	// TestAuditCutBackAcrossWallStep), listed was the running clock's
	// reading before the dump: after a step back every intact element
	// looked longer than its lease by the step and was re-installed under
	// s.mu, and a step forward hid those held longer by less than it.
	listed = listed.Add(s.shifted())
	// wanted: the live leases' pinholes, each with the latest expiry the
	// kernel should hold for it (as missingUntil).
	wanted := make(map[pinhole.Pinhole]time.Time, len(present))
	// A missing pinhole goes back once, with what the kernel should hold:
	// the latest expiry among the live leases holding it (a PEER and a
	// filtered MAP share an element), a dirty lease's synced one
	// (kernelExpiry), as tx.diff and auditLarge compute it. Before, it was
	// installed once per holder with that lease's table expiry: the last
	// holder's won (the shared element could end with the shorter lease,
	// the other left without its pinhole), and an absorbed renewal's
	// element got the table's expiry, beyond the stored lease
	// (TestAuditRestoresKernelView).
	missingUntil := make(map[pinhole.Pinhole]time.Time)
	for _, l := range s.tab.all() {
		if !l.Expires.After(now) {
			continue
		}
		// Nothing for a lease whose kernel view ends within a millisecond
		// or has ended (an absorbed renewal not flushed past its synced
		// expiry: a failing store), as auditLarge; before (review
		// h/revbigaudit), such a pinhole went back for a millisecond
		// (TestAuditSkipsEndedKernelView).
		at := s.kernelExpiry(l)
		back := at.Sub(now) >= time.Millisecond
		for _, p := range pinholesOf(l) {
			if at.After(wanted[p]) {
				wanted[p] = at
			}
			if _, ok := present[p]; !ok && back && at.After(missingUntil[p]) {
				missingUntil[p] = at
			}
		}
	}
	missing := make([]pinhole.Op, 0, len(missingUntil))
	for p, at := range missingUntil {
		missing = append(missing, pinhole.Op{Kind: pinhole.Install, Pinhole: p, Timeout: at.Sub(now).Truncate(time.Millisecond)})
	}
	// Each orphan's delete goes with the live pinholes sharing one of its
	// elements' keys (holders.sharers: taken out before, put back after,
	// in one transaction), and a fix the kernel refuses is left out, the
	// rest applied. Before (review h/revfwadd), one refused op failed the
	// whole batch: a NAPT mapping added by hand on a live mapping's
	// internal endpoint (its Delete's SNAT companion clashes) made every
	// audit fix nothing, missing pinholes of other leases included
	// (TestE2EAuditNAPTOnLiveEndpoint); an orphan whose external endpoint
	// a live lease holds was skipped, so the live lease's element it
	// replaced stayed missing (its install refused, failing the batch).
	hs := &holders{s: s, now: now}
	defer hs.clear()
	var fix [][]pinhole.Op
	var longer []pinhole.Op
	orphans := 0
	for _, e := range have {
		p := e.Pinhole
		if until, ok := wanted[p]; ok {
			if !e.NoCompanion { // else missing: re-installed whole
				longer = cutBack(longer, e, until, listed, now)
			}
			continue
		}
		if n, ok := p.SNATCompanionOf(); ok {
			if _, live := wanted[n]; live {
				// A live mapping's own companion, its map element gone
				// (by hand): left as it is, the mapping's put-back
				// (missing) writes the map element.
				continue
			}
		}
		// An external endpoint a lease holds now (a port handed out again
		// since the dump): the delete, with the holder's pinhole put back
		// after it, is refused if the kernel holds the new target (left
		// out), and applied if p replaced the holder's element.
		_, held := s.tab.holder(endpoint{addr: p.ExternalAddr, proto: p.Protocol, port: p.ExternalPort})
		fix = append(fix, hs.deleteGroup(p))
		orphans++
		// No ANNOUNCE target from a SNAT element by hand (OddSNAT: no
		// client's mapping, its address whatever the element says).
		if a := p.InternalAddr; !held && !p.OddSNAT() && a.IsValid() && !slices.Contains(s.orphans, a) && len(s.orphans) < maxOrphanTargets {
			s.orphans = append(s.orphans, a)
		}
	}
	// The missing pinholes go back after the orphans' deletes, in
	// transactions of their own: an orphan whose range covers a missing
	// one's start (an all-ports element by hand over a live one on another
	// port, which sharers does not find: the table has no index by
	// address) refuses its install in the same phase. Before (h/redir6),
	// one batch: the install was refused and the live pinhole missing
	// until the next audit (TestE2EAuditPutsBackUnderAllPorts).
	back := make([][]pinhole.Op, 0, len(missing)+len(longer))
	for _, op := range missing {
		back = append(back, []pinhole.Op{op})
	}
	for _, op := range longer {
		back = append(back, []pinhole.Op{op})
	}
	refused := func(op pinhole.Op, err error) {
		s.log.Warn("firewall audit: the kernel refuses a fix (changed since the dump?); the rest goes on", zap.Stringer("pinhole", op.Pinhole), zap.Error(err))
	}
	_, err := s.applyGroups(fix, now, refused)
	if _, berr := s.applyGroups(back, now, refused); berr != nil {
		err = berr
	}
	if err != nil {
		s.log.Error("firewall audit: cannot fix the kernel's pinholes", zap.Error(err))
	}
	if orphans > 0 {
		s.log.Info("removed pinholes no lease explains", zap.Int("count", orphans))
	}
	if len(missing) > 0 {
		s.log.Info("firewall audit: re-installed pinholes the dump did not show (changed during it, or deleted by hand)", zap.Int("count", len(missing)))
	}
	if len(longer) > 0 {
		first := make([]string, 0, 4)
		for _, op := range longer[:min(len(longer), cap(first))] {
			first = append(first, op.Pinhole.String())
		}
		s.log.Warn("firewall audit: live leases' pinholes held longer than their leases (re-added by hand while the watch was off or deaf?); cut back to their leases' remaining lifetimes",
			zap.Int("count", len(longer)), zap.Strings("first", first))
	}
	s.log.Debug("firewall audit done", zap.Int("pinholes", len(have)), zap.Duration("dump", dumped), zap.Int("put_back_by_the_watch", putBack))
	return true
}

// auditStale reports whether the audit's dump, begun when the firewall's
// relaid count was gen, is to be discarded and read again (redump: the
// audit may dump again): a firewall check re-laid pcpd's objects out and
// installed every lease again (repairLocked, rearmOwed) since. Under s.mu,
// which those hold throughout, so the count read here is exact. Before
// (h/auditgo) the audit ran on the goroutine of the check and none could
// overlap its dump; now one does, and its snapshot may be of the table
// before the repair or of sets part way through its re-install. Acted
// on, it is not wrong (the fix is computed from the table now: only live
// leases' pinholes are written, only elements no live lease holds are
// deleted, both what the repair did already), but redundant: every live
// pinhole a part-filled set lacked installed a second time under s.mu
// (≈ 0.4 s per 100 000 at the engine's cost) and logged as deleted by
// hand, every orphan of a deleted table "removed" again
// (TestE2EAuditRedumpsAfterRepair). A dump again costs kernel time
// without s.mu instead; after auditStaleDumps in a row (someone
// re-damaging the firewall each watchCheckGap) the last is acted on.
func (s *Server) auditStale(gen uint64, redump bool) bool {
	if s.watch.relaid.Load() == gen {
		return false
	}
	if !redump {
		s.log.Warn("firewall audit: the firewall was repaired during each of its dumps; acting on the last one")
		return false
	}
	s.log.Info("firewall audit: the firewall was repaired while the dump ran; dumping again")
	return true
}

// cutBack appends to ops the Install that cuts back e, an element held
// for a live lease (listed: the clock read before the dump), if the
// kernel holds it longer than it should: with no timeout, or ending more
// than addSlack after until (the latest expiry of the live leases
// holding it, an absorbed renewal's synced one: kernelExpiry), a NAPT
// mapping by the longer of its map element and its SNAT companion. It is
// installed again with until's remaining time at now (at least a
// millisecond, as holders.until: a synced expiry already past ends it at
// once, the lease's flush raises it): never below the lease; the kernel
// updates the timeout in place (Linux ≥ 6.10) or Install re-creates the
// element. An element within addSlack of until (the audit's and the
// engine's own writes: a commit's latency, a jiffy, the nudge) is left
// as it is: an intact table's audit writes nothing. It costs the audit's
// hold of s.mu a comparison per element (the look-up is the orphan
// check's). Before (h/auditrem, review h/revsnat finding 4), the audit
// ignored Remaining: a live lease's element re-added by hand with a
// longer timeout, or none, while the watch was off or deaf outlived its
// lease (TestE2EAuditCutsBackLongerTimeouts).
func cutBack(ops []pinhole.Op, e pinhole.Entry, until, listed, now time.Time) []pinhole.Op {
	if least := now.Add(time.Millisecond); until.Before(least) {
		until = least
	}
	if left, ok := e.Longest(); ok && !listed.Add(left).After(until.Add(addSlack)) {
		return ops
	}
	return append(ops, pinhole.Op{Kind: pinhole.Install, Pinhole: e.Pinhole, Timeout: until.Sub(now).Truncate(time.Millisecond)})
}

// routeFollowDelay is how long after a change of the host's links,
// addresses, routes or policy rules the firewall follows the routes
// (RouteChanger): it gathers a burst of changes (an interface going down
// takes its routes with it) into one FollowRoutes, and bounds how often
// steady churn (a full-table router) makes one, ≈ 49 ms of lookups at
// 1 000 owners.
const routeFollowDelay = 250 * time.Millisecond

// routeFollowGap is the least time between two route follows of
// watchFirewall: under steady churn the follows, each a dump of the host's
// routes (pinhole: one per round) and a lookup per owned prefix, run at
// most once a second, on the goroutine that also runs the tamper check
// (review4 F2: every 250 ms before).
const routeFollowGap = time.Second

// watchFirewall runs the tamper check every TamperInterval and the audit
// once at start and then every AuditInterval, off the engine loop; and,
// when the firewall tells of route changes (RouteChanger), follows them
// routeFollowDelay after the first of a burst (and routeFollowGap after
// the last follow) rather than at the next check: an interface gone and
// its index reused by a device moved into the namespace passed the owner meter's reverse-path check unlooked
// until then, up to TamperInterval (review of 2026-12-03).
//
// The audits run on a goroutine of their own, at most one at a time
// (auditRun): the audit's dump takes 4.5-10 s at 100 000 IPv4 mappings
// (BENCHMARKS.md item 68), the audit above auditMaxLeases ≈ 3.4 s at
// 1 000 000 leases, and the watch's passes (an element added or deleted
// by hand undone), the tamper check (a deleted table, a flushed set) and
// the route follow go on meanwhile. Before (h/auditgo), the audit ran
// here: all of them waited for it (TestE2EWatchServesDuringAudit).
// What each side writes it decides under s.mu from the lease table of
// that hold (the audit: its comparison and fix), so they serialise as
// the engine and the audit always have; a repair overlapping the
// audit's dump makes the audit dump again (auditStale). Only this
// goroutine runs checkFirewall (an audit that finds a set missing asks
// for it: auditEnded). It returns once the running audit has ended
// (ctx ends it: auditLarge between steps, the dump at its end).
func (s *Server) watchFirewall(ctx context.Context) {
	// The watch first, then the start's audit: what the watch tells
	// from then on is acted on by its passes, during the audit too.
	// startWatch returns once the watch listens, so the dump begins after
	// the join (h/auditend).
	watched, watchEnded := s.startWatch(ctx)
	if watchEnded != nil {
		defer func() { <-watchEnded }()
	}
	a := &s.watch.audits
	a.done = make(chan bool, 1)
	defer a.wait()
	s.startAudit(ctx, false)
	tamper := time.NewTicker(s.cfg.TamperInterval)
	defer tamper.Stop()
	audit := time.NewTicker(s.cfg.AuditInterval)
	defer audit.Stop()
	var changes <-chan struct{}
	rf, follows := s.fw.(RouteFollower)
	if rc, ok := s.fw.(RouteChanger); ok && follows {
		changes = rc.RouteChanges()
	}
	var follow <-chan time.Time
	var followed time.Time // the last follow (a tamper check follows too)
	for {
		select {
		case <-ctx.Done():
			return
		case <-tamper.C:
			s.checkFirewall()
			s.auditAfterRepair(ctx)
			followed = time.Now()
		case <-audit.C:
			s.startAudit(ctx, false)
		case checkOwed := <-a.done:
			s.auditEnded(ctx, checkOwed)
		case <-watched:
			s.watched(ctx)
		case <-changes:
			if follow == nil {
				wait := routeFollowDelay
				if next := time.Until(followed.Add(routeFollowGap)); next > wait {
					wait = next
				}
				follow = time.After(wait)
			}
		case <-follow:
			follow, followed = nil, time.Now()
			if err := rf.FollowRoutes(); err != nil {
				s.log.Warn("kernel owner meter: cannot follow the routes of the owned prefixes", zap.Error(err))
			}
			s.noteRouteLookups()
		}
	}
}

// auditRun is the firewall audit watchFirewall runs off its goroutine:
// at most one at a time. All but the audit itself is watchFirewall's
// goroutine's.
type auditRun struct {
	running bool
	// again: an audit was asked for that must read the kernel after the
	// ask (lost notifications) while one ran: it runs when that ends.
	again bool
	// done gets the running audit's end: whether a firewall check is
	// owed (a pinhole set missing).
	done chan bool
	// began is the firewall's reinstalls count when the running audit
	// started.
	began uint64
	// afterRepair: an audit was stopped by a missing pinhole set (it
	// compared nothing) and no audit has started since: one starts once
	// a repair has installed every lease again since that audit began
	// (reinstalls past since), wherever the repair ran (auditAfterRepair).
	// stopped counts such audits in a row: after auditStoppedRuns, the
	// hourly audit is left to it.
	afterRepair bool
	since       uint64
	stopped     int
}

// auditStoppedRuns bounds how many audits in a row stopped by a missing
// pinhole set are each followed by another after the repair: someone
// deleting a set again after every repair (another controller fighting
// pcpd's layout) would otherwise make pcpd alternate repairs and dumps
// without end. The check's repairs go on as before.
const auditStoppedRuns = 3

// auditEndHook, if set, is called on watchFirewall's goroutine when an
// audit it ran has ended (tests).
var auditEndHook func()

// startAudit starts an audit on a goroutine of its own, unless one runs:
// then a periodic one (fresh false) is skipped, its next tick is an
// AuditInterval away; one whose dump must come after now (fresh: lost
// notifications) runs when the running one ends. Before (h/auditgo) the
// audits ran one after the other on watchFirewall's goroutine, so a
// second never overlapped the first; merged into the running one, an
// element added while the watch was deaf after that one's dump had read
// its set would wait for the next hourly audit
// (TestE2EWatchLostAuditAfterRunning). On watchFirewall's goroutine.
func (s *Server) startAudit(ctx context.Context, fresh bool) {
	a := &s.watch.audits
	if a.running {
		if fresh && !a.again {
			a.again = true
			s.log.Info("firewall audit asked for while one runs (its dump may predate the ask): running again when it ends")
		} else if !fresh {
			// The running one may be an asked-for one started lately, not
			// last interval's (review h/revgo): say only that one runs.
			s.log.Warn("firewall audit: one is still running; skipping this interval's", zap.Duration("interval", s.cfg.AuditInterval))
		}
		return
	}
	if ctx.Err() != nil {
		return
	}
	a.running = true
	a.began = s.watch.reinstalls.Load()
	// This one reads the kernel after every ask so far.
	a.afterRepair, a.again = false, false
	done := a.done
	go func() { done <- s.audit(ctx) }()
}

// auditAfterRepair starts the audit a missing pinhole set stopped, owed
// (afterRepair) once a repair has installed every lease again since that
// audit began: the repair (checkFirewall's, here after the stop, or the
// watch's, told of the deletion while it dumped) lays the set out again
// and puts the live leases back, but removes nothing: an element added by
// hand to another set while the watch was off or deaf (an orphan) and a
// live one deleted from one the repair did not touch waited for the
// hourly audit (review h/revgo, LOW 1; TestE2EAuditAfterStoppingRepair).
// A repair that failed leaves it owed to the next that succeeds (the
// periodic check's, the watch's). After every checkFirewall on
// watchFirewall's goroutine.
func (s *Server) auditAfterRepair(ctx context.Context) {
	a := &s.watch.audits
	// No audit runs while afterRepair is set: auditEnded sets it as one
	// ends, and every start (startAudit) clears it (review h/revend: a
	// branch for a running audit here could never run).
	if !a.afterRepair || s.watch.reinstalls.Load() == a.since || ctx.Err() != nil {
		return
	}
	s.log.Info("firewall audit: the pinhole set that stopped the last audit is repaired; auditing again")
	s.startAudit(ctx, true)
}

// auditEnded is the end of the running audit, told on watchFirewall's
// goroutine: the firewall check it asked for (a pinhole set missing) runs
// here, then an audit owed since it started.
func (s *Server) auditEnded(ctx context.Context, checkOwed bool) {
	a := &s.watch.audits
	a.running = false
	if !checkOwed {
		a.stopped = 0
	} else if a.stopped++; a.stopped <= auditStoppedRuns {
		a.afterRepair, a.since = true, a.began
	} else {
		a.stopped = 0
		s.log.Warn("firewall audit: stopped by a missing pinhole set again after each repair; left to the next periodic audit",
			zap.Int("in_a_row", auditStoppedRuns+1), zap.Duration("interval", s.cfg.AuditInterval))
	}
	if checkOwed {
		s.checkFirewall()
		s.auditAfterRepair(ctx)
	}
	if a.again && ctx.Err() == nil {
		a.again = false
		s.startAudit(ctx, false)
	}
	if auditEndHook != nil {
		auditEndHook()
	}
}

// wait waits for the running audit's end (watchFirewall's return).
func (a *auditRun) wait() {
	if a.running {
		<-a.done
		a.running = false
	}
}

// checkFlowedMisses asks the firewall once (at start, after Setup)
// whether the kernel names a missing flowed6 element in its answer
// (FlowedChecker); one that does not is logged once and shown by
// pcpd_conntrack_flowed_lookups_unnamed. Nothing else changes: the
// lookups fail safe, every address taken as flowed.
func (s *Server) checkFlowedMisses() {
	fc, ok := s.fw.(FlowedChecker)
	if !ok {
		return
	}
	named, err := fc.FlowedMissNamed()
	switch {
	case err != nil:
		s.log.Debug("cannot tell whether the kernel names a missing flowed6 element", zap.Error(err))
	case !named:
		s.flowedUnnamed.Store(true)
		s.log.Warn("this kernel does not name a missing element in its answer to a set lookup (Linux before 5.19, commit b53c116642502): pcpd cannot tell which IPv6 addresses had no admitted flows, so every IPv6 mapping's end walks the conntrack table (a dump of all of it per flush) instead of being skipped; safe, no connection is left, only more CPU (pcpd_conntrack_flowed_lookups_unnamed)")
	}
}
