package server

import (
	"context"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
)

// TestAuditAboveMaxRetriesOwnHolds (h/watchleft): a step of the audit above
// auditMaxLeases that the kernel refuses as a conflict is tried again in a
// hold of s.mu of its own, read from the table anew: no hold makes more
// than two Applies (a refused try; on the last, the ops before the
// conflict), and a lease the engine deletes between two tries (here: the
// hold hook, after the first refused try) is not installed by the next.
// 20 MAPs deleted by hand, 6 refused as conflicts, all in one step.
// Before, the step's tries ran in its one hold: 'a hold of s.mu made 6
// Applies' (5 refused tries, then the ops before the 6th conflict).
func TestAuditAboveMaxRetriesOwnHolds(t *testing.T) {
	defer func(n int) { auditMaxLeases = n }(auditMaxLeases)
	auditMaxLeases = 3
	h := newHarness(t)
	holes := mapDeletedByHand(t, h, 20)
	conflicts := map[pinhole.Pinhole]bool{}
	for i := 2; i < len(holes); i += 3 {
		conflicts[holes[i]] = true
	}
	if len(conflicts) <= auditConflictRetries {
		t.Fatalf("%d conflicts, want more than auditConflictRetries (%d) (test setup)", len(conflicts), auditConflictRetries)
	}
	applies, most, holds := 0, 0, 0
	refuseAsConflict(h, func(p pinhole.Pinhole) bool { return conflicts[p] })
	refuse := h.fw.FailApply
	h.fw.FailApply = func(ops []pinhole.Op) error {
		applies++
		return refuse(ops)
	}
	gone := holes[0] // not a conflict: in the step's every try
	defer func() { auditHoldHook = nil }()
	auditHoldHook = func(time.Duration, bool) {
		holds++
		most = max(most, applies)
		applies = 0
		if holds == 1 {
			// The engine deletes a lease between the first try and the
			// next (its own hold: the audit released s.mu).
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, gone.InternalPort, gone.InternalPort, 0, 1)), pcp.Success)
		}
	}
	h.s.auditFirewall(context.Background())
	auditHoldHook = nil
	h.fw.FailApply = nil
	if most > 2 {
		t.Errorf("a hold of s.mu made %d Applies, want at most 2 (a refused try; the ops before the last conflict)", most)
	}
	got := h.fw.Holes()
	for _, p := range holes {
		_, ok := got[p]
		switch {
		case p == gone && ok:
			t.Errorf("%v in the kernel after the audit: its lease was deleted before the retry", p)
		case p != gone && ok == conflicts[p]:
			t.Errorf("%v in the kernel %v, want %v", p, ok, !conflicts[p])
		}
	}
}
