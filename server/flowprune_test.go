package server

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/pinhole"
)

// pruneRecorder is a FlowRecorder that records what pruneFlowed asks;
// during (if set) runs inside ForgetFlowed, between its decision and the
// delete.
type pruneRecorder struct {
	forgot, back []netip.Addr
	during       func()
}

func (*pruneRecorder) RecordsFlows(pinhole.Pinhole) bool { return true }
func (*pruneRecorder) FlowedAddrs(...netip.Addr) (func(netip.Addr) bool, bool) {
	return func(netip.Addr) bool { return true }, true
}
func (r *pruneRecorder) ForgetFlowed(as []netip.Addr) bool {
	r.forgot = append(r.forgot, as...)
	if r.during != nil {
		r.during()
	}
	return true
}
func (r *pruneRecorder) Reflowed(as []netip.Addr) { r.back = append(r.back, as...) }

// TestPruneFlowedKeepsHeldAndNamed: pruneFlowed deletes only the
// addresses no lease in the table holds (internal or external), no filter
// queued names and none kept back (undeletedEnds) names; one a lease took
// between the decision and the delete is added back (Reflowed).
func TestPruneFlowedKeepsHeldAndNamed(t *testing.T) {
	a := func(s string) netip.Addr { return netip.MustParseAddr(s) }
	held, redirected, queued, kept, free, late := a("2001:db8::1"), a("2001:db8::2"), a("2001:db8::3"), a("2001:db8::4"), a("2001:db8::5"), a("2001:db8::6")
	rec := &pruneRecorder{}
	s := &Server{tab: newTable(), recorder: rec}
	s.tab.put(lease("o", held, 6, 80, held, 80, time.Hour))
	s.tab.put(lease("o", a("2001:db8::99"), 6, 80, redirected, 8080, time.Hour)) // external only
	s.ct.pending = []ctFilter{{t: ctTarget{addr: queued, proto: 6, port: 1}}}
	s.undeletedEnds = []ctFilter{{t: ctTarget{addr: kept, proto: 6, port: 1}}}
	rec.during = func() { s.tab.put(lease("o", late, 17, 53, late, 53, time.Hour)) }
	s.pruneFlowed([]netip.Addr{held, redirected, queued, kept, free, late})
	if want := []netip.Addr{free, late}; !slices.Equal(rec.forgot, want) {
		t.Errorf("forgot %v, want %v (no lease, no filter)", rec.forgot, want)
	}
	if want := []netip.Addr{late}; !slices.Equal(rec.back, want) {
		t.Errorf("added back %v, want %v (a lease made before the delete)", rec.back, want)
	}
}

// TestPruneFlowedQueueTooLong: past maxPruneScan queued filters nothing
// is pruned (the queue is not looked through under the flusher's lock).
func TestPruneFlowedQueueTooLong(t *testing.T) {
	rec := &pruneRecorder{}
	s := &Server{tab: newTable(), recorder: rec}
	s.ct.pending = make([]ctFilter, maxPruneScan+1)
	s.pruneFlowed([]netip.Addr{netip.MustParseAddr("2001:db8::5")})
	if len(rec.forgot) != 0 {
		t.Errorf("forgot %v with %d filters queued, want none", rec.forgot, len(s.ct.pending))
	}
}

// regainRecorder is a pruneRecorder with a FlowRegainer's trust.
type regainRecorder struct {
	pruneRecorder
	trusted bool
}

func (r *regainRecorder) RegainFlowed(bool) (bool, error) { return r.trusted, nil }
func (r *regainRecorder) FlowedTrusted() bool             { return r.trusted }

// TestReleaseUnflowedUntrustedWalks (h/flowedlife): a clean firewall
// check releases what skipUnflowed left out only while the record is
// trusted; untrusted at the check's end (a flush of flowed6 the watch
// told), what was left out over the erased record is queued for a walk.
// Before, the clean check dropped it: its flows' entries lived on.
func TestReleaseUnflowedUntrustedWalks(t *testing.T) {
	for _, trusted := range []bool{true, false} {
		s := &Server{tab: newTable(), recorder: &regainRecorder{trusted: trusted}}
		f := ctFilter{t: ctTarget{addr: netip.MustParseAddr("2001:db8::7"), proto: 6, port: 80}}
		s.unflowed.held = []heldFilter{{f: f, gen: 0}}
		s.ct.running = true // queued, not walked: no flusher goroutine in this test
		s.releaseUnflowed(1, false)
		walked := slices.ContainsFunc(s.ct.pending, func(g ctFilter) bool { return g.t == f.t })
		if walked == trusted {
			t.Errorf("record trusted %v: left-out filter queued for a walk %v, want %v", trusted, walked, !trusted)
		}
		if len(s.unflowed.held) != 0 {
			t.Errorf("record trusted %v: %d filters still held after the check", trusted, len(s.unflowed.held))
		}
	}
}

// regainingRecorder is a regainRecorder, untrusted until RegainFlowed.
type regainingRecorder struct{ regainRecorder }

func (r *regainingRecorder) RegainFlowed(bool) (bool, error) { r.trusted = true; return true, nil }

// TestRegainWalksUnflowed (review h/revlife): a filter left out during a
// check (its address erased from flowed6 by a flush the watch told only
// after the skip) is walked before that check's rebuild trusts the record
// again. Before, the rebuild trusted, and the next check's release found
// the record trusted and dropped the filter unwalked.
func TestRegainWalksUnflowed(t *testing.T) {
	s := &Server{tab: newTable(), recorder: &regainingRecorder{}, log: zap.NewNop()}
	f := ctFilter{t: ctTarget{addr: netip.MustParseAddr("2001:db8::7"), proto: 6, port: 80}}
	s.unflowed.held = []heldFilter{{f: f, gen: 1}} // left out during check 1
	s.ct.running = true                            // queued, not walked: no flusher goroutine in this test
	s.regainFlowed()                               // check 1's turn: the (fake) rebuild trusts
	s.releaseUnflowed(2, false)                    // check 2
	if !slices.ContainsFunc(s.ct.pending, func(g ctFilter) bool { return g.t == f.t }) {
		t.Error("a filter left out while the record was untrusted was dropped unwalked once a rebuild trusted it")
	}
}
