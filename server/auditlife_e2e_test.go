package server

import (
	"net/netip"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestE2EFlowedPruneAfterRelease (root, namespaces; h/auditlife, review
// h/revrem): the flowed6 prune after a walk (pruneFlowed: two holds of
// s.mu and a transaction) runs once the flusher has released the replies
// waiting for that walk, not before: a waiter registered while the walk
// is held back (ctFlusher.after, as HandleBatch's for an IPv4 NAPT
// delete) is called before the prune's transaction (pruneFlowedHook).
// Before, walkLive pruned inside the walk ('the flowed6 prune of [...]
// ran before the walk's waiting replies were released').
func TestE2EFlowedPruneAfterRelease(t *testing.T) {
	l := newLab(t, func(_ *Config, p *policy.Config) { p.MinLifetime = time.Second })
	if _, ok := l.fw.FlowedAddrs(); !ok {
		t.Fatal("the record not trusted: nothing to test")
	}
	a := l.topo.ClientV6
	l.inbound(t, "map6", 9772, time.Hour)
	if !l.inFlowed(t, a.String()) {
		t.Fatal("the client's address not in flowed6 after a flow to it: nothing to test")
	}
	l.flushed(t)
	gate := make(chan struct{})
	walk := l.srv.ct.walk
	l.srv.ct.walk = func(fs []ctFilter) ([]ctFilter, error) {
		<-gate
		return walk(fs)
	}
	var released atomic.Bool
	pruned := make(chan bool, 1)
	pruneFlowedHook = func(as []netip.Addr) {
		if slices.Contains(as, a) {
			select {
			case pruned <- released.Load():
			default:
			}
		}
	}
	t.Cleanup(func() { pruneFlowedHook = nil })
	if r := l.pcp(mapReq(a, pcp.ProtoTCP, 9772, 9772, 0, 1)); r.Result != pcp.Success {
		t.Fatalf("delete 9772: %+v", r)
	}
	// The delete's filters are queued (under s.mu, before its reply); the
	// walk over them waits at the gate: this waiter is its.
	done := make(chan struct{})
	l.srv.ct.after(l.srv.ct.seq(), func() { released.Store(true); close(done) })
	close(gate)
	<-done
	if wasReleased := <-pruned; !wasReleased {
		t.Errorf("the flowed6 prune of %v ran before the walk's waiting replies were released", a)
	}
	l.flushed(t)
	if l.inFlowed(t, a.String()) {
		t.Error("the client's address still in flowed6 after its mapping ended and its walk")
	}
}
