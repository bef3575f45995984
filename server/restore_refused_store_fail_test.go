package server

import (
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
	"github.com/pcpd/pcpd/store"
)

// TestRestoreRefusedStoreDropFails: Start deletes a refused lease's
// pinhole (reconcile) before finish drops its key from the store; when
// that one Commit fails, finish only logs it. The key is in no store debt,
// so nothing writes it out later: the store keeps a lease the table does
// not hold, whose IPv4 external port the server hands out again once its
// quarantine ends. After the rules change back and pcpd restarts, both
// leases are restored on one external endpoint, and the kernel's NAPT
// element (keyed by the external endpoint) sends the other client's
// traffic to whichever was installed last.
func TestRestoreRefusedStoreDropFails(t *testing.T) {
	h := newHarness(t)
	ra := h.do(mapReq(v4A, pcp.ProtoTCP, 22, 0, 24*time.Hour, 1))
	h.expect(ra, pcp.Success)
	ext := ra.Map.ExternalPort
	var keyA store.Key
	for k, l := range h.st.Leases() {
		if l.InternalAddr == v4A {
			keyA = k
		}
	}

	h.pcfg.DenyPorts = []policy.PortRange{{First: 22, Last: 22}}
	h.st.FailCommit = func(_ []store.Lease, del []store.Key) error {
		if len(del) > 0 {
			return servertest.ErrInjected
		}
		return nil
	}
	h.start()
	h.st.FailCommit = nil
	for p := range h.fw.Holes() {
		t.Fatalf("refused lease's pinhole still in the kernel: %v", p)
	}

	// Later: the store works again, housekeeping and requests write.
	h.clock.Advance(3 * time.Hour) // past the TCP quarantine (124 min)
	h.s.payStoreDebt()
	rb := h.do(mapReq(v4B, pcp.ProtoTCP, 8080, ext, time.Hour, 2))
	h.expect(rb, pcp.Success)
	h.s.payStoreDebt()
	if _, ok := h.st.Leases()[keyA]; ok {
		t.Errorf("store still holds the refused lease %v after later commits (client B now holds external port %d: %v)",
			keyA, ext, rb.Map.ExternalPort == ext)
	}

	// The operator lifts the deny and restarts.
	h.pcfg.DenyPorts = nil
	h.start()
	var on []string
	for p := range h.fw.Holes() {
		if p.ExternalAddr == ext4 && p.ExternalPort == ext {
			on = append(on, p.InternalAddr.String())
		}
	}
	if len(on) > 1 {
		t.Errorf("after the rules change back, %d pinholes hold external %v:%d (internal %v): the revoked lease came back on a port now another client's",
			len(on), ext4, ext, on)
	}
}
