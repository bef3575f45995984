package pinhole_test

import (
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestFlowedMissNamedKernel (root, namespace; h/left9, issue 9): on this
// kernel (Linux 6.18) the check pcpd runs once at start says the kernel
// names a missing flowed6 element (NLMSGERR_ATTR_OFFS), so FlowedAddrs'
// "absent" answers work; on one before 5.19 it would say not
// (TestFlowedVerdictOldKernel) and the server warns once
// (TestFlowedMissesUnnamedWarned). Before Setup (no flowed6) it errs.
func TestFlowedMissNamedKernel(t *testing.T) {
	ns := netlab.NewNS(t, "fdnamed")
	conn, err := ns.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	bare, err := pinhole.New(conn, pinhole.Config{Routes: nsRoutes(t, ns)})
	if err != nil {
		t.Fatal(err)
	}
	defer bare.Close()
	if _, err := bare.FlowedMissNamed(); err == nil {
		t.Fatal("FlowedMissNamed before Setup (no flowed6): no error")
	}
	b := newBackend(t, ns, pinhole.Config{})
	named, err := b.FlowedMissNamed()
	if err != nil || !named {
		t.Fatalf("FlowedMissNamed on this kernel: named %v, %v; want named", named, err)
	}
}
