package server

import (
	"context"
	"errors"
	"testing"

	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/server/servertest"
)

// dumpThenList is the fake firewall whose List reads its elements first
// (the dump) and then runs after (what happens while the audit's dump
// runs and its comparison has not begun: the watch's passes); lists counts
// the dumps.
type dumpThenList struct {
	*servertest.Firewall
	after    func()
	lists    int
	installs int // Install ops applied
}

func (f *dumpThenList) Apply(ops []pinhole.Op) error {
	err := f.Firewall.Apply(ops)
	if err == nil {
		for _, op := range ops {
			if op.Kind == pinhole.Install {
				f.installs++
			}
		}
	}
	return err
}

func (f *dumpThenList) List() ([]pinhole.Entry, error) {
	f.lists++
	es, err := f.Firewall.List()
	if f.after != nil {
		f.after()
	}
	return es, err
}

// useFirewall swaps the server's firewall for fw (a wrapper of h.fw).
func useFirewall(h *harness, fw Firewall) {
	h.s.mu.Lock()
	h.s.fw = fw
	h.s.mu.Unlock()
}

// TestAuditLeavesWatchPutBacks (h/auditlife; issue 9): live leases'
// elements a tool deleted one by one (no flush: no repair) while the
// audit dumped, which the dump did not show and the watch put back
// (restoreDeleted) before the audit compared, are not installed a second
// time by the audit under s.mu; one told deleted again after its put-back
// is, as are all of them when notifications were lost, and one whose
// put-back the kernel refused. Before, the audit re-installed every one
// ('the audit installed 40 pinholes the watch had put back during its
// dump, want 0').
func TestAuditLeavesWatchPutBacks(t *testing.T) {
	const n = 40
	setup := func(t *testing.T) (*harness, *dumpThenList, []pinhole.Pinhole) {
		h := newHarness(t)
		holes := mapDeletedByHand(t, h, n)
		fw := &dumpThenList{Firewall: h.fw}
		useFirewall(h, fw)
		return h, fw, holes
	}
	allBack := func(t *testing.T, h *harness, holes []pinhole.Pinhole) {
		t.Helper()
		got := h.fw.Holes()
		for _, p := range holes {
			if _, ok := got[p]; !ok {
				t.Errorf("%v: a live lease's element missing after the audit", p)
			}
		}
	}
	t.Run("put back", func(t *testing.T) {
		h, fw, holes := setup(t)
		var watchOps int
		fw.after = func() {
			ops := fw.installs
			h.s.restoreDeleted(holes, nil)
			watchOps = fw.installs - ops
		}
		ops := fw.installs
		h.s.auditFirewall(context.Background())
		if watchOps != n {
			t.Fatalf("the watch put back %d, want %d (test setup)", watchOps, n)
		}
		if extra := fw.installs - ops - watchOps; extra != 0 {
			t.Errorf("the audit installed %d pinholes the watch had put back during its dump, want 0", extra)
		}
		allBack(t, h, holes)
		// A later audit, no watch: what it finds missing goes back.
		fw.after = nil
		mapDeletedByHandAgain(t, h, holes[:3])
		ops = fw.installs
		h.s.auditFirewall(context.Background())
		if got := fw.installs - ops; got != 3 {
			t.Errorf("a later audit installed %d, want 3 (nothing recorded outlives an audit)", got)
		}
		allBack(t, h, holes)
	})
	t.Run("deleted again after the put-back", func(t *testing.T) {
		h, fw, holes := setup(t)
		again := holes[:2]
		fw.after = func() {
			h.s.restoreDeleted(holes, nil)
			mapDeletedByHandAgain(t, h, again)
			h.s.watch.note(pinhole.WatchEvent{Deleted: again}) // told; the watch's pass comes later
		}
		ops := fw.installs
		h.s.auditFirewall(context.Background())
		if got := fw.installs - ops; got != n+len(again) {
			t.Errorf("%d installs, want %d: the watch's %d and the audit's %d told deleted again", got, n+len(again), n, len(again))
		}
		allBack(t, h, holes)
	})
	t.Run("lost", func(t *testing.T) {
		h, fw, holes := setup(t)
		fw.after = func() {
			h.s.restoreDeleted(holes, nil)
			h.s.watch.note(pinhole.WatchEvent{Lost: errors.New("test: ENOBUFS")})
		}
		ops := fw.installs
		h.s.auditFirewall(context.Background())
		if got := fw.installs - ops; got != 2*n {
			t.Errorf("%d installs, want %d: after lost notifications the audit installs every one its dump lacked", got, 2*n)
		}
		allBack(t, h, holes)
	})
	t.Run("refused", func(t *testing.T) {
		h, fw, holes := setup(t)
		refused := holes[5]
		fw.after = func() {
			h.fw.FailApply = func(ops []pinhole.Op) error {
				for i, op := range ops {
					if op.Pinhole == refused {
						return &pinhole.OpError{Index: i, Op: op, Err: pinhole.ErrConflict}
					}
				}
				return nil
			}
			h.s.restoreDeleted(holes, nil)
			h.fw.FailApply = nil
		}
		ops := fw.installs
		h.s.auditFirewall(context.Background())
		if got := fw.installs - ops; got != n {
			t.Errorf("%d installs, want %d: the watch's %d and the audit's one the kernel refused the watch", got, n, n-1)
		}
		allBack(t, h, holes)
	})
}

// mapDeletedByHandAgain deletes holes from the fake firewall (by hand).
func mapDeletedByHandAgain(t *testing.T, h *harness, holes []pinhole.Pinhole) {
	t.Helper()
	var dels []pinhole.Op
	for _, p := range holes {
		dels = append(dels, pinhole.Op{Kind: pinhole.Delete, Pinhole: p})
	}
	if err := h.fw.Apply(dels); err != nil {
		t.Fatal(err)
	}
}
