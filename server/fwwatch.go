package server

import (
	"context"
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/store"
)

// The firewall watch (issue 9): the kernel's nftables notifications tell
// pcpd of someone else's change to its objects as it is committed
// (FirewallWatcher, pinhole/watch.go). Before, only the periodic check
// (every TamperInterval) noticed damage, and a single pinhole deleted by
// hand ("nft delete element") only the lease's next renewal or the
// hourly audit; meanwhile a renewal could be absorbed (absorb.go) and
// answered SUCCESS with its pinhole missing, and after an "nft flush
// ruleset" forwarded flows were reset until the next check.
//
// What the watch reads goes to watchFirewall's goroutine (fwWatch, a
// burst gathered into one pass), which
//   - runs checkFirewall at once for damage (a table, chain, rule or set
//     of pcpd's deleted or changed, a sentinel deleted: a flush): the
//     periodic check's own path and locks, off the engine loop;
//   - puts back the deleted pinholes a live lease holds now, with the
//     lease's remaining lifetime (restoreDeleted), deciding under s.mu:
//     the engine changes the lease table, the kernel and the store of a
//     batch within one hold of s.mu (handleBatch), so what restoreDeleted
//     reads there is committed, and a delete of pcpd's own (a lease
//     deleted, expired, revoked, replaced) has left the table by the time
//     its notification is judged. pcpd's own sockets' notifications are
//     dropped by the kernel's filter besides (cost), but nothing rests on
//     that. The kernel tells of no element its timeout removed (checked:
//     Linux 6.18, hash and concatenated-range sets), and a lease past its
//     expiry holds nothing. At most one pass a watchCheckGap puts back
//     (deletions told sooner are gathered and put back when the gap is
//     up: a tool deleting in a loop is answered by a transaction a gap);
//   - removes the pinhole elements someone else added (Added: "nft add
//     element", another controller) that no live lease holds, and puts
//     those a live lease holds back with the lease's remaining lifetime
//     (a foreign re-add with a longer timeout cut back), under s.mu as
//     the above (undoAdds is restoreDeleted's other half): pcpd's sets
//     hold only what its leases explain, which before only the hourly
//     audit enforced (a hole opened by hand lived up to an hour, one
//     re-added with a longer timeout past its lease: h/fwadd). At most
//     one pass a watchCheckGap undoes adds (a tool adding in a loop is
//     answered by a transaction a gap, not one per add); pcpd's own
//     writes are never told as adds (the filter drops its ports'
//     notifications, judge skips them besides). An element whose filtered
//     range overlaps a live one's goes with it (holders.deleteGroup: the
//     kernel refuses a concatenated-range element starting inside
//     another);
//   - after lost notifications (ENOBUFS, a failed socket: the watcher
//     reopens it) runs the check and asks for the audit (auditFirewall,
//     on a goroutine of its own: auditRun), at most once per
//     lostAuditGap (one owed sooner deferred to the gap's end): a lost
//     element's deletion shows only in a dump. One asked for while an
//     audit runs runs again after it: that one's dump may have read the
//     kernel before the loss.
// The periodic check and the hourly audit stay as the backstop.

// maxWatchPending bounds the deleted pinholes gathered for one pass
// (≈ 100 B each); beyond, they are dropped and the pass audits instead.
// A variable for tests only.
var maxWatchPending = 1 << 16

// lostAuditGap is the least time between two audits for lost
// notifications (each a dump of every pinhole set); one owed sooner runs
// when the gap is up. A variable for tests only.
var lostAuditGap = time.Minute

// fwWatch is what the watch read since watchFirewall's last pass.
type fwWatch struct {
	mu       sync.Mutex
	damage   []string
	by       []uint32
	deleted  []pinhole.Pinhole
	added    []toldAdd
	overflow bool
	lost     error
	kick     chan struct{}
	// reinstalls counts the re-installs of every lease's pinholes that
	// succeeded (repairLocked, rearmOwed): a pass whose check made one
	// has nothing left to put back.
	reinstalls atomic.Uint64
	// relaid counts the repairs that laid pcpd's objects out again or
	// installed every lease again (repairLocked, rearmOwed), bumped at
	// the end of their hold of s.mu: an audit whose dump one overlapped
	// dumps again (auditStale).
	relaid atomic.Uint64
	// audits are the firewall audits watchFirewall runs off its own
	// goroutine (auditRun; that goroutine's).
	audits    auditRun
	lastAudit time.Time // the last audit for lost notifications (watchFirewall's goroutine)
	// auditOwed: notifications were lost within lostAuditGap of the last
	// audit; a kick comes when the gap is up (watchFirewall's goroutine).
	auditOwed bool
	// lastCheck is when the watch last ran a check for damage; checkOwed:
	// damage told within watchCheckGap of it, a kick comes when the gap
	// is up (watchFirewall's goroutine).
	lastCheck time.Time
	checkOwed bool
	// undo defers the undoing of someone else's adds, restore the
	// putting back of deletions, each to the end of a watchCheckGap since
	// the last pass that acted on its kind (watchFirewall's goroutine).
	undo    gapped[toldAdd]
	restore gapped[pinhole.Pinhole]
	// catchAllTries counts the passes in a row whose undo of a catch-all
	// element failed (watchFirewall's goroutine): retryCatchAlls.
	catchAllTries int
	// refusedBack are the put-backs of restoreDeleted the kernel refused
	// (at most maxWatchPending): their place taken by an element someone
	// added that the undo's sharers do not find (an all-ports element
	// over a live one on another port of its address: the table has no
	// index by address). The next pass that undoes adds tries them once
	// more after its undo, then forgets them. Before (h/redir6), they
	// waited for the audit (TestE2EWatchPutsBackUnderAllPorts).
	// watchFirewall's goroutine (restoreDeleted runs there).
	refusedBack []pinhole.Pinhole
	// backOn: an audit's dump runs (or ran, its comparison to come);
	// back are the pinholes restoreDeleted put back since that dump began
	// and no notification has told deleted again since (under mu): the
	// audit re-installs none of them (auditDumped, putBackDuring).
	backOn bool
	back   map[pinhole.Pinhole]struct{}
}

// maxPutBackDuring bounds the put-backs recorded during one audit's dump
// (≈ 150 B each): beyond, the record is dropped and the audit re-installs
// every pinhole its dump did not show, as before. A variable for tests
// only.
var maxPutBackDuring = 1 << 18

// The put-backs during an audit's dump (h/auditlife). A tool deleting a
// live lease's elements one by one while the audit dumps (no flush, so
// no repair) is answered by the watch (restoreDeleted, a transaction a
// watchCheckGap); the dump, which read their sets before or between,
// does not show them, and the audit re-installed each a second time
// under s.mu (≈ 0.4 s per 100 000 at the engine's cost). Now the watch
// records what it put back (the ops the kernel applied) from the dump's
// start (trackPutBacks), and the audit leaves those out of its missing
// ones (takePutBacks, under s.mu). What is left out is in the kernel
// unless deleted again since, and a deletion is never left to nobody:
//   - told after the put-back (note): the pinhole leaves the record, so
//     the audit re-installs it if its dump did not show it (and the watch
//     puts it back too: redundant, as before);
//   - told after the audit's hold took the record, or never told (its
//     notification lost: note drops the whole record on a loss or an
//     overflow, and a loss asks for an audit of its own, which runs after
//     this one): the watch, or that audit, as for a deletion after any
//     audit;
//   - told, but dropped by the watch's pass (beyond maxWatchPending
//     gathered within a watchCheckGap): the pass drops the whole record
//     too, and asks for an audit as for a loss;
//   - a put-back the kernel refused or that failed is not recorded, and
//     one that failed after an earlier success leaves the record
//     (forgetPutBacks).
// The put-back itself was decided under s.mu from that hold's lease
// table with the kernel view of that hold (holders.until); the engine's
// later holds write the kernel for what changed since (a lease deleted,
// renewed, replaced), as for any element.

// trackPutBacks starts the record of put-backs for a dump beginning now
// (the audit's goroutine, without s.mu).
func (w *fwWatch) trackPutBacks() {
	w.mu.Lock()
	w.backOn, w.back = true, make(map[pinhole.Pinhole]struct{})
	w.mu.Unlock()
}

// takePutBacks ends the record and returns it (nil if none or dropped).
// Under s.mu (the audit's comparison), or to end it (the audit's end).
func (w *fwWatch) takePutBacks() map[pinhole.Pinhole]struct{} {
	w.mu.Lock()
	back := w.back
	w.backOn, w.back = false, nil
	w.mu.Unlock()
	return back
}

// notePutBacks records ps, put back by restoreDeleted, if a dump runs;
// forgetPutBacks takes ps out of the record (a put-back that failed).
// Under s.mu (restoreDeleted's hold).
func (w *fwWatch) notePutBacks(ps []pinhole.Pinhole) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.backOn {
		return
	}
	if len(w.back)+len(ps) > maxPutBackDuring {
		w.dropPutBacksLocked()
		return
	}
	for _, p := range ps {
		w.back[p] = struct{}{}
	}
}

// dropPutBacks drops the record of the dump running (the cap, an
// overflow, a loss): its audit then re-installs every pinhole its dump
// did not show, at worst a second time; nothing it would have left out is
// missing or kept by that (what the record holds only ever leaves out
// installs of live leases' pinholes). Until the next dump's
// trackPutBacks nothing is recorded.
func (w *fwWatch) dropPutBacks() {
	w.mu.Lock()
	w.dropPutBacksLocked()
	w.mu.Unlock()
}

func (w *fwWatch) dropPutBacksLocked() { w.backOn, w.back = false, nil }

func (w *fwWatch) forgetPutBacks(ps []pinhole.Pinhole) {
	w.mu.Lock()
	for _, p := range ps {
		delete(w.back, p)
	}
	w.mu.Unlock()
}

// watchCheckGap is the least time between two firewall checks the watch
// runs for damage; damage told sooner is checked when the gap is up. It
// bounds what a tool fighting pcpd's layout costs (another controller
// undoing each repair as it is told of it, a second pcpd on the same
// table): before (review h/revnftmon), a check and a repair per
// notification, back to back without end; now at most one a gap
// (TestE2EWatchCheckGap). A variable for tests only.
var watchCheckGap = time.Second

// gapped is what the watch defers of one kind (adds to undo, deletions
// to put back): told within watchCheckGap of the last pass that acted on
// that kind, it is gathered with its committers' ports until the gap is
// up (watchFirewall's goroutine).
type gapped[T any] struct {
	last time.Time // when a pass last acted on this kind
	owed []T
	by   []uint32 // the owed ones' committers' ports (for the log)
	due  bool     // a kick comes when the gap is up
}

// take is what a pass acts on now: told (by its committers' ports by)
// after what was owed, once the gap since last is up. Within the gap told
// is gathered instead (beyond maxWatchPending: overflow, the audit sees
// to it), the first time with a kick at the gap's end (warn says so), and
// nothing is returned.
func (g *gapped[T]) take(told []T, by []uint32, poke func(), warn func(n int, wait time.Duration)) (now []T, nowBy []uint32, overflow bool) {
	if len(told) == 0 && !g.due {
		return told, by, false
	}
	if wait := watchCheckGap - time.Since(g.last); !g.last.IsZero() && wait > 0 {
		if len(g.owed)+len(told) > maxWatchPending {
			overflow = true
		} else {
			g.owed = append(g.owed, told...)
		}
		for _, p := range by {
			if !slices.Contains(g.by, p) && len(g.by) < 8 {
				g.by = append(g.by, p)
			}
		}
		if !g.due && len(told) > 0 {
			g.due = true
			warn(len(told), wait)
			time.AfterFunc(wait, poke)
		}
		return nil, nil, overflow
	}
	now, nowBy = append(g.owed, told...), append(g.by, by...)
	g.owed, g.by, g.due = nil, nil, false
	return now, nowBy, false
}

// catchAllRetries bounds how many passes in a row the watch tries again
// the undo of catch-all elements whose Delete failed (deleteCatchAll's
// transaction: no notification follows, nobody changed it), one a
// watchCheckGap; then the audit (which lists the SNAT maps too since
// h/oddsnat) sees to them. Before (review h/revca), a failed SNAT
// catch-all undo was tried by nothing again, and no audit found it
// (TestE2EWatchRetriesCatchAllUndo).
const catchAllRetries = 5

// retryCatchAlls owes the undo of failed (catch-all elements whose
// Delete failed in this pass) to the pass a watchCheckGap later, at most
// catchAllRetries passes in a row (watchFirewall's goroutine).
func (w *fwWatch) retryCatchAlls(failed []toldAdd, log *zap.Logger) {
	if len(failed) == 0 {
		w.catchAllTries = 0
		return
	}
	if w.catchAllTries++; w.catchAllTries > catchAllRetries {
		log.Error("firewall watch: cannot undo catch-all elements someone added; left to the audit",
			zap.Int("count", len(failed)), zap.Int("tries", w.catchAllTries))
		w.catchAllTries = 0
		return
	}
	w.undo.owed = append(w.undo.owed, failed...)
	if !w.undo.due {
		w.undo.due = true
		time.AfterFunc(watchCheckGap, w.poke)
	}
}

// watchPassHook, if set, is called at the end of each watched pass (tests).
var watchPassHook func()

// poke wakes watchFirewall's pass.
func (w *fwWatch) poke() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// note is the watch's callback: it gathers ev for watchFirewall.
func (w *fwWatch) note(ev pinhole.WatchEvent) {
	w.mu.Lock()
	if w.backOn {
		// Deleted again since a put-back: not the audit's to leave out
		// (takePutBacks); lost notifications: none is.
		for _, p := range ev.Deleted {
			delete(w.back, p)
		}
		if ev.Lost != nil {
			w.dropPutBacksLocked()
		}
	}
	if ev.Damage != "" && len(w.damage) < 8 {
		w.damage = append(w.damage, ev.Damage)
	}
	for _, p := range ev.By {
		if !slices.Contains(w.by, p) && len(w.by) < 8 {
			w.by = append(w.by, p)
		}
	}
	if len(w.deleted)+len(w.added)+len(ev.Deleted)+len(ev.Added) > maxWatchPending {
		w.overflow = true
		w.dropPutBacksLocked() // the pass audits (as a loss)
	} else {
		w.deleted = append(w.deleted, ev.Deleted...)
		now := time.Now()
		for _, e := range ev.Added {
			t := toldAdd{p: e.Pinhole}
			if e.Remaining > 0 {
				t.expires = now.Add(e.Remaining)
			}
			w.added = append(w.added, t)
		}
	}
	if ev.Lost != nil {
		w.lost = ev.Lost
	}
	w.mu.Unlock()
	w.poke()
}

// startWatch starts the firewall watch, if the firewall has one and it is
// on: kicks then come on s.watch.kick (nil otherwise). It ends with ctx;
// ended is closed once the watch's goroutine has returned (nil if none
// started): watchFirewall waits for it, so nothing of the watch runs
// after Serve returns. Before (review h/revend), Serve returned while the
// watch could still run (TestE2EServeWaitsForWatch).
// It returns once the watch listens (JoinedWatcher; or has failed to, or
// ctx ended): the start's audit, which watchFirewall starts next, then
// dumps after the join, so a change committed before the dump reads its
// set is in the dump and one after the join is told. Before (h/auditend),
// the watch joined its group on its own goroutine: a change committed
// after the dump had read its set and before the join was seen by
// neither, until the next hourly audit (TestE2EStartAuditAfterJoin).
func (s *Server) startWatch(ctx context.Context) (kick, ended <-chan struct{}) {
	fw, ok := s.fw.(FirewallWatcher)
	if !ok || s.cfg.NoFirewallWatch {
		return nil, nil
	}
	s.watch.kick = make(chan struct{}, 1)
	if fc, ok := fw.(ForeignChangeWatcher); ok {
		// Another table's change told: read the host's DNAT rules now
		// (h/prio), undone when the watch ends.
		fc.OnForeignChange(s.hostPorts.kickDNAT)
	}
	joined, end := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(end)
		if fc, ok := fw.(ForeignChangeWatcher); ok {
			defer fc.OnForeignChange(nil)
		}
		var err error
		if jw, ok := fw.(JoinedWatcher); ok {
			err = jw.WatchJoined(ctx, s.watch.note, func() { close(joined) })
		} else {
			err = fw.Watch(ctx, s.watch.note) // cannot tell: not waited for
		}
		if err != nil && !errors.Is(err, context.Canceled) && ctx.Err() == nil {
			s.log.Error("firewall watch: cannot read the kernel's nftables notifications; damage is noticed at the periodic firewall check only",
				zap.Duration("check_interval", s.cfg.TamperInterval), zap.Error(err))
		}
	}()
	if _, ok := fw.(JoinedWatcher); ok {
		select {
		case <-joined:
		case <-end:
		case <-ctx.Done():
		}
	}
	return s.watch.kick, end
}

// watched is watchFirewall's pass over what the watch gathered.
func (s *Server) watched(ctx context.Context) {
	w := &s.watch
	w.mu.Lock()
	damage, by, deleted, added, overflow, lost := w.damage, w.by, w.deleted, w.added, w.overflow, w.lost
	w.damage, w.by, w.deleted, w.added, w.overflow, w.lost = nil, nil, nil, nil, false, nil
	w.mu.Unlock()
	// Adds told within watchCheckGap of the last pass that undid some
	// wait for the gap's end, gathered (beyond maxWatchPending: the
	// audit, which removes what no lease explains). Deletions likewise:
	// a tool deleting a live lease's element in a loop is answered by a
	// transaction a gap, not one per notification burst, and none waits
	// longer than the gap. Before (h/watchleft), each burst was put back
	// at once (TestE2EWatchRestoreGap).
	added, addBy, over := w.undo.take(added, by, w.poke, func(n int, wait time.Duration) {
		s.log.Warn("firewall watch: someone added pinholes to pcpd's sets again; undoing when the gap since the last undo is up",
			zap.Int("count", n), zap.Uint32s("netlink_ports", by), zap.Duration("in", wait))
	})
	overflow = overflow || over
	deleted, delBy, over := w.restore.take(deleted, by, w.poke, func(n int, wait time.Duration) {
		s.log.Warn("firewall watch: someone deleted pinholes from pcpd's sets again; putting back when the gap since the last put-back is up",
			zap.Int("count", n), zap.Uint32s("netlink_ports", by), zap.Duration("in", wait))
	})
	if over {
		// Told deletions dropped: the record of put-backs goes too, as
		// for note's overflow. One of them may be of a put-back the
		// record holds (told before it was recorded: the race of
		// TestAuditPutBackDeletedBeforeNoted), which the watch now
		// never puts back. Before (h/putback), the record stayed: the
		// running audit left that element out, missing until the audit
		// this overflow asks for, a lostAuditGap later at worst
		// (TestAuditPutBackRecordDropped).
		w.dropPutBacks()
	}
	overflow = overflow || over
	audit, checked := false, false
	if lost != nil || overflow {
		s.m.watchLost.Inc()
		s.log.Warn("firewall watch: notifications of nftables changes were lost; checking the firewall and auditing its pinholes now",
			zap.Bool("too_many_deleted", overflow), zap.Error(lost))
		audit = true
	}
	if len(damage) > 0 && !audit && !w.lastCheck.IsZero() {
		// Damage within watchCheckGap of the last check waits for the
		// gap's end (lost notifications do not: they are checked at once).
		if wait := watchCheckGap - time.Since(w.lastCheck); wait > 0 {
			if !w.checkOwed {
				w.checkOwed = true
				s.log.Warn("firewall watch: someone changed pcpd's nftables objects again; checking when the gap since the last check is up",
					zap.Strings("noticed", damage), zap.Uint32s("netlink_ports", by), zap.Duration("in", wait))
				time.AfterFunc(wait, w.poke)
			}
			damage = nil
		}
	}
	if len(damage) == 0 && w.checkOwed && time.Since(w.lastCheck) >= watchCheckGap {
		damage = []string{"changes told during the gap since the last check"}
	}
	if len(damage) > 0 || audit {
		w.checkOwed = false
		w.lastCheck = time.Now()
		if len(damage) > 0 {
			s.log.Warn("firewall watch: someone changed pcpd's nftables objects; checking the firewall now",
				zap.Strings("noticed", damage), zap.Uint32s("netlink_ports", by))
		}
		s.m.watchChecks.Inc()
		before := w.reinstalls.Load()
		s.checkFirewall()
		if w.reinstalls.Load() != before {
			deleted = nil // every lease's pinholes are back
			w.restore.owed, w.restore.by, w.refusedBack = nil, nil, nil
		}
		checked = true
	}
	// The audit, at most once per lostAuditGap: one owed sooner is
	// deferred to the gap's end, not skipped. Before (review h/revnftmon),
	// it was skipped: an element deleted while the second loss in a minute
	// kept the watch deaf was missing until the hourly audit or the
	// lease's renewal (TestE2EWatchLostAuditDeferred).
	if (audit || w.auditOwed) && ctx.Err() == nil {
		if wait := lostAuditGap - time.Since(w.lastAudit); w.lastAudit.IsZero() || wait <= 0 {
			w.lastAudit = time.Now()
			w.auditOwed = false
			s.startAudit(ctx, true)
		} else if !w.auditOwed {
			w.auditOwed = true
			s.log.Warn("firewall watch: audit for lost notifications deferred, one ran within the gap; it runs when the gap is up",
				zap.Duration("in", wait))
			time.AfterFunc(wait, w.poke)
		}
	}
	if checked {
		// After the audit for lost notifications: one started there
		// reads the kernel after this check's repair too, and clears the
		// owed one (startAudit). Before (h/auditlife), the owed one
		// started first, and the lost notifications' ask, finding it
		// running, made a second audit (a second dump) after it
		// (TestWatchLostAuditFoldsOwed).
		s.auditAfterRepair(ctx)
	}
	if len(deleted) > 0 && ctx.Err() == nil && s.restoreDeleted(deleted, delBy) {
		w.restore.last = time.Now()
	}
	if len(added) > 0 && ctx.Err() == nil {
		w.undo.last = time.Now()
		retry := s.undoAdds(added, addBy)
		w.retryCatchAlls(retry, s.log)
		if back := w.refusedBack; len(back) > 0 {
			s.restoreDeleted(back, nil) // once: what was refused again waits for the audit
			w.refusedBack = nil
		}
	}
	if watchPassHook != nil {
		watchPassHook()
	}
}

// restoreDeleted puts back the pinholes of ps (deleted by someone else)
// that a live lease holds now, each with the latest expiry among the
// leases on its tuple that hold it (as a re-install: table.installs),
// never beyond. Under s.mu: the table is committed state (see above).
// It reports whether it sent the kernel anything.
func (s *Server) restoreDeleted(ps []pinhole.Pinhole, by []uint32) (wrote bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	hs := s.holdersLocked(len(ps))
	defer hs.clear()
	var ops [][]pinhole.Op
	for _, p := range ps {
		if !hs.first(p) {
			continue
		}
		if until := hs.until(p); !until.IsZero() {
			ops = append(ops, []pinhole.Op{{Kind: pinhole.Install, Pinhole: p, Timeout: until.Sub(hs.now)}})
		}
	}
	if len(ops) == 0 {
		s.log.Debug("firewall watch: deleted pinholes no live lease holds", zap.Int("count", len(hs.seen)))
		return false
	}
	// An install the kernel refuses (its key taken by an element someone
	// added: undoAdds deletes that and puts this one back) is left out
	// and the rest put back. Before (review h/revfwadd), one refused op
	// failed the whole batch: every other pinhole deleted with it waited
	// for the audit (TestE2EWatchUndoesReplacedMapping).
	//
	// What the kernel applied is recorded for an audit whose dump runs
	// (notePutBacks); what it did not leaves the record.
	var back []pinhole.Pinhole
	done, err := s.applyGroupsEach(ops, hs.now, func(op pinhole.Op, err error) {
		s.log.Warn("firewall watch: cannot put back a pinhole someone deleted (its element taken?); the rest goes on",
			zap.Stringer("pinhole", op.Pinhole), zap.Error(err))
		if len(s.watch.refusedBack) < maxWatchPending {
			s.watch.refusedBack = append(s.watch.refusedBack, op.Pinhole)
		}
	}, func(g []pinhole.Op) { back = append(back, g[0].Pinhole) })
	s.watch.notePutBacks(back)
	if done < len(ops) {
		put := make(map[pinhole.Pinhole]struct{}, len(back))
		for _, p := range back {
			put[p] = struct{}{}
		}
		var failed []pinhole.Pinhole
		for _, g := range ops {
			if _, ok := put[g[0].Pinhole]; !ok {
				failed = append(failed, g[0].Pinhole)
			}
		}
		s.watch.forgetPutBacks(failed)
	}
	if err != nil {
		s.m.kernelErrors.Inc()
		s.log.Error("firewall watch: cannot put back pinholes someone deleted; the undo of what took their place (holders.deleteGroup, then a retry of these) or the next audit does", zap.Int("pinholes", len(ops)-done), zap.Error(err))
	}
	if done == 0 {
		return true
	}
	s.m.watchRestored.Add(float64(done))
	first := make([]string, 0, 4)
	for _, g := range ops[:min(len(ops), cap(first))] {
		first = append(first, g[0].Pinhole.String())
	}
	s.log.Warn("firewall watch: someone deleted pinholes of live leases from the kernel; put back with their leases' remaining lifetimes",
		zap.Int("count", done), zap.Strings("first", first), zap.Uint32s("netlink_ports", by))
	return true
}

// holders is what restoreDeleted and undoAdds decide by, under s.mu:
// the live leases that hold a pinhole, at now, and the pinholes seen.
type holders struct {
	s    *Server
	now  time.Time
	seen map[pinhole.Pinhole]struct{}
	buf  []store.Lease
	held []pinhole.Pinhole
}

// holdersLocked expires what is due and returns the holders at now, for
// n pinholes. Under s.mu.
func (s *Server) holdersLocked(n int) *holders {
	now := s.now()
	s.expireLocked(now)
	return &holders{s: s, now: now, seen: make(map[pinhole.Pinhole]struct{}, n)}
}

// first reports whether p is seen for the first time.
func (h *holders) first(p pinhole.Pinhole) bool {
	if _, ok := h.seen[p]; ok {
		return false
	}
	h.seen[p] = struct{}{}
	return true
}

// until is what the kernel should hold for p: the latest expiry of the
// live leases on p's tuple that hold p (an absorbed renewal's synced one:
// kernelExpiry, as the audit), or zero if no live lease holds it. Before
// (review h/revfwadd), the table's expiry: the watch put an absorbed
// renewal's element back beyond the stored lease
// (TestWatchRestoresKernelView).
func (h *holders) until(p pinhole.Pinhole) time.Time {
	var until time.Time
	h.buf = h.s.tab.onTupleInto(tuple{proto: p.Protocol, addr: p.InternalAddr, port: p.InternalPort}, h.buf)
	for i := range h.buf {
		l := &h.buf[i]
		if !l.Expires.After(h.now) {
			continue
		}
		// Held by a live lease: never zero, so undoAdds never takes it
		// for unheld (a synced expiry already past, an absorbed renewal
		// not yet flushed, is put back for a millisecond and ends at
		// once; the lease's flush raises it). The audits and the repair
		// install nothing for such a lease instead: for them it only
		// decides the timeout.
		at := h.s.kernelExpiry(l)
		if least := h.now.Add(time.Millisecond); at.Before(least) {
			at = least
		}
		if !at.After(until) {
			continue
		}
		h.held = appendPinholes(h.held[:0], l)
		for _, x := range h.held {
			if c, err := x.Canonical(); err == nil && c == p {
				until = at
				break
			}
		}
	}
	return until
}

func (h *holders) clear() { clear(h.buf) }

// undoAdds undoes the pinhole elements someone else added (ps, as the
// kernel told them, with the expiry they were given): one no live lease
// holds is deleted; one a live lease holds is installed again with the
// latest expiry of its holders (as restoreDeleted), which cuts a longer
// foreign timeout back to the lease (the kernel updates an element's
// timeout in place) and never goes beyond it. Under s.mu, for the same
// reason as restoreDeleted: a lease granted after the add holds its
// pinhole by then and keeps it; one deleted since has left the table.
//
// An op the kernel refuses (someone changed that element again since:
// its own notification follows) is left out and the rest applied, so
// that one racing element cannot keep the others in place; what is left
// is the audit's.
func (s *Server) undoAdds(ps []toldAdd, by []uint32) (retry []toldAdd) {
	s.mu.Lock()
	defer s.mu.Unlock()
	hs := s.holdersLocked(len(ps))
	defer hs.clear()
	var ops [][]pinhole.Op
	var longer []string // held ones given more than their lease (for the log)
	// The latest told add of an element is what the kernel holds: taken
	// first (an own write told before someone's longer re-add must not
	// hide it).
	for i := len(ps) - 1; i >= 0; i-- {
		e := ps[i]
		p := e.p
		if !hs.first(p) {
			continue
		}
		until := hs.until(p)
		if until.IsZero() && !e.expires.IsZero() && e.expires.Sub(hs.now) <= selfEnding {
			// Ends by itself by the time a delete would (a delete's own
			// guard add, told when pcpd's ports are unknown, is one:
			// deleting it again would add and tell it again, for ever).
			continue
		}
		if until.IsZero() {
			// The live pinholes sharing an element's key with p, or an
			// overlapping range (a NAPT mapping of the same internal
			// endpoint: the SNAT companion; one whose map element p
			// replaced or covers) are taken out before and put back
			// after p's delete, in the same transaction (deleteGroup).
			ops = append(ops, hs.deleteGroup(p))
			continue
		}
		left := until.Sub(hs.now)
		if !e.expires.IsZero() && e.expires.Sub(until).Abs() <= addSlack {
			// Already what the kernel should hold: nothing to cut back.
			// Before (review h/revfwadd), re-installed all the same: when
			// pcpd's own writes are told (its ports unknown: the main
			// socket's redial failed, google/nftables dialling a socket
			// per call), each re-install was told again and re-installed
			// a gap later, for ever (TestWatchOwnAddNotReinstalled).
			continue
		}
		if e.expires.IsZero() || e.expires.After(until) {
			longer = append(longer, p.String())
		}
		ops = append(ops, []pinhole.Op{{Kind: pinhole.Install, Pinhole: p, Timeout: left}})
	}
	done, failed := s.applyGroups(ops, hs.now, func(op pinhole.Op, err error) {
		s.log.Warn("firewall watch: cannot undo a pinhole someone added (changed again since?); the rest goes on, the audit sees to it",
			zap.Stringer("pinhole", op.Pinhole), zap.Error(err))
		if op.Kind == pinhole.Delete && op.Pinhole.CatchAll() && len(retry) < maxWatchPending {
			// No notification follows (nobody changed it: its own
			// transaction failed, deleteCatchAll): the watch tries it
			// again (watched, catchAllRetries).
			retry = append(retry, toldAdd{p: op.Pinhole})
		}
	})
	if failed != nil {
		s.m.kernelErrors.Inc()
	}
	s.m.watchUndone.Add(float64(done))
	first := make([]string, 0, 4)
	for _, e := range ps[:min(len(ps), cap(first))] {
		first = append(first, e.p.String())
	}
	s.log.Warn("firewall watch: someone added pinholes to pcpd's sets; removed those no live lease holds, the rest cut back to their leases' remaining lifetimes",
		zap.Int("count", len(hs.seen)), zap.Int("undone", done), zap.Strings("first", first),
		zap.Strings("given_more_than_their_lease", longer[:min(len(longer), 4)]), zap.Uint32s("netlink_ports", by), zap.Error(failed))
	return retry
}

// applyGroups applies groups of ops in transactions of at most
// pinhole.MaxBatch ops, a group never split (its ops take effect together
// or not at all); a group with an op the kernel refuses is left out
// (refused is told) and the rest applied. It returns how many groups were
// applied and the last error.
//
// The ops' timeouts were computed at the clock read timed: before each
// try they are shortened by the time since (rounded up to the
// millisecond; an Install or Refresh left with less than a millisecond is
// dropped, a group left empty too), so that a pinhole put back after
// refused tries (each a transaction and the backend's blame) ends no
// later than its lease, as auditLarge's steps (lateBy). Before (review
// h/revwl), every refused try made the rest end that much after their
// leases (TestApplyGroupsRetryNotLate).
func (s *Server) applyGroups(groups [][]pinhole.Op, timed time.Time, refused func(pinhole.Op, error)) (done int, failed error) {
	return s.applyGroupsEach(groups, timed, refused, nil)
}

// applyGroupsEach is applyGroups telling applied (if not nil) each group
// the kernel applied, as applied (shortened: lateGroups).
func (s *Server) applyGroupsEach(groups [][]pinhole.Op, timed time.Time, refused func(pinhole.Op, error), applied func([]pinhole.Op)) (done int, failed error) {
	groups = slices.Clone(groups) // the caller's, left as they were
	var batch []pinhole.Op
	var cut time.Duration // what the groups were shortened by so far
	for len(groups) > 0 {
		if late := s.now().Sub(timed); late > cut {
			late = (late + time.Millisecond - 1).Truncate(time.Millisecond)
			groups = lateGroups(groups, late-cut)
			cut = late
			if len(groups) == 0 {
				break
			}
		}
		batch = batch[:0]
		n := 0
		for n < len(groups) && (n == 0 || len(batch)+len(groups[n]) <= pinhole.MaxBatch) {
			batch = append(batch, groups[n]...)
			n++
		}
		err := s.fw.Apply(batch)
		var oe *pinhole.OpError
		if err != nil && errors.As(err, &oe) && oe.Index >= 0 && oe.Index < len(batch) {
			refused(oe.Op, oe.Err)
			failed = err
			for g, at := 0, 0; g < n; g++ {
				if at += len(groups[g]); oe.Index < at {
					if rest := withoutPutBack(groups[g], oe.Index-(at-len(groups[g]))); len(rest) > 0 {
						groups[g] = rest
					} else {
						groups = slices.Delete(groups, g, g+1)
					}
					break
				}
			}
			continue
		}
		if err != nil {
			failed = err
		} else {
			done += n
			if applied != nil {
				for _, g := range groups[:n] {
					applied(g)
				}
			}
		}
		groups = groups[n:]
	}
	return done, failed
}

// withoutPutBack is what of group g is tried again when the kernel
// refuses its op i: if that is a put-back of a live pinhole around a
// foreign one's Delete (an Install marked After: deleteGroup), g without
// it and its take-out (a copy); else nothing (g is left out). The
// foreign element then goes all the same, the live one left as it was
// (another element overlapping it: its own undo puts it back). Before
// (review h/revwl), the group was left out whole: a live pin6_filter
// element replaced by hand by its two halves, each half's put-back
// refused while the other half stayed, kept both foreign halves and the
// live one missing at every undo and audit (TestE2EWatchUndoesSplitFiltered).
func withoutPutBack(g []pinhole.Op, i int) []pinhole.Op {
	if i < 0 || i >= len(g) || g[i].Kind != pinhole.Install || !g[i].After {
		return nil
	}
	c := g[i].Pinhole
	out := make([]pinhole.Op, 0, len(g)-1)
	for j, op := range g {
		if j == i || (op.Kind == pinhole.Delete && op.Pinhole == c) {
			continue
		}
		out = append(out, op)
	}
	return out
}

// lateGroups shortens the Install and Refresh ops of groups by late (a
// whole number of milliseconds), each group a copy (the caller's ops are
// left as they were); an op left with less than a millisecond is dropped
// (the kernel view ends by then), and a group left empty.
func lateGroups(groups [][]pinhole.Op, late time.Duration) [][]pinhole.Op {
	out := groups[:0]
	for _, g := range groups {
		ng := make([]pinhole.Op, 0, len(g))
		for _, op := range g {
			if op.Kind == pinhole.Install || op.Kind == pinhole.Refresh {
				if op.Timeout -= late; op.Timeout < time.Millisecond {
					continue
				}
			}
			ng = append(ng, op)
		}
		if len(ng) > 0 {
			out = append(out, ng)
		}
	}
	return out
}

// deleteGroup is q's Delete (q no live lease holds) with its sharers, one
// group of ops (applyGroups: one transaction): taken out before, q's
// Delete, put back after.
func (h *holders) deleteGroup(q pinhole.Pinhole) []pinhole.Op {
	pre, post := h.sharers(q)
	del := pinhole.Op{Kind: pinhole.Delete, Pinhole: q, After: len(pre) > 0}
	return slices.Concat(pre, []pinhole.Op{del}, post)
}

// sharers are the ops that let q, a NAPT mapping, IPv6 redirect or
// filtered pinhole no live lease holds, be deleted without taking a live
// one's elements with it: the live pinholes whose map or set element has
// q's key or, filtered, a range overlapping q's (q replaced it, or covers
// its start: put back after) or, NAPT, whose SNAT companion has q's
// companion's key or an overlapping range (the same internal endpoint on
// another external port: q's Delete, which adds its companion first, is
// refused while that is there; taken out before and put back after).
// Before (review h/revfwadd), q's undo was refused for ever
// (TestE2EWatchUndoesNAPTOnLiveEndpoint), and the live mapping q replaced
// was left without its element (TestE2EWatchUndoesReplacedMapping); with
// ranges that overlap without being equal (h/watchleft), the same
// (TestE2EWatchUndoesOverlappingFiltered): the kernel refuses a
// concatenated-range element that starts or ends inside another one. The
// ops after the first take-out and the put-backs are marked After: the
// kernel must see them in order (pinhole.Op).
//
// Candidates are the live leases on q's tuple, on the tuple holding q's
// external endpoint and, for a filtered IPv6 pinhole on one port, on the
// all-ports tuple; a filtered IPv6 pinhole on all ports (by hand) overlaps
// live ones on any port of its address, which the table does not index:
// those are not put back with it, but right after it (the watch's
// refusedBack, the audit's missing pinholes after its deletes: h/redir6).
// An odd q (pinhole.Pinhole.Odd: a shape pcpd never writes, such as a
// redirect from every port) is judged by its fields as the shape it reads
// like: the live elements of its own set that it overlaps on other ports
// are put back the same way.
func (h *holders) sharers(q pinhole.Pinhole) (pre, post []pinhole.Op) {
	if q.OddSNAT() {
		return nil, h.snatPutBacks(q)
	}
	plain := !q.InternalAddr.Is4() && q.ExternalPort == q.InternalPort
	if plain && !q.RemotePrefix.IsValid() {
		return nil, nil // an unfiltered pinhole: a hash set element, no data, no companion
	}
	tuples := []tuple{{proto: q.Protocol, addr: q.InternalAddr, port: q.InternalPort}}
	if hd, ok := h.s.tab.holder(endpoint{addr: q.ExternalAddr, proto: q.Protocol, port: q.ExternalPort}); ok {
		if tp := (tuple{proto: q.Protocol, addr: hd.addr, port: hd.port}); tp != tuples[0] {
			tuples = append(tuples, tp)
		}
	}
	if plain && q.InternalPort != 0 {
		tuples = append(tuples, tuple{proto: q.Protocol, addr: q.InternalAddr})
	}
	var cands []pinhole.Pinhole
	for _, tp := range tuples {
		cands = h.liveOn(tp, cands, func(c pinhole.Pinhole) bool { return c != q && (mapMeets(c, q) || snatMeets(c, q)) })
	}
	for _, c := range cands {
		until := h.until(c)
		if until.IsZero() {
			continue
		}
		// Taken out before when q's Delete would meet it: q's map element
		// elsewhere, or q's SNAT companion (its Delete's guard add)
		// starting or ending inside c's. Before (review h/revwl), only
		// the former: a narrower foreign mapping on c's own endpoints (c
		// deleted and it added in one transaction, c then put back around
		// it) was refused at every undo and audit
		// (TestE2EWatchUndoesNarrowerOnLiveMapping). Not when q's filter
		// covers c's (equal SNAT keys, or q wider: its guard add wraps
		// c's companion, and c's own guard add could start inside q).
		// When the map elements meet, c's companion alone (Companion):
		// c's Delete adds c's map element first, which the kernel refuses
		// when c's range starts inside q's (q narrower from c's start, c
		// deleted by hand). Before (h/redir6), that equal-edge form was
		// refused either way, c's Delete or q's, by every undo and audit
		// (TestE2EWatchUndoesEqualEdgeOnLiveMapping).
		if meets := mapMeets(c, q); !meets || (snatMeets(c, q) && !filterCovers(q, c)) {
			pre = append(pre, pinhole.Op{Kind: pinhole.Delete, Pinhole: c, Companion: meets})
		}
		post = append(post, pinhole.Op{Kind: pinhole.Install, Pinhole: c, Timeout: until.Sub(h.now), After: true})
	}
	return pre, post
}

// snatPutBacks are the put-backs (Install, After) around the Delete of
// q, an element of a SNAT map by hand (pinhole.Pinhole.OddSNAT), of the
// live NAPT mappings on the internal tuple q keys (its first port, for a
// port range): q may have taken the place of one's companion (deleted
// and added in one transaction, the same key in snat4; a range over it
// in snat4_filter, whose put-back starts inside q). No take-out before:
// q's Delete is of its own bytes exactly (no companion computed, no map
// element), which are no companion pcpd writes, so it never deletes a
// live lease's companion (the guard add of q's bytes where a live
// companion holds q's key with other data is refused, EBUSY, the whole
// transaction with it: nothing of the live one's changes); a put-back
// writes the lease's own elements with what the kernel should hold
// (holders.until), as every put-back does. Before (h/oddsnat), such
// elements were never told (snatPinhole dropped them) nor listed.
func (h *holders) snatPutBacks(q pinhole.Pinhole) (post []pinhole.Op) {
	if !q.InternalAddr.Is4() {
		return nil // a catch-all: no fields
	}
	cands := h.liveOn(tuple{proto: q.Protocol, addr: q.InternalAddr, port: q.InternalPort}, nil,
		func(c pinhole.Pinhole) bool { return c.InternalAddr.Is4() })
	for _, c := range cands {
		if until := h.until(c); !until.IsZero() {
			post = append(post, pinhole.Op{Kind: pinhole.Install, Pinhole: c, Timeout: until.Sub(h.now), After: true})
		}
	}
	return post
}

// liveOn appends to cands the pinholes (canonical) of the live leases on
// tp that keep takes and cands does not hold yet.
func (h *holders) liveOn(tp tuple, cands []pinhole.Pinhole, keep func(pinhole.Pinhole) bool) []pinhole.Pinhole {
	h.buf = h.s.tab.onTupleInto(tp, h.buf)
	for i := range h.buf {
		l := &h.buf[i]
		if !l.Expires.After(h.now) {
			continue
		}
		h.held = appendPinholes(h.held[:0], l)
		for _, x := range h.held {
			if c, err := x.Canonical(); err == nil && keep(c) && !slices.Contains(cands, c) {
				cands = append(cands, c)
			}
		}
	}
	return cands
}

// mapMeets: a and b are elements of one map or set (NAPT mappings, IPv6
// redirects, filtered IPv6 pinholes) with one key (sameMapKey) or,
// filtered, overlapping ranges: some packet matches both.
func mapMeets(a, b pinhole.Pinhole) bool {
	if sameMapKey(a, b) {
		return true
	}
	if !filtersMeet(a, b) || a.InternalAddr.Is4() != b.InternalAddr.Is4() || a.Protocol != b.Protocol {
		return false
	}
	if a.InternalAddr.Is4() || a.ExternalPort != a.InternalPort {
		// napt4_filter, redir6_filter: keyed by the external endpoint.
		return b.InternalAddr.Is4() == a.InternalAddr.Is4() && (b.InternalAddr.Is4() || b.ExternalPort != b.InternalPort) &&
			a.ExternalAddr == b.ExternalAddr && a.ExternalPort == b.ExternalPort
	}
	// pin6_filter (a port range: one port or all) and pin6_addr_filter
	// (protocol 0): keyed by the internal address.
	return b.ExternalPort == b.InternalPort && a.InternalAddr == b.InternalAddr &&
		(a.InternalPort == b.InternalPort || a.InternalPort == 0 || b.InternalPort == 0)
}

// snatMeets: a and b, NAPT mappings, have SNAT companions of one key
// (sameSNATKey) or, filtered, of overlapping ranges.
func snatMeets(a, b pinhole.Pinhole) bool {
	return sameSNATKey(a, b) || (filtersMeet(a, b) && a.InternalAddr.Is4() && b.InternalAddr.Is4() &&
		a.InternalAddr == b.InternalAddr && a.Protocol == b.Protocol && a.InternalPort == b.InternalPort)
}

// filterCovers: every remote that passes b's filter passes a's (both
// filtered): a's range of a concatenated-range element wraps b's or
// equals it.
func filterCovers(a, b pinhole.Pinhole) bool {
	return a.RemotePrefix.IsValid() && b.RemotePrefix.IsValid() && a.RemotePrefix.Bits() <= b.RemotePrefix.Bits() &&
		a.RemotePrefix.Contains(b.RemotePrefix.Addr()) && (a.RemotePort == 0 || a.RemotePort == b.RemotePort)
}

// filtersMeet: a and b are both filtered and some remote passes both
// filters (prefixes overlap, ports equal or either any).
func filtersMeet(a, b pinhole.Pinhole) bool {
	return a.RemotePrefix.IsValid() && b.RemotePrefix.IsValid() && a.RemotePrefix.Overlaps(b.RemotePrefix) &&
		(a.RemotePort == 0 || b.RemotePort == 0 || a.RemotePort == b.RemotePort)
}

// sameMapKey: a and b, NAPT mappings or IPv6 redirects, are elements of
// one map with one key (external endpoint and filter).
func sameMapKey(a, b pinhole.Pinhole) bool {
	return a.InternalAddr.Is4() == b.InternalAddr.Is4() && a.ExternalAddr == b.ExternalAddr && a.Protocol == b.Protocol &&
		a.ExternalPort == b.ExternalPort && a.RemotePrefix == b.RemotePrefix && a.RemotePort == b.RemotePort &&
		(a.InternalAddr.Is4() || a.ExternalPort != a.InternalPort)
}

// sameSNATKey: a and b, NAPT mappings, have SNAT companions of one key
// (internal endpoint and filter).
func sameSNATKey(a, b pinhole.Pinhole) bool {
	return a.InternalAddr.Is4() && b.InternalAddr.Is4() && a.InternalAddr == b.InternalAddr && a.Protocol == b.Protocol &&
		a.InternalPort == b.InternalPort && a.RemotePrefix == b.RemotePrefix && a.RemotePort == b.RemotePort
}

// toldAdd is an element someone added as the watch told it: its pinhole
// and the expiry the kernel was given (zero: none, permanent).
type toldAdd struct {
	p       pinhole.Pinhole
	expires time.Time
}

// addSlack is how far a told expiry may be from what the kernel should
// hold and still be left as it is: the notification's expiry is the
// kernel's at commit (in jiffies; a re-install's first add is nudged
// 50 ms short), read here a little later.
const addSlack = 250 * time.Millisecond

// selfEnding: an element no lease holds told with at most this left is
// not deleted: it ends by itself (pinhole's Delete adds its element for
// a second first, deleteGuardTimeout).
const selfEnding = time.Second + addSlack
