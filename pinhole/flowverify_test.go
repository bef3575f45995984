package pinhole_test

import (
	"sync"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestVerifyFlowedEarly (root, namespaces; BENCHMARKS.md item 81): the
// conntrack read a start owes the flow record (a Setup over no guard, the
// first SetProtected) is done by VerifyFlowed when asked, once, and the
// FlowedAddrs of the first walk after it reads conntrack no more. Before,
// only that FlowedAddrs read it: the server's first delete's walk paid the
// dump and its socket's close (≈ 25 ms under nftables' commit_mutex)
// while the engine committed.
func TestVerifyFlowedEarly(t *testing.T) {
	netlab.RequireRoot(t)
	_, b := guardedTopology(t, pinhole.Config{})
	var mu sync.Mutex
	var reads []string
	defer pinhole.OnSetupReads(func(what string, _ bool) {
		mu.Lock()
		reads = append(reads, what)
		mu.Unlock()
	})()
	took := func() []string {
		mu.Lock()
		defer mu.Unlock()
		r := reads
		reads = nil
		return r
	}
	b.VerifyFlowed()
	if r := took(); len(r) != 1 || r[0] != "pin" {
		t.Fatalf("VerifyFlowed with the read owed: conntrack reads %q, want one \"pin\"", r)
	}
	b.VerifyFlowed()
	if r := took(); len(r) != 0 {
		t.Errorf("VerifyFlowed again: conntrack reads %q, want none (no longer owed)", r)
	}
	if _, ok := b.FlowedAddrs(); !ok {
		t.Fatal("FlowedAddrs untrusted after VerifyFlowed found no flow")
	}
	if r := took(); len(r) != 0 {
		t.Errorf("FlowedAddrs after VerifyFlowed: conntrack reads %q, want none", r)
	}
}
