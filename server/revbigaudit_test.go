package server

import (
	"context"
	"fmt"
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
	var holes []pinhole.Pinhole
	for port := uint16(7000); port < 7008; port++ {
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, port, port, time.Hour, 1)), pcp.Success)
		holes = append(holes, hole(6, addrA, port, addrA, port))
	}
	h.clock.Advance(time.Minute)
	var dels []pinhole.Op
	for _, p := range holes {
		dels = append(dels, pinhole.Op{Kind: pinhole.Delete, Pinhole: p})
	}
	if err := h.fw.Apply(dels); err != nil {
		t.Fatal(err)
	}
	conflicts := map[pinhole.Pinhole]bool{holes[1]: true, holes[4]: true, holes[6]: true}
	const blame = 40 * time.Millisecond
	h.fw.FailApply = func(ops []pinhole.Op) error {
		for i, op := range ops {
			if conflicts[op.Pinhole] {
				h.clock.Advance(blame)
				return &pinhole.OpError{Index: i, Op: op, Err: fmt.Errorf("test: %w", pinhole.ErrConflict)}
			}
		}
		return nil
	}
	h.s.auditFirewall(context.Background())
	h.fw.FailApply = nil
	now := h.clock.Now()
	want := h.kernelView(now)
	got := h.fw.Holes()
	back := 0
	for _, p := range holes {
		if conflicts[p] {
			continue
		}
		d, ok := got[p]
		if !ok {
			t.Errorf("%v not back after the audit", p)
			continue
		}
		back++
		if end := now.Add(d); end.After(want[p]) {
			t.Errorf("%v ends %v after its lease (kernel view %v)", p, end.Sub(want[p]), want[p])
		}
	}
	if back != len(holes)-len(conflicts) {
		t.Errorf("%d pinholes back, want %d", back, len(holes)-len(conflicts))
	}
}
