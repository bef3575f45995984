package server

import (
	"errors"
	"maps"
	"runtime"
	"slices"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/internal/bootclock"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/store"
)

// The running clock (known bug "wall-clock steps", RELIABILITY.md).
//
// The lease table, the dirty map, quarantines and the epoch origin hold
// wall times (the store persists them as such, and a restart compares them
// with the wall clock), but the kernel's element timeouts are durations on
// its own monotonic clock. Read straight from CLOCK_REALTIME, a step of it
// (a router without RTC that booted behind and is stepped by NTP) made
// every lease with less time left than a forward step expire at once, its
// element deleted, the client told nothing; a backward step made an
// absorbed renewal trust an element that ends earlier than the table
// thinks.
//
// So the engine's now is a running clock: the wall time at an anchor plus
// the monotonic time elapsed since (runClock), which no step moves. Where
// it and the wall clock part by more than stepThreshold (checkClock, every
// sweep tick and once at shutdown; measured so that a pause of the
// goroutine between the clock readings does not count: measure), the
// engine rebases: it shifts every wall time it holds by the step, in
// memory, at once (rebase: relative quantities, what the kernel holds,
// are unchanged), moves the running clock onto the wall clock, and
// rewrites the MAP-22 quarantines, then the leases, in the store, a chunk
// a tick (rewriteStep), so a later start reads right wall expiries and
// quarantine ends.
//
// A crash before the rewrite is done leaves the leases not yet rewritten
// with expiries of the old wall base on disk, and no lease says which
// frame it is of: a forward step would drop those with less left than
// the step and shorten the others, a backward one lengthen them (capped
// by clampRestored). So the rebase clears the stored epoch origin
// (ResetEpoch of the zero time, one log record ordered before every
// lease the rewrite writes) and rewriteStep stores the moved origin once
// the last lease is rewritten: a start after a kill -9 (or a power cut)
// anywhere in between finds the origin cleared, the store says why
// ("epoch reset still pending ... the rewrite of the stored leases after
// a wall-clock step"), and the epoch resets, the clients re-map (ANN-03,
// issue 9: no continuity while state may be lost;
// TestBootClockKillDuringRewrite). Its leases are restored by the wall
// clock as they are. A clean stop finishes the rewrite (finishRebase).
// The backup copy is written again once the rewrite is done (housekeep),
// not before: until then it holds the old frame's times
// (TestBootClockBackupAfterRebase); restored, it resets the epoch anyway.
//
// A step made while pcpd is down, or one a kill -9 came before the next
// check saw, is seen at the next start in the same boot through the boot
// anchor (Deps.Boot, internal/bootclock): at start and at every rebase
// pcpd records how its running clock stands against CLOCK_BOOTTIME (never
// stepped, counts suspend), with the epoch origin (a rebase's moved one,
// which the store holds once the rewrite is done). A start
// whose anchor is of this boot and of the stored state's origin begins the
// running clock where the last run's would be now (resumeFrame), restores
// the stored times in that frame, and then rebases onto the wall clock as
// for a step seen while running: the epoch goes on (value: time since the
// origin by CLOCK_BOOTTIME), every lease keeps its remaining lifetime
// (TestBootClockUnseenStep). Without such an anchor (another boot: the
// monotonic clocks restart; none, damaged, or of another state: restored
// from the backup, epoch reset) the start logs why, and restore compares
// the stored times with the wall clock as it is: the step counts in the
// epoch and the leases (TestEpochAcrossKillWallStep).

// stepThreshold is how far the wall clock may part from the running clock
// before the engine rebases. NTP slews CLOCK_MONOTONIC with
// CLOCK_REALTIME, so only steps (and leap seconds) part them.
const stepThreshold = time.Second

// rewriteChunk is how many leases one rewriteStep writes to the store (one
// commit, one fsync: 1.2–2.5 ms for 1024 into a store of 100 000,
// BENCHMARKS.md "clock"): at a million leases the rewrite takes ≈ 1000
// sweep ticks (≈ 2 min) and holds the engine a few ms a tick.
const rewriteChunk = 1024

// runClock is the wall time at mono's zero plus mono's reading.
type runClock struct {
	wall func() time.Time
	mono func() time.Duration
	off  atomic.Int64 // Unix ns at mono's zero
	off0 int64        // off at the start: off-off0 is the rebases' total shift
	// gen is odd while a rebase moves off and the epoch origin (a
	// sequence lock: epochAt).
	gen atomic.Uint64
}

func newRunClock(wall func() time.Time, mono func() time.Duration) *runClock {
	if wall == nil {
		wall = time.Now
	}
	if mono == nil {
		base := time.Now()
		mono = func() time.Duration { return time.Since(base) } // monotonic
	}
	c := &runClock{wall: wall, mono: mono}
	// off is 0: measure's skew is the wall time at mono's zero (read
	// between two monotonic readings, so a pause of the goroutine does not
	// start the clock behind the wall clock by the pause).
	d, _ := c.measure()
	c.off0 = int64(d)
	c.off.Store(c.off0)
	return c
}

// steady is the running clock without its rebases: the wall time at the
// start plus the monotonic time since, which nothing steps. The rate
// limiters and the owner gate, which only measure durations between their
// readings, run on it (a rebase moved their times: a step back made idle
// sources look newest for as long as the step, and the owner gate call an
// owner contended for that long).
func (c *runClock) steady() time.Time { return time.Unix(0, c.off0+int64(c.mono())) }

// shifted is the rebases' total shift so far: steady's reading is the
// running clock's minus it.
func (c *runClock) shifted() time.Duration { return time.Duration(c.off.Load() - c.off0) }

// shifted is the rebases' total shift (0 without a running clock).
func (s *Server) shifted() time.Duration {
	if s.clk == nil {
		return 0
	}
	return s.clk.shifted()
}

// steadyAt is steady's reading at the running clock's reading now (s.mu
// held, so no rebase runs between the two: the engine's rate-limiter
// calls, without another clock reading).
func (s *Server) steadyAt(now time.Time) time.Time { return now.Add(-s.shifted()) }

func (c *runClock) now() time.Time { return time.Unix(0, c.off.Load()+int64(c.mono())) }

// epochAt is the epoch at the readers' clock reading now (Server.steady's,
// which they pass to early): the running clock's reading is it plus the
// rebases' shift, so it costs no clock reading. The readers hold no lock,
// and the running clock's shift and the epoch origin move together at a
// rebase (under s.mu): a reader that read one before and the other after
// would answer an epoch off by the step (a client seeing its server's
// epoch go back re-creates its mappings, RFC 6887 §8.5), so it reads them
// again when a rebase ran meanwhile (gen, a sequence lock). Without a
// rebase that is two more loads.
func (s *Server) epochAt(now time.Time) pcp.Epoch {
	if s.clk == nil {
		return s.epoch.at(now)
	}
	ns := now.UnixNano()
	for {
		g := s.clk.gen.Load()
		e := s.epoch.atNs(ns + s.clk.off.Load() - s.clk.off0)
		if g&1 == 0 && s.clk.gen.Load() == g {
			return e
		}
		runtime.Gosched() // a rebase's two stores
	}
}

// skewSpread is the most time a skew measurement's two monotonic readings
// may be apart for it to be trusted (measure): its error is at most half
// that. Back to back they are well under a µs apart.
const skewSpread = 10 * time.Millisecond

// measure returns the wall clock's reading minus the running clock's, and
// whether the measurement can be trusted. The wall and the monotonic clock
// are two readings: a goroutine descheduled between them for longer than
// stepThreshold (a loaded box, a pause of the VM's thread, GC) measured a
// step that was not there, and pcpd rebased and rewrote every lease
// (TestCheckClockDescheduled). So the wall clock is read between two
// monotonic readings and compared with their midpoint; if they are more
// than skewSpread apart the goroutine was paused meanwhile and the
// measurement is taken again, 3 times at most (not trusted after that:
// the next sweep tick measures again).
func (c *runClock) measure() (d time.Duration, ok bool) {
	for range 3 {
		m1 := c.mono()
		w := c.wall().UnixNano()
		m2 := c.mono()
		d = time.Duration(w - (c.off.Load() + int64(m1+(m2-m1)/2)))
		if m2-m1 <= skewSpread {
			return d, true
		}
	}
	return d, false
}

// skew is measure's skew, trusted or not (the tests').
func (c *runClock) skew() time.Duration {
	d, _ := c.measure()
	return d
}

// stepped reports whether the wall clock stepped, by d, against the
// running clock: a trusted measurement parting them by more than
// stepThreshold.
func (c *runClock) stepped() (d time.Duration, ok bool) {
	d, ok = c.measure()
	return d, ok && (d > stepThreshold || d < -stepThreshold)
}

// checkClock rebases if the wall clock stepped (see above), and writes the
// next chunk of a rewrite in progress. The engine loop calls it every
// sweep tick: without a step it costs three clock readings.
func (s *Server) checkClock() {
	if s.clk == nil {
		return
	}
	_, stepped := s.clk.stepped()
	if !stepped && s.rewriteAt == 0 && !s.anchorRetry.Load() {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.anchorRetry.Load() {
		s.saveAnchor()
	}
	if stepped {
		// Measured again under s.mu (the wait for it may be long, the
		// clock stepped again meanwhile): the rebase is by this
		// measurement, if it too is a step.
		if d, ok := s.clk.stepped(); ok {
			s.rebase(d)
		}
	}
	// rewriteAt 0 is no rewrite: rewriteStep would begin one.
	if s.rewriteAt != 0 {
		s.rewriteStep(rewriteChunk)
	}
}

// finishRebase notices a step not yet seen and writes the whole rewrite
// (Serve's return).
func (s *Server) finishRebase() {
	if s.clk == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if d, ok := s.clk.stepped(); ok {
		s.rebase(d)
	}
	for s.rewriteAt != 0 {
		if !s.rewriteStep(rewriteChunk) {
			// The step's warning may have been held back (repeatWarn):
			// said here once more, as the next start sees what the
			// store has.
			s.log.Warn("stopping with the rewrite after a wall-clock step unfinished: the store refuses it",
				zap.Int("failures", s.rewriteWarn.fails), zap.Int("debt_failures", s.debtWarn.fails))
			return
		}
	}
}

// resumeFrame starts the running clock, before restore, in the frame of
// the stored state whose epoch origin is origin: the last run's running
// clock, as the boot anchor predicts it now (see above). It reports
// whether it did; Start then rebases onto the wall clock (s.mu held).
func (s *Server) resumeFrame(origin time.Time) bool {
	if s.clk == nil || s.deps.Boot == nil {
		return false
	}
	d, err := s.deps.Boot.Step(origin)
	if err != nil {
		s.log.Info("boot anchor not used: a wall-clock step made while pcpd was down counts in the epoch and lease times",
			zap.Error(err))
		return false
	}
	if d >= -stepThreshold && d <= stepThreshold {
		return false
	}
	s.clk.gen.Add(1)
	s.clk.off.Add(-int64(d))
	s.clk.gen.Add(1)
	s.log.Warn("wall clock stepped since the last run's clock check (boot anchor): stored times follow it",
		zap.Duration("step", d))
	return true
}

// saveAnchor records the running clock and the epoch origin in the boot
// anchor (s.mu held): at start and after every rebase. A Save that fails
// removes the old anchor (bootclock.Keeper.Save): it describes the last
// run's running clock, and if it were used at a later start the times
// this run stores would be restored in that frame, a step made before
// this run (one it could not measure: boot id unreadable, another
// binary's run) added to every lease it wrote (TestBootClockStaleAnchor).
// checkClock tries again every tick until a Save succeeds: without an
// anchor a step while pcpd is down counts, and if the old one could not
// be removed either (ErrStale: the directory not writable, so neither are
// the store's commits) it must go once the directory is back.
func (s *Server) saveAnchor() {
	if s.clk == nil || s.deps.Boot == nil {
		return
	}
	origin, _ := s.epoch.get()
	err := s.deps.Boot.Save(s.clk.now, origin)
	switch {
	case err == nil:
		if s.anchorRetry.Load() {
			s.log.Info("boot anchor written")
		}
	case !s.anchorRetry.Load():
		msg := "cannot write the boot anchor (removed); retrying: until then a wall-clock step while pcpd is down counts in the epoch and lease times"
		if errors.Is(err, bootclock.ErrStale) {
			msg = "cannot write or remove the boot anchor; retrying: until then a restart may restore the stored times in the last run's frame"
		}
		s.log.Warn(msg, zap.Error(err))
	}
	s.anchorRetry.Store(err != nil)
}

// rebase moves the running clock by d onto the wall clock and every wall
// time the engine holds with it (s.mu held).
func (s *Server) rebase(d time.Duration) {
	_, hasOrigin := s.epoch.get()
	s.clk.gen.Add(1) // odd: epochAt's readers wait (see there)
	s.clk.off.Add(int64(d))
	if hasOrigin {
		s.epoch.origin.Add(int64(d)) // the epoch goes on across the step
	}
	s.clk.gen.Add(1)
	s.tab.shift(int64(d))
	for k, at := range s.dirty {
		s.dirty[k] = at.Add(d)
	}
	if !s.dirtyNext.IsZero() {
		s.dirtyNext = s.dirtyNext.Add(d)
	}
	for e, q := range s.quar {
		q.until = q.until.Add(d)
		s.quar[e] = q
	}
	s.quar4.stale() // their ends moved
	if hasOrigin {
		// The stored origin is cleared until the rewrite is done (then
		// rewriteStep stores the moved one, so the epoch continues
		// across a restart too): until then the stored leases are of
		// two frames, and a start must reset the epoch (see above). A
		// clear that fails now goes with the next commit that succeeds,
		// before any lease the rewrite writes.
		if err := s.st.ResetEpoch(time.Time{}); err != nil {
			s.log.Warn("cannot clear the stored epoch origin for the rewrite after a wall-clock step; it is cleared with the next commit", zap.Error(err))
		}
	}
	// The anchor holds the moved origin: used once the rewrite stored it.
	s.saveAnchor()
	if !s.started.IsZero() {
		s.started = s.started.Add(d)
	}
	s.rewriteAt = 1
	// The quarantines first: few, and a kill -9 before their rewrite made
	// a forward step end them early at the restart
	// (TestMAP22RewriteQuarantinesFirst).
	s.rewriteQuarList = slices.AppendSeq(s.rewriteQuarList[:0], maps.Keys(s.quar))
	s.rewriteQuar = len(s.rewriteQuarList) > 0
	s.m.clockSteps.Inc()
	s.log.Warn("wall clock stepped: lease times moved with it, pinholes unchanged",
		zap.Duration("step", d), zap.Int("leases", s.tab.len()))
}

// rewriteStep writes to the store the next n leases of the rewrite after a
// rebase, from slot rewriteAt on (s.mu held), and reports false if the
// commit failed (the next tick retries). A dirty lease is written with its
// synced expiry, what the store holds for it; a lease in the store's debt
// is left to payStoreDebt, which writes the table's (rebased) state, and
// which the last step calls before it stores the moved origin.
// Leases changed since the rebase went through a commit of their own, so
// writing them again is redundant but right.
//
// Before them, the MAP-22 quarantines, whose until moved too (rebase):
// without their rewrite a restart would read them in the old frame, and a
// forward step would end them early (TestMAP22QuarantineRebaseRestart).
// They are listed by rebase and written n at a time, each with its
// current state (one ended meanwhile is written as ended), before the
// first lease (TestMAP22RewriteQuarantinesFirst).
func (s *Server) rewriteStep(n int) bool {
	if s.rewriteQuar {
		left := len(s.rewriteQuarList)
		if !s.rewriteQuarStep(n) {
			return false
		}
		if n -= left; s.rewriteQuar || n <= 0 {
			return true
		}
	}
	t := s.tab
	now := s.now().UnixNano()
	put := s.rewriteBuf[:0]
	ref := s.rewriteAt
	for ; ref <= t.top && len(put) < n; ref++ {
		r := t.rec(ref)
		if r.flags&fLive == 0 || r.exp <= now {
			continue
		}
		put = append(put, store.Lease{})
		l := &put[len(put)-1]
		t.decode(ref, l)
		if _, owed := s.storeDebt[l.Key]; owed {
			put = put[:len(put)-1]
			continue
		}
		if synced, ok := s.dirty[l.Key]; ok {
			l.Expires = synced
		}
	}
	defer func() {
		clear(put)
		s.rewriteBuf = put[:0]
	}()
	if len(put) > 0 {
		if err := s.st.Commit(put, nil); err != nil {
			s.m.storeErrors.Inc()
			s.rewriteWarn.warn(s.log, s.steady(), "cannot rewrite leases after a wall-clock step; retrying", err, zap.Int("leases", len(put)))
			return false
		}
		s.rewriteOK()
	}
	if ref > t.top {
		// The leases in the store's debt were skipped above: the store
		// holds an older state of theirs, of the old frame. Written
		// before the origin (review h/revrw): stored after it, a kill
		// before the debt was paid (housekeep's next payStoreDebt, or
		// the next request's commit) left them in the old frame under
		// the moved origin, the epoch going on (a forward step dropped
		// them at the restart: TestBootClockRewriteStoreDebt). If they
		// cannot be written the next tick tries again.
		if !s.payStoreDebtLocked() {
			s.rewriteAt = ref
			return false
		}
		ref = 0 // done
		// Its run of refused commits ends here if no commit of its own
		// ended it: the leases it retried may have gone meanwhile (expired
		// while the store refused, their deletes owed and written just
		// above). Left open, the next step's first refusal was taken for
		// the same run (held back, or logged with this run's repeats:
		// review h/revstoreq, TestRewriteWarnEndsWithRewrite).
		s.rewriteWarn.end(s.log, s.steady(), "the rewrite after the wall-clock step is done")
		// Every stored lease is of the new frame: the moved origin goes
		// back into the store (cleared by rebase), and a start continues
		// the epoch. If it cannot be written now it goes with the next
		// commit; until then a start resets the epoch.
		if origin, ok := s.epoch.get(); ok {
			if err := s.st.ResetEpoch(origin); err != nil {
				s.log.Warn("cannot record the epoch origin moved with the wall clock; it is written with the next commit", zap.Error(err))
			}
		}
		// The backup copy still holds the times of before the step
		// (written at Open, before the start's rebase, or by the last
		// periodic snapshot): a restore from it, which has no anchor
		// to go by, took them as they were, every lease off by the
		// step (a forward one dropped them). Written again now that
		// the state file is all in the new frame (housekeep).
		select {
		case s.rebased <- struct{}{}:
		default:
		}
	}
	s.rewriteAt = ref
	return true
}

// rewriteQuarStep writes the next n quarantines of the rewrite after a
// rebase (s.mu held); the leases' rewrite follows the last.
func (s *Server) rewriteQuarStep(n int) bool {
	l := s.rewriteQuarList
	chunk := l[max(len(l)-n, 0):]
	if len(chunk) > 0 {
		var qc store.QuarChange
		for _, e := range chunk {
			s.appendQuarState(&qc, e)
		}
		if err := s.st.CommitQuar(nil, nil, &qc); err != nil {
			s.m.storeErrors.Inc()
			s.rewriteWarn.warn(s.log, s.steady(), "cannot rewrite quarantined ports after a wall-clock step; retrying", err, zap.Int("ports", len(chunk)))
			return false
		}
		s.rewriteOK()
	}
	s.rewriteQuarList = l[:len(l)-len(chunk)]
	if len(s.rewriteQuarList) == 0 {
		s.rewriteQuar = false // the leases next, from rewriteAt
	}
	return true
}

// rewriteOK ends a run of refused rewrite commits (s.mu held): logged
// once it ends, as its warnings were at most every repeatEvery.
func (s *Server) rewriteOK() {
	s.rewriteWarn.end(s.log, s.steady(), "the store takes the rewrite after the wall-clock step again")
}

// shift adds d (ns) to every wall time in the table: a lease's expiry and
// creation, and the expiry heap's keys (the heap's order is kept). Slots
// deleted under a pin shift too (a listing reads them); free slots are
// overwritten before use.
func (t *table) shift(d int64) {
	for ref := uint32(1); ref <= t.top; ref++ {
		r := t.rec(ref)
		if r.exp != zeroTime {
			r.exp += d
		}
		if r.created != zeroTime {
			r.created += d
		}
	}
	for i := range t.exp {
		t.exp[i].at += d
	}
}
