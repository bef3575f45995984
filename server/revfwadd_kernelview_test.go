package server

import (
	"testing"
	"time"

	"github.com/pcpd/pcpd/pinhole"
)

// TestWatchRestoresKernelView (review h/revfwadd): the watch's put-backs
// (restoreDeleted for a delete by hand, undoAdds for a live lease's element
// re-added by hand with a longer timeout) give what the kernel should hold,
// as the audit does since TestAuditRestoresKernelView: the latest expiry of
// the live holders, an absorbed renewal's synced one. Before, holders.until
// took the table's expiry: the absorbed renewal's element was put back
// beyond the stored lease ("back until ... want ...").
func TestWatchRestoresKernelView(t *testing.T) {
	t.Run("restoreDeleted", func(t *testing.T) {
		h, now, deleted, want, _ := auditFixture(t)
		h.s.restoreDeleted(deleted, nil)
		checkBack(t, h, now, deleted, want, "deleted by hand, put back by the watch")
	})
	t.Run("undoAdds", func(t *testing.T) {
		h, now, deleted, want, _ := auditFixture(t)
		var added []pinhole.Entry
		for _, p := range deleted {
			added = append(added, pinhole.Entry{Pinhole: p, Remaining: 3 * time.Hour})
		}
		h.s.undoAdds(added, nil)
		checkBack(t, h, now, deleted, want, "re-added by hand (3h), cut back by the watch")
	})
}
