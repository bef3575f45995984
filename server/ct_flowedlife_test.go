package server

import (
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// The record's life (h/flowedlife; pinhole/flowedlife.go,
// flowregain.go): untrusted, it is rebuilt from conntrack and trusted
// again at the next firewall check that finds the layout intact; a flush
// of flowed6 by hand untrusts it; what no flow holds leaves at a rebuild.

// noChecksLab is a lab whose firewall checks the test runs itself
// (checkFirewall); watch says whether the firewall watch runs.
func noChecksLab(t *testing.T, watch bool) *lab {
	return newLab(t, func(c *Config, p *policy.Config) {
		p.MinLifetime = time.Second
		c.TamperInterval = time.Hour
		c.NoFirewallWatch = !watch
	})
}

// deleteMap deletes the client's IPv6 TCP MAP of port and waits for its
// walk (or its skip).
func (l *lab) deleteMap(t *testing.T, port uint16) {
	t.Helper()
	if r := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, port, port, 0, 1)); r.Result != pcp.Success {
		t.Fatalf("delete %d: %+v", port, r)
	}
	l.flushed(t)
}

// TestE2EFlowedRegainedAfterCounter (root, namespaces): a flow admitted
// unrecorded (its address out of flowed6, admit6's counter at 1: as an add
// that failed on a full set) untrusts the record; the next firewall check
// rebuilds it from conntrack: trusted again, the flow's address recorded,
// and its mapping's delete walks and ends it (the safety property: a
// record trusted again never skips the walk of a live flow). Before, the
// record stayed untrusted for the Backend's life and for every later pcpd
// over the table (the counter written at 1).
func TestE2EFlowedRegainedAfterCounter(t *testing.T) {
	l := noChecksLab(t, false)
	_, src, dst := l.inbound(t, "map6", 9780, time.Hour)
	a := l.topo.ClientV6.String()
	if !l.inFlowed(t, a) {
		t.Fatal("the client's address not in flowed6 after a flow to it: nothing to test")
	}
	l.nftIn(t, "delete", "element", "inet", "pcpd", "flowed6", "{ "+a+" }")
	l.admitCounterAt1(t)
	if _, ok := l.fw.FlowedAddrs(); ok {
		t.Fatal("record trusted with admit6's counter at 1: nothing to test")
	}
	l.srv.checkFirewall()
	flowed, ok := l.fw.FlowedAddrs()
	if !ok {
		t.Fatal("record still untrusted after a firewall check found the layout intact (admit6's counter was 1)")
	}
	if !flowed(l.topo.ClientV6) {
		t.Error("rebuilt record lacks the address of a flow admitted unrecorded before the rebuild")
	}
	if l.inFlowed(t, "::") {
		t.Error("the untrusted mark (::) still in flowed6 after the rebuild")
	}
	l.deleteMap(t, 9780)
	if f := l.ctFlowOf(t, protoTCP, src, dst); f != nil {
		t.Errorf("flow admitted unrecorded still tracked after its mapping's delete over the rebuilt record: %s", f)
	}
	// A later pcpd over the table trusts it too (the counter at 0, no
	// mark).
	l.stop()
	l.freshBackend(t)
	l.start()
	if _, ok := l.fw.FlowedAddrs(); !ok {
		t.Error("a later pcpd does not trust the rebuilt record")
	}
}

// TestE2EFlowedFlushNoticed (root, namespaces): "nft flush set inet pcpd
// flowed6" (one NFT_MSG_DELSETELEM an element on 6.18) erases the record
// of a live flow; the watch untrusts the record (and marks it so for a
// later pcpd: pinhole's TestWatchFlowedFlushDamage) and tells the flush
// as damage, so its pass logs it and checks the firewall at once; the
// check rebuilds the record from conntrack, the live flow's address in
// it, and the flow's mapping's delete walks and ends the flow. Before,
// the flush went unseen: the delete left the walk out and the flow's
// entry lived on; then (h/flushflake) it was seen but logged nowhere,
// the record untrusted until the periodic check (an hour here).
func TestE2EFlowedFlushNoticed(t *testing.T) {
	l := noChecksLab(t, true)
	_, src, dst := l.inbound(t, "map6", 9790, time.Hour)
	a := l.topo.ClientV6.String()
	if !l.inFlowed(t, a) {
		t.Fatal("the client's address not in flowed6 after a flow to it: nothing to test")
	}
	checks := counterValue(t, l.srv.m.watchChecks)
	l.nftIn(t, "flush", "set", "inet", "pcpd", "flowed6")
	// The watch is told asynchronously: its state, not a time, asserted
	// (the bound only ends a test that would never pass). The check is
	// counted as it starts; the record is trusted again once its rebuild
	// is done.
	if !eventually(func() bool { return counterValue(t, l.srv.m.watchChecks) > checks }) {
		t.Fatal("no firewall check after nft flush set of flowed6 (10 s): the flush not told as damage")
	}
	if !eventually(func() bool { _, ok := l.fw.FlowedAddrs(); return ok }) {
		t.Fatal("record still untrusted after the check that follows the flush (10 s)")
	}
	if !l.inFlowed(t, a) {
		t.Error("the live flow's address not in flowed6 after the check's rebuild")
	}
	if l.inFlowed(t, "::") {
		t.Error("the untrusted mark (::) still in flowed6 after the check's rebuild")
	}
	l.deleteMap(t, 9790)
	if f := l.ctFlowOf(t, protoTCP, src, dst); f != nil {
		t.Errorf("flow still tracked after its mapping's delete, its record flushed by hand: %s", f)
	}
}

// TestE2EFlowedLeftoverLeaves (root, namespaces): an address whose last
// mapping ended while the record was untrusted (walked, not pruned: no
// delete from an untrusted record) leaves flowed6 at the rebuild, as no
// flow goes to it. Before, it stayed for the table's life.
func TestE2EFlowedLeftoverLeaves(t *testing.T) {
	l := noChecksLab(t, false)
	_, src, dst := l.inbound(t, "map6", 9800, time.Hour)
	a := l.topo.ClientV6.String()
	l.admitCounterAt1(t)
	l.deleteMap(t, 9800)
	if f := l.ctFlowOf(t, protoTCP, src, dst); f != nil {
		t.Fatalf("flow still tracked after its mapping's delete, untrusted record: %s", f)
	}
	if !l.inFlowed(t, a) {
		t.Fatal("the address left flowed6 while the record was untrusted: nothing to test")
	}
	l.srv.checkFirewall()
	if l.inFlowed(t, a) {
		t.Error("an address no lease holds and no flow goes to still in flowed6 after the check's rebuild")
	}
	if _, ok := l.fw.FlowedAddrs(); !ok {
		t.Error("record still untrusted after the check's rebuild")
	}
}

// eventually asks cond every 20 ms until it holds (true) or 10 s have
// passed (false): for a state reached asynchronously (the watch's); the
// bound only ends a test that would never pass.
func eventually(cond func() bool) bool {
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			return false
		}
	}
	return true
}

// admitCounter is the packets of admit6's counter (nft's listing).
func (l *lab) admitCounter(t *testing.T) int {
	t.Helper()
	m := regexp.MustCompile(`(?m)^\s*counter packets (\d+) bytes \d+ accept$`).FindStringSubmatch(l.nftIn(t, "list", "chain", "inet", "pcpd", "admit6"))
	if m == nil {
		t.Fatal("no counter rule in admit6")
	}
	n, _ := strconv.Atoi(m[1])
	return n
}
