package server

import (
	"context"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
)

// TestRestoreRefusedFlushAfterDelete: Start flushes a refused lease's
// connections (restoring.revoked) whether or not the kernel took its
// pinhole away. When the deletion failed, the flush runs while the
// pinhole is still open: a flow that comes back through it (a
// retransmission: conntrack picks TCP up mid-stream) is established again,
// and the firewall audit that later removes the orphan pinhole flushes
// nothing, so that flow lives on past the revocation (the guard accepts
// established flows). Every flush of the endpoint must come after its
// pinhole left the kernel.
func TestRestoreRefusedFlushAfterDelete(t *testing.T) {
	h := newHarness(t)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 22, 0, time.Hour, 1)), pcp.Success)
	want := hole(6, addrA, 22, addrA, 22)
	if _, ok := h.fw.Holes()[want]; !ok {
		t.Fatalf("no pinhole %v: %v", want, h.fw.Holes())
	}
	h.pcfg.DenyPorts = []policy.PortRange{{First: 22, Last: 22}}
	h.cfg.KeepConnections = false
	h.fw.FailApply = func(ops []pinhole.Op) error {
		for _, op := range ops {
			if op.Kind == pinhole.Delete {
				return servertest.ErrInjected
			}
		}
		return nil
	}

	// h.start, with the conntrack walk recorded.
	pol, err := policy.New(h.pcfg, h.own)
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(h.cfg, Deps{Firewall: h.fw, Store: h.st, State: h.st.State(), Policy: pol, Now: h.clock.Now}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var flushes []bool // per flush of addrA:22, whether the kernel still held the pinhole
	s.ct.walk = func(fs []ctFilter) {
		for _, f := range fs {
			if f.t.addr == addrA && f.t.port == 22 {
				_, open := h.fw.Holes()[want]
				mu.Lock()
				flushes = append(flushes, open)
				mu.Unlock()
			}
		}
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	h.s = s
	h.fw.FailApply = nil
	wait := func() {
		done := make(chan struct{})
		s.ct.after(s.ct.seq(), func() { close(done) })
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("conntrack flush did not finish")
		}
	}
	wait()
	s.auditFirewall(context.Background()) // Serve's, at start: removes the orphan
	wait()
	if _, ok := h.fw.Holes()[want]; ok {
		t.Fatalf("the audit left the refused pinhole %v", want)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(flushes) == 0 {
		t.Fatalf("the refused lease's connections were never flushed")
	}
	if flushes[len(flushes)-1] {
		t.Errorf("flushes of [%v]:22 with the pinhole still open: %v (true = open); none after the audit removed it: a flow that came back meanwhile stays", addrA, flushes)
	}
}
