package server

import (
	"context"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
)

// TestAuditPutBackRecordDropped (h/putback; issue 9): the paths that drop
// the record of the watch's put-backs during an audit's dump (the cap,
// maxPutBackDuring; notifications beyond maxWatchPending, told in one
// burst or gathered over a watchCheckGap) cost only redundant installs:
// after the audit the kernel holds every live lease's element, the one a
// tool deleted again right after its put-back included (the race of
// TestAuditPutBackDeletedBeforeNoted: its deletion told before the
// put-back was recorded, so the record keeps it), and not the element of
// a lease its client deleted after the put-back. Before, the pass that
// dropped told deletions beyond maxWatchPending (gapped.take's overflow)
// kept the record: the audit left out that element, which the watch
// would never put back, until the audit the overflow asks for ('a live
// lease's element missing after the audit' in "overflow gathered").
func TestAuditPutBackRecordDropped(t *testing.T) {
	const n = 40
	defer func(p, c int, gap time.Duration) { maxWatchPending, maxPutBackDuring, watchCheckGap = p, c, gap }(maxWatchPending, maxPutBackDuring, watchCheckGap)
	maxWatchPending = 4
	watchCheckGap = time.Hour // no pass of the test's acts on deletions at once but the first
	setup := func(t *testing.T) (*harness, *dumpThenList, []pinhole.Pinhole) { return deletedBeforeDump(t, n) }
	// foreign are deletions told that are no lease's (another
	// controller's elements), enough to overflow what a pass gathers.
	foreign := func(k int) []pinhole.Pinhole {
		var ps []pinhole.Pinhole
		for i := range k {
			ps = append(ps, hole(17, addrB, uint16(9000+i), addrB, uint16(9000+i)))
		}
		return ps
	}
	// gone is the lease its client deletes after its pinhole's put-back
	// (a delete of pcpd's own: never told).
	deleteLease := func(t *testing.T, h *harness, p pinhole.Pinhole) {
		t.Helper()
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, p.InternalPort, 0, 0, 1)), pcp.Success)
	}
	// kernel checks the elements after the audit: every live one there,
	// gone's not.
	kernel := func(t *testing.T, h *harness, holes []pinhole.Pinhole, gone pinhole.Pinhole) {
		t.Helper()
		got := h.fw.Holes()
		for _, p := range holes {
			if _, ok := got[p]; !ok && p != gone {
				t.Errorf("%v: a live lease's element missing after the audit", p)
			}
		}
		if _, ok := got[gone]; ok {
			t.Errorf("%v: the element of a lease deleted during the dump is in the kernel after the audit", gone)
		}
	}
	// racePutBack is the watch's put-back of holes during the dump, with
	// x deleted again by a tool right after the kernel applied it and
	// told by tell before the put-back is recorded.
	racePutBack := func(t *testing.T, h *harness, fw *dumpThenList, holes []pinhole.Pinhole, x pinhole.Pinhole, tell func()) {
		fw.applied = func([]pinhole.Op) {
			fw.applied = nil
			mapDeletedByHandAgain(t, h, []pinhole.Pinhole{x})
			tell()
		}
		h.s.restoreDeleted(holes, nil)
	}

	t.Run("cap", func(t *testing.T) {
		defer func(c int) { maxPutBackDuring = c }(maxPutBackDuring)
		maxPutBackDuring = 16
		h, fw, holes := setup(t)
		gone := holes[0]
		var kept, afterCap int
		var dropped bool
		fw.after = func() {
			h.s.restoreDeleted(holes[:10], nil)
			kept = len(h.s.watch.back)
			h.s.restoreDeleted(holes[10:30], nil) // 30 > 16: the record goes
			dropped = !h.s.watch.backOn && h.s.watch.back == nil
			h.s.restoreDeleted(holes[30:], nil) // not recorded: none runs
			afterCap = len(h.s.watch.back)
			deleteLease(t, h, gone)
		}
		ops := fw.installs
		h.s.auditFirewall(context.Background())
		if kept != 10 || !dropped || afterCap != 0 {
			t.Fatalf("record: %d after 10 put-backs (want 10), dropped past the cap %v (want true), %d after (want 0)", kept, dropped, afterCap)
		}
		// The watch's 40, then the audit's: every live one its dump
		// lacked, again (the cost of the drop).
		if got := fw.installs - ops; got != n+n-1 {
			t.Errorf("%d installs, want %d: the watch's %d and the audit's %d (every live one again)", got, 2*n-1, n, n-1)
		}
		kernel(t, h, holes, gone)
		// The next audit records again.
		mapDeletedByHandAgain(t, h, holes[1:4])
		fw.after = func() { h.s.restoreDeleted(holes[1:4], nil) }
		ops = fw.installs
		h.s.auditFirewall(context.Background())
		if got := fw.installs - ops; got != 3 {
			t.Errorf("the next audit: %d installs, want 3 (the watch's; the audit's none)", got)
		}
		kernel(t, h, holes, gone)
	})

	t.Run("overflow told", func(t *testing.T) {
		h, fw, holes := setup(t)
		x, gone := holes[3], holes[5]
		fw.after = func() {
			// x's deletion is told in a burst past maxWatchPending: the
			// watch drops it (and audits), the record must go.
			racePutBack(t, h, fw, holes, x, func() {
				h.s.watch.note(pinhole.WatchEvent{Deleted: append([]pinhole.Pinhole{x}, foreign(maxWatchPending)...)})
			})
			deleteLease(t, h, gone)
		}
		ops := fw.installs
		h.s.auditFirewall(context.Background())
		h.s.watch.mu.Lock()
		overflow, told := h.s.watch.overflow, len(h.s.watch.deleted)
		h.s.watch.mu.Unlock()
		if !overflow || told != 0 {
			t.Fatalf("overflow %v with %d deletions gathered, want true and 0 (test setup)", overflow, told)
		}
		if got := fw.installs - ops; got != n+n-1 {
			t.Errorf("%d installs, want %d: the watch's %d and the audit's %d (every live one again)", got, 2*n-1, n, n-1)
		}
		kernel(t, h, holes, gone)
	})

	t.Run("overflow gathered", func(t *testing.T) {
		h, fw, holes := setup(t)
		x, gone := holes[3], holes[5]
		s, w := h.s, &h.s.watch
		// An audit runs (this one): the pass's ask for one waits for it.
		w.audits.running, w.audits.done = true, make(chan bool, 1)
		defer func() { w.audits.running = false }()
		fw.after = func() {
			// A pass put back deletions within the gap; what it owes
			// fills what a pass gathers.
			w.restore.last = time.Now()
			w.restore.owed = foreign(maxWatchPending)
			racePutBack(t, h, fw, holes, x, func() { w.note(pinhole.WatchEvent{Deleted: []pinhole.Pinhole{x}}) })
			// The pass for x's deletion: within the gap, past
			// maxWatchPending with what is owed: dropped (it audits).
			s.watched(context.Background())
			deleteLease(t, h, gone)
		}
		ops := fw.installs
		s.auditFirewall(context.Background())
		if !w.audits.again || len(w.restore.owed) != maxWatchPending {
			t.Fatalf("the pass asked for an audit %v, owes %d (want true, %d: x's deletion dropped) (test setup)", w.audits.again, len(w.restore.owed), maxWatchPending)
		}
		if got := fw.installs - ops; got != n+n-1 {
			t.Errorf("%d installs, want %d: the watch's %d and the audit's %d (every live one again)", got, 2*n-1, n, n-1)
		}
		kernel(t, h, holes, gone)
	})
}
