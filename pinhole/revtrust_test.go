package pinhole_test

import (
	"net/netip"
	"testing"

	"github.com/pcpd/pcpd/pinhole"
)

// TestFlowedWitnessAtStopAfterDamage (root, namespace; review
// h/revtrust): as TestFlowedWitnessAfterFailedWrite (flowed6 flushed by
// hand, the witness's writes failed), then a firewall check finds damage
// (forward's "goto guard6" deleted) and pcpd stops before a repair. Close
// writes the witness all the same: a later pcpd does not trust the
// record, which lacks the address of a live (labelled) flow. Before,
// writeWitnessOwed left it out over damage a check had found, at Close
// too (the reason, a rewrite of admit6 mending damage unseen, holds for
// a running Backend only): the later pcpd trusted the flushed record
// (its first SetProtected reads conntrack for unlabelled flows only).
func TestFlowedWitnessAtStopAfterDamage(t *testing.T) {
	topo, be := guardedTopology(t, pinhole.Config{})
	client := flowThrough(t, topo, be, 7820)
	topo.Host.MustRun(t, "nft", "flush", "set", "inet", "pcpd", "flowed6")
	pinhole.FailFlushes(be, 2) // the counter's write, the mark's
	pinhole.FlowedTampered(be)
	deleteRule(t, topo.Host, "pcpd", "forward", `ip6 daddr @protected6 goto guard6 `)
	if err := be.Healthy(); err == nil {
		t.Fatal("Healthy = nil with forward's goto guard6 deleted: nothing to test")
	}
	be.Close()
	later := newBackend(t, topo.Host, pinhole.Config{})
	serveTunnel(t, later, topo)
	if err := later.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
		t.Fatal(err)
	}
	if flowed, ok := later.FlowedAddrs(client.Addr()); ok && !flowed(client.Addr()) {
		t.Error("a later Setup trusts the record the last pcpd knew incomplete (flowed6 flushed, its witness's write failed, then a check found damage and pcpd stopped): the address of a live flow unrecorded")
	}
}
