package server

import (
	"context"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestRestoreRefusedRetryAboveAuditMax: a refused lease's pinhole whose
// deletion fails at start is left to the first firewall audit
// (TestRestartRevokeRetriedAfterFailure), but above auditMaxLeases the
// audit dumps nothing and finds no orphan (it only installs the live
// leases' pinholes again, auditbig.go): without the retry of undeleted
// pinholes (retryUndeleted, which every audit runs first) the port the
// operator has just denied would stay open until the kernel timed the
// element out (the lease's remaining lifetime, 24 h by default), though
// every renewal is refused. Here 200 001 owned leases are restored with it, the kernel
// refuses deletes during Start only, and Serve's start-up audit and 3
// minutes of the periodic paths run.
func TestRestoreRefusedRetryAboveAuditMax(t *testing.T) {
	if testing.Short() {
		t.Skip("200 001 leases")
	}
	h := newHarness(t)
	h.own = staticOwners(t, true)
	h.start()
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 22, 0, time.Hour, 1)), pcp.Success)
	if err := h.st.Commit(startLeases(auditMaxLeases+1, h.clock.Now()), nil); err != nil {
		t.Fatal(err)
	}
	denied := hole(6, addrA, 22, addrA, 22)
	h.pcfg.DenyPorts = []policy.PortRange{{First: 22, Last: 22}}
	h.fw.FailApply = failDeletes
	h.start()
	h.fw.FailApply = nil
	if _, open := h.fw.Holes()[denied]; !open {
		t.Fatalf("the injected failure did not keep the pinhole %v", denied)
	}
	if n := len(h.s.Leases()); n != auditMaxLeases+1 {
		t.Fatalf("%d leases restored, want %d", n, auditMaxLeases+1)
	}
	h.s.auditFirewall(context.Background()) // Serve's, at start
	h.runPeriodic(3, 1)
	if left, open := h.fw.Holes()[denied]; open {
		t.Errorf("3 minutes after a failed revocation at start with %d leases (no dump above %d), port 22 (denied) is still open, %v left",
			auditMaxLeases+1, auditMaxLeases, left)
	}
}
