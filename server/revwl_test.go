package server

import (
	"context"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pinhole"
)

// TestApplyGroupsRetryNotLate (review h/revwl): the watch's put-backs
// (restoreDeleted) and the audit below auditMaxLeases apply their groups
// with applyGroups, which leaves a group the kernel refuses out and tries
// the rest again; each refused try costs a transaction and the backend's
// blame (replays of prefixes of the batch). The ops of the later tries
// kept the timeouts computed at the pass's clock: every refused try made
// every other pinhole end that much after its lease, as auditLarge's did
// before review h/revbigaudit (TestAuditAboveMaxRetryNotLate). Fake
// firewall: 8 MAPs deleted by hand, 3 of their put-backs refused as
// conflicts, each refused try 40 ms of the clock. On main FAIL '... ends
// 120ms after its lease' (watch) and '... 120ms ...' (audit).
func TestApplyGroupsRetryNotLate(t *testing.T) {
	for _, path := range []string{"restoreDeleted", "audit"} {
		t.Run(path, func(t *testing.T) {
			h := newHarness(t)
			holes := mapDeletedByHand(t, h, 8)
			h.clock.Advance(time.Minute)
			conflicts := map[pinhole.Pinhole]bool{holes[1]: true, holes[4]: true, holes[6]: true}
			refuseConflictsCosting(h, conflicts, 40*time.Millisecond)
			if path == "audit" {
				h.s.auditFirewall(context.Background())
			} else {
				h.s.restoreDeleted(holes, nil)
			}
			h.fw.FailApply = nil
			checkBackNotLate(t, h, holes, conflicts)
		})
	}
}
