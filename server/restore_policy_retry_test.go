package server

import (
	"context"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestRestartRevokeRetriedAfterFailure: Start revokes the restored leases
// the new rules refuse (restore_policy.go) in one transaction; if that
// one fails (a transient kernel error, an ENOBUFS on a large restore), the
// leases stay, and nothing tries again: the port the operator has just
// denied stays open in the kernel until the lease expires (24 h by
// default, up to 365 days), though each renewal is refused. The ownership
// sweep's revocation, in the same situation, is retried at the next sweep.
// Here the kernel refuses deletes during Start only; afterwards the
// firewall audit Serve runs at start (watchFirewall) and the periodic
// paths (ownership sweep and steps, store debt, firewall check, expiry)
// run, and the pinhole must be gone well before the lease's end. Fixed:
// a refused lease never enters the table (restore_policy.go), so its
// pinhole, if the deletion failed, is one no lease explains, and the
// audit removes it.
func TestRestartRevokeRetriedAfterFailure(t *testing.T) {
	h := newHarness(t)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 22, 0, time.Hour, 1)), pcp.Success)
	h.pcfg.DenyPorts = []policy.PortRange{{First: 22, Last: 22}}
	h.fw.FailApply = failDeletes
	h.start()
	h.fw.FailApply = nil
	if len(h.fw.Holes()) != 1 {
		t.Fatalf("the injected failure did not keep the pinhole: pinholes %v", h.fw.Holes())
	}
	h.s.auditFirewall(context.Background()) // Serve's, at start
	h.runPeriodic(3, 4)
	if r := h.do(mapReq(addrA, pcp.ProtoTCP, 22, 0, time.Hour, 1)); r.Result == pcp.Success {
		t.Fatalf("renewal of port 22 granted under --deny-ports 22")
	}
	if hs := h.fw.Holes(); len(hs) != 0 {
		t.Fatalf("3 minutes after a failed revocation at start, port 22 (denied) is still open: %v; the lease has %v left", hs, time.Hour-3*time.Minute)
	}
}
