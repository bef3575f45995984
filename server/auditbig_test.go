package server

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// kernelView is, for each pinhole a live lease holds at now, when the
// kernel should end it: the latest expiry among the live leases holding
// it, a dirty lease's synced one (absorb.go). Computed apart from the
// audit's code, from Leases() and the dirty map.
func (h *harness) kernelView(now time.Time) map[pinhole.Pinhole]time.Time {
	h.s.mu.Lock()
	dirty := make(map[store.Key]time.Time, len(h.s.dirty))
	for k, at := range h.s.dirty {
		dirty[k] = at
	}
	h.s.mu.Unlock()
	out := map[pinhole.Pinhole]time.Time{}
	for _, l := range h.s.Leases() {
		at := l.Expires
		if s, ok := dirty[l.Key]; ok && s.Before(at) {
			at = s
		}
		if !at.After(now) {
			continue
		}
		for _, p := range pinholesOf(&l) {
			if at.After(out[p]) {
				out[p] = at
			}
		}
	}
	return out
}

// auditFixture starts a harness with 700 bench leases and a client's
// PEER and filtered MAP sharing an element (the PEER made first, with the
// later expiry), an absorbed renewal, an IPv4 NAPT mapping and a 5 min
// lease past its expiry (not swept); then deletes by hand, unheard, the
// shared, absorbed and NAPT elements and three bench leases' (deleted),
// and adds an orphan no lease explains. want is the kernel view at now.
func auditFixture(t *testing.T) (h *harness, now time.Time, deleted []pinhole.Pinhole, want map[pinhole.Pinhole]time.Time, orphan pinhole.Pinhole) {
	t.Helper()
	h = newHarness(t)
	h.own = staticOwners(t, true)
	const bench = 700 // > 2 × MaxBatch: three steps at least
	if err := h.st.Commit(startLeases(bench, h.clock.Now()), nil); err != nil {
		t.Fatal(err)
	}
	h.start()
	if n := len(h.s.Leases()); n != bench {
		t.Fatalf("%d leases restored, want %d", n, bench)
	}
	filtered := mapReq(addrA, pcp.ProtoTCP, 443, 443, time.Hour, 2)
	filtered.Options.Filters = append(filtered.Options.Filters, pcp.Filter{Remote: netip.PrefixFrom(remote.Addr(), 128), RemotePort: remote.Port()})
	h.expect(h.do(peerReq(addrA, pcp.ProtoTCP, 443, remote, 2*time.Hour, 1)), pcp.Success)
	h.expect(h.do(filtered), pcp.Success)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 80, 80, time.Hour, 3)), pcp.Success)
	h.expect(h.do(mapReq(addrA, pcp.ProtoUDP, 53, 53, 5*time.Minute, 4)), pcp.Success)
	if r := h.do(mapReq(v4A, pcp.ProtoTCP, 8080, 18080, 50*time.Minute, 5)); r.Result != pcp.Success || r.Map.ExternalPort != 18080 {
		t.Fatalf("IPv4 MAP: %+v", r)
	}
	h.clock.Advance(time.Minute)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 80, 80, time.Hour, 3)), pcp.Success) // absorbed
	h.s.mu.Lock()
	_, dirty := h.s.dirty[store.Key{Owner: ownerA, Protocol: 6, InternalAddr: addrA, InternalPort: 80}]
	h.s.mu.Unlock()
	if !dirty {
		t.Fatal("the renewal of port 80 was not absorbed")
	}
	// The 5 min lease past its expiry; no request runs the engine's
	// expiry before the audit.
	h.clock.Advance(5 * time.Minute)
	now = h.clock.Now()

	shared := pinhole.Pinhole{Protocol: 6, InternalAddr: addrA, InternalPort: 443, ExternalAddr: addrA, ExternalPort: 443,
		RemotePrefix: netip.PrefixFrom(remote.Addr(), 128), RemotePort: remote.Port()}
	absorbed := hole(6, addrA, 80, addrA, 80)
	ended := hole(17, addrA, 53, addrA, 53)
	napt := hole(6, v4A, 8080, ext4, 18080)
	ls := startLeases(bench, time.Time{})
	deleted = []pinhole.Pinhole{shared, absorbed, napt}
	for _, i := range []int{0, 311, bench - 1} {
		deleted = append(deleted, hole(6, ls[i].InternalAddr, 443, ls[i].InternalAddr, 443))
	}
	want = h.kernelView(now)
	for _, p := range deleted {
		if _, ok := want[p]; !ok {
			t.Fatalf("%v: no live lease holds it (test setup)", p)
		}
	}
	if _, ok := want[ended]; ok {
		t.Fatal("the 5 min lease is still live (test setup)")
	}
	// Checks of the kernel view itself, apart from the leases' listing.
	if at := want[shared]; !at.Equal(now.Add(2*time.Hour - 6*time.Minute)) {
		t.Fatalf("shared element's view %v, want the PEER's expiry", at)
	}
	if at := want[absorbed]; !at.Equal(now.Add(time.Hour - 6*time.Minute)) {
		t.Fatalf("absorbed lease's view %v, want its synced expiry (the first grant)", at)
	}

	// Deleted by hand, unheard; an orphan added by hand.
	var dels []pinhole.Op
	for _, p := range deleted {
		dels = append(dels, pinhole.Op{Kind: pinhole.Delete, Pinhole: p})
	}
	orphan = hole(6, netip.MustParseAddr("2001:db8:2::dead"), 443, netip.MustParseAddr("2001:db8:2::dead"), 443)
	if err := h.fw.Apply(append(dels, pinhole.Op{Kind: pinhole.Install, Pinhole: orphan, Timeout: 10 * time.Minute})); err != nil {
		t.Fatal(err)
	}
	return h, now, deleted, want, orphan
}

// TestAuditAboveMaxInstalls (h/bigaudit): above auditMaxLeases (lowered
// here to 3; 200 000 in pcpd) the audit, which main skipped, installs
// every live lease's pinholes again, in steps of at most pinhole.MaxBatch
// ops: the elements of live leases deleted unheard (watch off) are back,
// each with exactly what the kernel should hold (the fake firewall's clock
// is the engine's): a PEER and a filtered MAP sharing an element keep the
// later expiry (the PEER made first, so a per-lease timeout would leave
// the shorter MAP's), an absorbed renewal its synced expiry (not the
// table's later one), an IPv4 NAPT mapping its own. Nothing is installed
// for a lease past its expiry and not yet swept, and no op asks for more
// than the kernel view of its pinhole. The orphan added by hand stays
// (no dump: it ends with its timeout). On main: 'not back' for each
// deleted element (the audit logged "skipped" and did nothing).
func TestAuditAboveMaxInstalls(t *testing.T) {
	defer func(n int) { auditMaxLeases = n }(auditMaxLeases)
	auditMaxLeases = 3
	h, now, deleted, want, orphan := auditFixture(t)
	var batches [][]pinhole.Op
	h.fw.FailApply = func(ops []pinhole.Op) error {
		batches = append(batches, slices.Clone(ops))
		return nil
	}
	h.s.auditFirewall(context.Background())
	h.fw.FailApply = nil

	holes := checkBack(t, h, now, deleted, want, "deleted by hand above auditMaxLeases")
	if _, ok := holes[orphan]; !ok {
		t.Errorf("orphan removed: the audit above auditMaxLeases has no dump to find it")
	}
	installed := map[pinhole.Pinhole]bool{}
	for i, b := range batches {
		if len(b) > pinhole.MaxBatch {
			t.Errorf("transaction %d: %d ops, want ≤ %d", i, len(b), pinhole.MaxBatch)
		}
		for _, op := range b {
			at, ok := want[op.Pinhole]
			switch {
			case op.Kind != pinhole.Install:
				t.Errorf("op %v %v: want installs only", op.Kind, op.Pinhole)
			case !ok:
				t.Errorf("installed %v, which no live lease holds", op.Pinhole)
			case now.Add(op.Timeout).After(at):
				t.Errorf("installed %v for %v, beyond %v", op.Pinhole, op.Timeout, at)
			}
			installed[op.Pinhole] = true
		}
	}
	if len(installed) != len(want) {
		t.Errorf("installed %d pinholes, want every live lease's %d", len(installed), len(want))
	}
	if len(batches) < 3 {
		t.Errorf("%d transactions for %d pinholes, want steps of ≤ %d", len(batches), len(want), pinhole.MaxBatch)
	}
}

// TestAuditLateBy: a step's ops are shortened by the time spent building
// them, rounded up to the millisecond; those left under a millisecond go.
func TestAuditLateBy(t *testing.T) {
	ops := []pinhole.Op{{Timeout: time.Hour}, {Timeout: 3 * time.Millisecond}, {Timeout: 4 * time.Millisecond}}
	got, _ := lateBy(slices.Clone(ops), nil, 2300*time.Microsecond)
	want := []time.Duration{time.Hour - 3*time.Millisecond, time.Millisecond}
	if len(got) != len(want) || got[0].Timeout != want[0] || got[1].Timeout != want[1] {
		t.Fatalf("lateBy 2.3 ms: %v, want timeouts %v", got, want)
	}
	if got, _ := lateBy(slices.Clone(ops), nil, 0); !slices.Equal(got, ops) {
		t.Fatalf("lateBy 0: %v", got)
	}
}

// TestAuditAboveMaxConflictAndMissing: above auditMaxLeases (lowered to
// 3), a pinhole the kernel refuses as a conflict (another mapping under
// its external key, changed by hand) is dropped from its step and the
// rest of the step is applied: every other deleted pinhole is back. A
// missing set (the table deleted) ends the audit with a firewall check,
// whose repair puts every lease's pinholes back.
func TestAuditAboveMaxConflictAndMissing(t *testing.T) {
	defer func(n int) { auditMaxLeases = n }(auditMaxLeases)
	auditMaxLeases = 3
	h := newHarness(t)
	holes := mapDeletedByHand(t, h, 5)
	conflict := holes[2]
	refuseAsConflict(h, func(p pinhole.Pinhole) bool { return p == conflict })
	h.s.auditFirewall(context.Background())
	h.fw.FailApply = nil
	got := h.fw.Holes()
	for _, p := range holes {
		if _, ok := got[p]; ok != (p != conflict) {
			t.Errorf("%v in the kernel: %v, want %v", p, ok, p != conflict)
		}
	}
	if n := h.logs.FilterMessageSnippet("another mapping under a lease's external key").Len(); n != 1 {
		t.Errorf("%d conflict warnings, want 1", n)
	}

	h.fw.Tamper()
	h.s.auditFirewall(context.Background())
	got = h.fw.Holes()
	for _, p := range holes {
		if _, ok := got[p]; !ok {
			t.Errorf("%v not back after the audit found the set missing", p)
		}
	}
	if h.logs.FilterMessageSnippet("a pinhole set is missing").Len() != 1 {
		t.Error("no warning of the missing set")
	}
}

// TestAuditAboveMaxBesideChurn: audits above auditMaxLeases (lowered to
// 3; 3 000 leases, 12 steps each) run while MAPs are made, renewed
// (absorbed) and deleted: afterwards the kernel holds exactly the live
// leases' pinholes, none longer than the kernel view (a deleted lease's
// pinhole is never put back by a step that read the table before the
// delete: a step reads and applies in one hold of s.mu).
func TestAuditAboveMaxBesideChurn(t *testing.T) {
	defer func(n int) { auditMaxLeases = n }(auditMaxLeases)
	auditMaxLeases = 3
	h := newHarness(t)
	own, err := policy.NewStatic(map[string][]netip.Prefix{
		"a":     {netip.MustParsePrefix("2001:db8:a::/48"), netip.MustParsePrefix("10.0.0.0/28")},
		"bench": {netip.MustParsePrefix("2001:db8:2::/48")},
	})
	if err != nil {
		t.Fatal(err)
	}
	h.own = own
	h.cfg.RateLimit, h.cfg.RateBurst = 1e12, 1<<30 // one source's churn
	if err := h.st.Commit(startLeases(3000, h.clock.Now()), nil); err != nil {
		t.Fatal(err)
	}
	h.start()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for range 3 {
			h.s.auditFirewall(context.Background())
		}
	}()
	n := 0
	for i := 0; ; i++ {
		n++
		port := uint16(8000 + i%50)
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, port, port, time.Hour, 1)), pcp.Success)
		if i%3 != 0 {
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, port, port, 0, 1)), pcp.Success)
		}
		select {
		case <-done:
		default:
			continue
		}
		break
	}
	t.Logf("%d MAPs during the audits", n)
	want := h.kernelView(h.clock.Now())
	got := h.fw.Holes()
	for p, d := range got {
		at, ok := want[p]
		if !ok {
			t.Errorf("kernel holds %v, which no live lease holds", p)
		} else if h.clock.Now().Add(d).After(at) {
			t.Errorf("kernel holds %v for %v, beyond %v", p, d, at)
		}
	}
	for p := range want {
		if _, ok := got[p]; !ok {
			t.Errorf("live lease's %v missing from the kernel", p)
		}
	}
}

// TestAuditRestoresKernelView: below auditMaxLeases (the dump path) the
// audit puts each missing pinhole back once, with what the kernel should
// hold: the latest expiry among the live leases holding it, a dirty
// lease's synced one; and removes the orphan. Before, it installed a
// missing pinhole once per lease holding it, each with that lease's table
// expiry: the element a PEER and a filtered MAP share kept whichever came
// last (the MAP's, 1 h before the PEER it also serves, which then lived
// on without its pinhole), and the absorbed lease's element was given the
// table's later expiry, beyond what the store holds (absorb.go).
func TestAuditRestoresKernelView(t *testing.T) {
	h, now, deleted, want, orphan := auditFixture(t)
	h.s.auditFirewall(context.Background())
	holes := checkBack(t, h, now, deleted, want, "deleted by hand")
	if _, ok := holes[orphan]; ok {
		t.Errorf("orphan %v: still installed after the audit", orphan)
	}
}

// checkBack checks that each of deleted is in the fake firewall, ending
// exactly when want says (the kernel view at now), and returns its holes.
func checkBack(t *testing.T, h *harness, now time.Time, deleted []pinhole.Pinhole, want map[pinhole.Pinhole]time.Time, how string) map[pinhole.Pinhole]time.Duration {
	t.Helper()
	holes := h.fw.Holes()
	for _, p := range deleted {
		d, ok := holes[p]
		if !ok {
			t.Errorf("%v %s: not back after the audit", p, how)
			continue
		}
		if at := now.Add(d); !at.Equal(want[p]) {
			t.Errorf("%v back until %v, want %v (what the kernel should hold)", p, at, want[p])
		}
	}
	return holes
}

// checkBackNotLate checks that every one of holes but the conflicts is in
// the fake firewall again and ends no later than the kernel view of its
// lease now says.
func checkBackNotLate(t *testing.T, h *harness, holes []pinhole.Pinhole, conflicts map[pinhole.Pinhole]bool) {
	t.Helper()
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
			t.Errorf("%v not back", p)
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

// mapDeletedByHand maps n TCP ports of addrA from 7000 on for an hour and
// deletes their elements from the fake firewall, unheard (the watch off):
// the pinholes an audit should put back.
func mapDeletedByHand(t *testing.T, h *harness, n int) []pinhole.Pinhole {
	t.Helper()
	var holes []pinhole.Pinhole
	var dels []pinhole.Op
	for port := uint16(7000); port < uint16(7000+n); port++ {
		h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, port, port, time.Hour, 1)), pcp.Success)
		p := hole(6, addrA, port, addrA, port)
		holes = append(holes, p)
		dels = append(dels, pinhole.Op{Kind: pinhole.Delete, Pinhole: p})
	}
	if err := h.fw.Apply(dels); err != nil {
		t.Fatal(err)
	}
	return holes
}

// refuseAsConflict makes the fake firewall refuse a transaction at its
// first op whose pinhole refused says is in conflict (another mapping
// under its external key in the kernel), as the kernel does.
func refuseAsConflict(h *harness, refused func(pinhole.Pinhole) bool) {
	h.fw.FailApply = func(ops []pinhole.Op) error {
		for i, op := range ops {
			if refused(op.Pinhole) {
				return &pinhole.OpError{Index: i, Op: op, Err: fmt.Errorf("test: %w", pinhole.ErrConflict)}
			}
		}
		return nil
	}
}

// refuseConflictsCosting refuses, as a conflict, every try that installs
// one of conflicts, each refused try costing blame on the test clock.
func refuseConflictsCosting(h *harness, conflicts map[pinhole.Pinhole]bool, blame time.Duration) {
	refuseAsConflict(h, func(p pinhole.Pinhole) bool {
		if conflicts[p] {
			h.clock.Advance(blame) // the refused try's cost
			return true
		}
		return false
	})
}
