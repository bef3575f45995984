package server

import (
	"context"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
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
	h.fw.FailApply = failDeletes

	// h.start, with the conntrack walk recorded: per flush of addrA:22,
	// whether the kernel still held the pinhole.
	s, wait, recorded := h.startRecordingFlushes(t, addrA, 22, want)
	h.fw.FailApply = nil
	wait()
	s.auditFirewall(context.Background()) // Serve's, at start: removes the orphan
	wait()
	if _, ok := h.fw.Holes()[want]; ok {
		t.Fatalf("the audit left the refused pinhole %v", want)
	}
	flushes := recorded()
	if len(flushes) == 0 {
		t.Fatalf("the refused lease's connections were never flushed")
	}
	if flushes[len(flushes)-1] {
		t.Errorf("flushes of [%v]:22 with the pinhole still open: %v (true = open); none after the audit removed it: a flow that came back meanwhile stays", addrA, flushes)
	}
}
