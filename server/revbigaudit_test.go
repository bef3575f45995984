package server

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
)

// TestAuditAboveMaxRetryNotLate (review h/revbigaudit): a step whose
// transaction the kernel refuses as a conflict applies the rest again,
// later by the failed transaction and its blame (the backend replays
// prefixes of the batch to find the op: several transactions of up to
// pinhole.MaxBatch ops). The ops applied then are shortened by that time
// too: no pinhole ends after its lease. Here the refused Apply takes
// 40 ms of the fake clock (the engine's and the kernel's), three times
// (three conflicting elements in the step). Before, the retried ops kept
// the timeouts computed before the first try: each pinhole ended 120 ms
// after its lease ('ends ... after its lease').
func TestAuditAboveMaxRetryNotLate(t *testing.T) {
	defer func(n int) { auditMaxLeases = n }(auditMaxLeases)
	auditMaxLeases = 3
	h := newHarness(t)
	holes := mapDeletedByHand(t, h, 8)
	h.clock.Advance(time.Minute)
	conflicts := map[pinhole.Pinhole]bool{holes[1]: true, holes[4]: true, holes[6]: true}
	refuseConflictsCosting(h, conflicts, 40*time.Millisecond)
	h.s.auditFirewall(context.Background())
	h.fw.FailApply = nil
	checkBackNotLate(t, h, holes, conflicts)
}

// TestRepairRestoresKernelView (review h/revbigaudit): the firewall
// check's repair (the table deleted: every lease's pinholes re-installed,
// table.installs) gives an absorbed renewal's element its synced expiry
// (kernelExpiry), as the audits and the watch do (another lease its
// own expiry). Before, the table's expiry: the absorbed lease's element went back until 10:01, a
// minute beyond the stored lease ('back until ..., want ...').
func TestRepairRestoresKernelView(t *testing.T) {
	h := newHarness(t)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 80, 80, time.Hour, 3)), pcp.Success)
	synced := h.clock.Now().Add(time.Hour)
	h.clock.Advance(time.Minute)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 80, 80, time.Hour, 3)), pcp.Success) // absorbed
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 81, 81, 2*time.Hour, 4)), pcp.Success)
	h.fw.Tamper()
	h.s.checkFirewall()
	holes := h.fw.Holes()
	for p, want := range map[pinhole.Pinhole]time.Time{
		hole(6, addrA, 80, addrA, 80): synced,
		hole(6, addrA, 81, addrA, 81): h.clock.Now().Add(2 * time.Hour),
	} {
		d, ok := holes[p]
		if !ok {
			t.Errorf("%v not back after the repair", p)
			continue
		}
		if end := h.clock.Now().Add(d); !end.Equal(want) {
			t.Errorf("%v back until %v, want %v", p, end, want)
		}
	}
}

// TestAuditSkipsEndedKernelView (review h/revbigaudit): below
// auditMaxLeases the audit puts back nothing for a lease whose kernel view
// has ended: an absorbed renewal whose flush has not been written (a
// failing store) past its synced expiry. The kernel ended its element
// then, and what the store holds has ended too; auditLarge skips such a
// lease (less than a millisecond left). Before (6296711), the dump's audit
// installed it for a millisecond ('installed for 1ms'), and so did the
// repair's re-install once it took the kernel view ('installed for 1ms by
// the repair').
func TestAuditSkipsEndedKernelView(t *testing.T) {
	h := newHarness(t)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 80, 80, time.Hour, 3)), pcp.Success)
	h.clock.Advance(time.Minute)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 80, 80, time.Hour, 3)), pcp.Success) // absorbed
	h.clock.Advance(59*time.Minute + 30*time.Second)                               // synced 10:00 passed, table 10:01
	p := hole(6, addrA, 80, addrA, 80)
	if d, ok := h.fw.Holes()[p]; ok {
		t.Fatalf("%v still in the kernel for %v (test setup)", p, d)
	}
	h.s.mu.Lock()
	n := len(h.s.dirty)
	h.s.mu.Unlock()
	if n != 1 || len(h.s.Leases()) != 1 {
		t.Fatalf("%d dirty, %d leases: want the absorbed lease, live and dirty (test setup)", n, len(h.s.Leases()))
	}
	h.s.auditFirewall(context.Background())
	if d, ok := h.fw.Holes()[p]; ok {
		t.Errorf("%v installed for %v, after its kernel view ended", p, d)
	}
	// Nor the repair's re-install of every lease (table.installs).
	h.fw.Tamper()
	h.s.checkFirewall()
	if d, ok := h.fw.Holes()[p]; ok {
		t.Errorf("%v installed for %v by the repair, after its kernel view ended", p, d)
	}
}

// TestAuditAboveMaxManyConflicts (review h/revbigaudit): a step that meets
// more conflicts than auditConflictRetries (elements changed by hand under
// 6 of 20 leases' external keys, all in one step) applies what precedes
// the last conflict it was told of and goes on from that op's lease in the
// next step (a hold of s.mu of its own), so every other deleted pinhole is
// back. Before, the step failed whole at the 5th conflict: none of the 14
// others was back ('not back after the audit'), at every audit alike.
func TestAuditAboveMaxManyConflicts(t *testing.T) {
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
	refuseAsConflict(h, func(p pinhole.Pinhole) bool { return conflicts[p] })
	h.s.auditFirewall(context.Background())
	h.fw.FailApply = nil
	got := h.fw.Holes()
	for _, p := range holes {
		if _, ok := got[p]; ok != !conflicts[p] {
			if ok {
				t.Errorf("%v in the kernel: the fake refused it", p)
			} else {
				t.Errorf("%v not back after the audit", p)
			}
		}
	}
}

// TestAuditAboveMaxConflictsFirstLease: more conflicts than
// auditConflictRetries all in the step's first lease (a MAP with 6
// FILTERs whose elements were all changed by hand) do not stop the walk
// there: the step goes on past that lease, the others' deleted pinholes
// are back, and the audit ends.
func TestAuditAboveMaxConflictsFirstLease(t *testing.T) {
	defer func(n int) { auditMaxLeases = n }(auditMaxLeases)
	auditMaxLeases = 3
	h := newHarness(t)
	filtered := mapReq(addrA, pcp.ProtoTCP, 6999, 6999, time.Hour, 9)
	for i := range 6 {
		filtered.Options.Filters = append(filtered.Options.Filters, pcp.Filter{Remote: netip.PrefixFrom(remote.Addr(), 128), RemotePort: uint16(100 + i)})
	}
	h.expect(h.do(filtered), pcp.Success)
	holes := mapDeletedByHand(t, h, 10)
	refuseAsConflict(h, func(p pinhole.Pinhole) bool { return p.InternalPort == 6999 })
	done := make(chan struct{})
	go func() { defer close(done); h.s.auditFirewall(context.Background()) }()
	select {
	case <-done:
	case <-time.After(time.Minute): // a hang, not a latency bound
		t.Fatal("the audit did not end: the walk stays at the conflicting lease")
	}
	h.fw.FailApply = nil
	got := h.fw.Holes()
	for _, p := range holes {
		if _, ok := got[p]; !ok {
			t.Errorf("%v not back after the audit", p)
		}
	}
}
