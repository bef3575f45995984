package server

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/server/servertest"
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

// steppingList is the fake firewall whose List first runs during (the
// dump runs without s.mu: a sweep tick's rebase may come meanwhile).
type steppingList struct {
	*servertest.Firewall
	during func()
}

func (f *steppingList) List() ([]pinhole.Entry, error) {
	f.during()
	return f.Firewall.List()
}

// TestAuditCutBackAcrossWallStep (review h/revrem): a wall-clock step
// rebased while the audit dumps neither makes it cut back intact
// elements nor hides one held longer than its lease. The audit read the
// running clock before the dump (listed) and compared listed plus each
// element's remaining time with the lease expiries under s.mu, which a
// rebase had shifted by the step meanwhile: before, an hour's step back
// made every intact element look an hour longer than its lease, each
// re-installed under s.mu ('an audit with a step back during its dump
// applied 1 transactions, want 0': two elements, 200 000 at the dump's bound, and a
// false "re-added by hand" warning), and an hour forward hid an element
// re-added with 30 minutes more ('... not cut back: 1h30m0s left').
func TestAuditCutBackAcrossWallStep(t *testing.T) {
	c := &stepClocks{}
	c.wall.Store(time.Date(2026, 12, 7, 1, 0, 0, 0, time.UTC).UnixNano())
	h := runClockHarness(t, c)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 80, 80, time.Hour, 1)), pcp.Success)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 81, 81, time.Hour, 2)), pcp.Success)
	p80, p81 := hole(6, addrA, 80, addrA, 80), hole(6, addrA, 81, addrA, 81)
	var step time.Duration
	fw := &steppingList{Firewall: h.fw, during: func() {
		c.step(step)
		h.s.checkClock() // a sweep tick's rebase
	}}
	h.s.mu.Lock()
	h.s.fw = fw
	h.s.mu.Unlock()

	step = -time.Hour
	applies := h.fw.Applies
	h.s.auditFirewall(context.Background())
	if n := h.fw.Applies - applies; n != 0 {
		t.Errorf("an audit with a step back during its dump applied %d transactions, want 0", n)
	}

	if err := h.fw.Apply([]pinhole.Op{{Kind: pinhole.Install, Pinhole: p81, Timeout: 90 * time.Minute}}); err != nil {
		t.Fatal(err)
	}
	step = time.Hour
	h.s.auditFirewall(context.Background())
	holes := h.fw.Holes()
	if d := holes[p81]; d != time.Hour {
		t.Errorf("%v, re-added by hand 30 min past its lease, not cut back across a step forward: %v left, want 1h0m0s", p81, d)
	}
	if d := holes[p80]; d != time.Hour {
		t.Errorf("%v: %v left, want 1h0m0s", p80, d)
	}
}
