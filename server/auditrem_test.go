package server

import (
	"context"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pinhole"
)

// TestAuditCutsBackLongerTimeouts (h/auditrem): with the watch off, live
// leases' elements re-added by hand with a day's timeout (a filtered MAP
// sharing its element with a PEER, an absorbed renewal's, an IPv4 NAPT
// mapping's, plain IPv6 MAPs) are cut back by one audit to exactly what
// the kernel should hold (the latest holder's expiry, the absorbed one's
// synced expiry), never below it; an audit of an intact table applies
// nothing, before and after. Before, the audit ignored Remaining: each
// was left with its day ('back until ... want ...').
func TestAuditCutsBackLongerTimeouts(t *testing.T) {
	h, now, held, want, _ := auditFixture(t)
	h.s.auditFirewall(context.Background()) // puts back the deleted ones, removes the orphan
	checkBack(t, h, now, held, want, "deleted by hand, put back")
	applies := h.fw.Applies
	h.s.auditFirewall(context.Background())
	if n := h.fw.Applies - applies; n != 0 {
		t.Fatalf("an audit of an intact table applied %d transactions, want 0", n)
	}
	var longer []pinhole.Op
	for _, p := range held {
		longer = append(longer, pinhole.Op{Kind: pinhole.Install, Pinhole: p, Timeout: 24 * time.Hour})
	}
	if err := h.fw.Apply(longer); err != nil {
		t.Fatal(err)
	}
	h.s.auditFirewall(context.Background())
	checkBack(t, h, now, held, want, "re-added by hand (1d), cut back by the audit")
	applies = h.fw.Applies
	h.s.auditFirewall(context.Background())
	if n := h.fw.Applies - applies; n != 0 {
		t.Fatalf("an audit after the cut-back applied %d transactions, want 0", n)
	}
}
