package server

import (
	"context"
	"net/netip"
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

// BenchmarkCutBack (h/auditrem, BENCHMARKS.md item 72): what the
// cut-back's check adds to the audit's hold of s.mu, at 200 000 intact
// IPv6 elements (auditMaxLeases: the most the dumping audit sees), none
// cut back: a comparison per element, the map look-up being the orphan
// check's. (The branch's first version, a pass of its own over the dump
// with two look-ups per element, took 107–131 ms.)
func BenchmarkCutBack(b *testing.B) {
	const n = 200_000
	now := time.Date(2026, 12, 6, 23, 0, 0, 0, time.UTC)
	have := make([]pinhole.Entry, 0, n)
	base := netip.MustParseAddr("2001:db8::").As16()
	for i := range n {
		a := base
		a[12], a[13], a[14], a[15] = byte(i>>24), byte(i>>16), byte(i>>8), byte(i)
		addr := netip.AddrFrom16(a)
		have = append(have, pinhole.Entry{Pinhole: hole(6, addr, 443, addr, 443), Remaining: time.Hour - time.Second})
	}
	until := now.Add(time.Hour)
	b.ResetTimer()
	for range b.N {
		var ops []pinhole.Op
		for _, e := range have {
			ops = cutBack(ops, e, until, now, now)
		}
		if len(ops) != 0 {
			b.Fatalf("%d cut back, want 0", len(ops))
		}
	}
}
