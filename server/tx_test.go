package server

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/server/servertest"
	"github.com/pcpd/pcpd/store"
)

// TestCommitOverlaps: a batch's kernel transaction and store commit run at
// the same time (a batch costs the slower of the two, not their sum). The
// kernel waits for the store commit to begin; run one after the other,
// the kernel would give up and the request fail.
func TestCommitOverlaps(t *testing.T) {
	h := newHarness(t)
	storeIn := make(chan struct{})
	var once sync.Once
	h.st.FailCommit = func([]store.Lease, []store.Key) error {
		once.Do(func() { close(storeIn) })
		return nil
	}
	h.fw.FailApply = func([]pinhole.Op) error {
		select {
		case <-storeIn:
			return nil
		case <-time.After(5 * time.Second):
			return errors.New("the store commit did not start while the kernel transaction ran")
		}
	}
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.Success)
	if _, ok := h.lease(ownerA, 6, addrA, 443); !ok {
		t.Fatal("no stored lease after SUCCESS")
	}
	if _, ok := h.fw.Holes()[hole(6, addrA, 443, addrA, 443)]; !ok {
		t.Fatal("no pinhole after SUCCESS")
	}
}

// TestCommitUndo: when one side of the commit fails, the other side's
// change is undone, for a new mapping, a renewal (the store gets the
// previous lease back, not a deletion) and a delete, and the request is
// answered NO_RESOURCES with nothing changed (HDR-06).
func TestCommitUndo(t *testing.T) {
	for _, side := range []string{"kernel", "store"} {
		t.Run(side, func(t *testing.T) {
			h := newHarness(t)
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1)), pcp.Success)
			h.clock.Advance(10 * time.Minute)
			before := h.snap()
			fail := func(on bool) {
				f := func([]pinhole.Op) error { return servertest.ErrInjected }
				g := func([]store.Lease, []store.Key) error { return servertest.ErrInjected }
				switch {
				case !on:
					h.fw.FailApply, h.st.FailCommit = nil, nil
				case side == "kernel":
					h.fw.FailApply = f
				default:
					h.st.FailCommit = g
				}
			}
			fail(true)
			for _, r := range []*pcp.Request{
				mapReq(addrA, pcp.ProtoTCP, 22, 0, time.Hour, 1),    // new
				mapReq(addrA, pcp.ProtoTCP, 443, 0, 2*time.Hour, 1), // renewal
				mapReq(addrA, pcp.ProtoTCP, 443, 0, 0, 1),           // delete
			} {
				h.expect(h.do(r), pcp.NoResources)
				h.unchanged(before)
			}
			fail(false)
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, 2*time.Hour, 1)), pcp.Success)
			l, ok := h.lease(ownerA, 6, addrA, 443)
			if !ok || !l.Expires.Equal(h.clock.Now().Add(2*time.Hour)) {
				t.Fatalf("renewal after the failures: %+v %v", l, ok)
			}
		})
	}
}
