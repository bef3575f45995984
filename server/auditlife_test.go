package server

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
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
	// applied, if set, is called after each Apply that succeeded (under
	// the caller's s.mu, as the kernel's commit is before its return).
	applied func(ops []pinhole.Op)
}

func (f *dumpThenList) Apply(ops []pinhole.Op) error {
	err := f.Firewall.Apply(ops)
	if err == nil {
		for _, op := range ops {
			if op.Kind == pinhole.Install {
				f.installs++
			}
		}
		if f.applied != nil {
			f.applied(ops)
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
	setup := func(t *testing.T) (*harness, *dumpThenList, []pinhole.Pinhole) { return deletedBeforeDump(t, n) }
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

// deletedBeforeDump is a harness with n live leases whose elements were
// deleted by hand (mapDeletedByHand), on a dumpThenList firewall.
func deletedBeforeDump(t *testing.T, n int) (*harness, *dumpThenList, []pinhole.Pinhole) {
	h := newHarness(t)
	holes := mapDeletedByHand(t, h, n)
	fw := &dumpThenList{Firewall: h.fw}
	useFirewall(h, fw)
	return h, fw, holes
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

// TestWatchLostAuditFoldsOwed (h/auditlife; issue 9): a watch pass for
// lost notifications whose check repairs the firewall, while an audit is
// owed after a repair (auditAfterRepair: the last one stopped by a
// missing set, that check's repair failed), runs one audit, one dump:
// the lost notifications' audit reads the kernel after the repair and
// the ask both. Before, the owed audit started first and the lost
// notifications' ask, finding it running, ran a second after it ('2
// dumps, want 1').
func TestWatchLostAuditFoldsOwed(t *testing.T) {
	h := newHarness(t)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 80, 80, time.Hour, 1)), pcp.Success)
	fw := &dumpThenList{Firewall: h.fw}
	useFirewall(h, fw)
	s, ctx := h.s, context.Background()
	a := &s.watch.audits
	a.done = make(chan bool, 1) // as watchFirewall
	// Owed as auditEnded leaves it when the check after a stopped audit
	// failed to repair.
	a.afterRepair, a.since = true, s.watch.reinstalls.Load()
	h.fw.Tamper() // the check of this pass repairs (re-installs every lease)
	s.watch.note(pinhole.WatchEvent{Lost: errors.New("test: ENOBUFS")})
	s.watched(ctx)
	if s.watch.reinstalls.Load() == a.since {
		t.Fatal("the pass's check did not repair (test setup)")
	}
	for a.running {
		s.auditEnded(ctx, <-a.done)
	}
	if fw.lists != 1 {
		t.Errorf("%d dumps, want 1: the owed audit and the lost notifications' one are one", fw.lists)
	}
	if a.afterRepair || a.again {
		t.Errorf("afterRepair %v, again %v after the audit: want neither owed", a.afterRepair, a.again)
	}
	if _, ok := h.fw.Holes()[hole(6, addrA, 80, addrA, 80)]; !ok {
		t.Error("the lease's pinhole missing after the repair and the audit")
	}
}
