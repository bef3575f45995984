package server

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// TestE2ERegainRefusesUnguardedFlow (root, namespaces; review
// h/revlife): a connection let in to the client's port P1 while pcpd's
// table was gone (unlabelled: the re-check never cuts it; no mapping at
// P1 then) lives on after a fresh start. The record owes its read of
// conntrack (verifyFlowed: such a flow untrusts it). A firewall check's
// rebuild (RegainFlowed) took that read over but only recorded the
// flow's address and trusted the record; the delete of another mapping
// of the address (P2) walked P2 and pruned the address (no lease held
// it), though the unlabelled flow to P1 lived; a mapping made at P1 and
// deleted then left its walk out (the address not in flowed6), and the
// connection outlived its mapping's delete, carrying data. The rebuild
// must not trust a record while such a flow lives.
func TestE2ERegainRefusesUnguardedFlow(t *testing.T) {
	const p1, p2 = 9810, 9811
	l := noChecksLab(t, false)
	a := l.topo.ClientV6
	serveEcho(t, l.topo.Client, netip.AddrPortFrom(a, p1))
	if r := l.pcp(mapReq(a, pcp.ProtoTCP, p2, p2, time.Hour, 1)); r.Result != pcp.Success {
		t.Fatalf("MAP %d: %+v", p2, r)
	}
	// The admin's own ruleset keeps conntrack on while pcpd's table is
	// gone (TestE2EFlowLetInWhileTableGoneEndsWithMapping).
	l.topo.Host.MustRun(t, "nft", "add table inet admin")
	l.topo.Host.MustRun(t, "nft", "add chain inet admin forward_admin { type filter hook forward priority 10; }")
	l.topo.Host.MustRun(t, "nft", "add rule inet admin forward_admin ct state established,related,new accept")
	l.stop()
	l.nftIn(t, "delete", "table", "inet", "pcpd")
	src, dst := netip.AddrPortFrom(l.topo.InternetV6, p1+40000), netip.AddrPortFrom(a, p1)
	c := dialIn(t, l.topo.Internet, src, dst)
	if err := echoOnce(c); err != nil {
		t.Fatalf("with no table: %v", err)
	}
	l.freshBackend(t)
	l.start()
	// The owed read (the first walk's FlowedAddrs) finds the flow: the
	// record untrusted.
	if _, ok := l.fw.FlowedAddrs(); ok {
		t.Fatal("record trusted over a flow let in unguarded: nothing to test")
	}
	l.srv.checkFirewall() // the rebuild's turn: trusted before the fix
	// A rebuild that does not trust leaves admit6's counter at 1, not at
	// the 0 its transaction wrote: a pcpd that knows no mark (flowed6's
	// ::) distrusts the emptied set too.
	if out := l.nftIn(t, "list", "chain", "inet", "pcpd", "admit6"); !strings.Contains(out, "counter packets 1 ") {
		t.Errorf("admit6's counter not at 1 after a rebuild that left the record untrusted:\n%s", out)
	}
	// The other mapping's delete: walked (the address recorded, or the
	// record untrusted), and pruned from flowed6 if trusted.
	l.deleteMap(t, p2)
	t.Logf("after the delete of %d: address in flowed6 %v", p2, l.inFlowed(t, a.String()))
	if r := l.pcp(mapReq(a, pcp.ProtoTCP, p1, p1, time.Hour, 1)); r.Result != pcp.Success {
		t.Fatalf("MAP %d: %+v", p1, r)
	}
	if err := echoOnce(c); err != nil {
		t.Fatalf("through the mapping at %d: %v", p1, err)
	}
	l.deleteMap(t, p1)
	if f := l.ctFlowOf(t, protoTCP, src, dst); f != nil {
		t.Errorf("flow let in while the table was gone still tracked after its mapping's delete (record trusted by a rebuild, address pruned): %s", f)
	}
	if err := echoOnce(c); err == nil {
		t.Error("the connection let in while the table was gone carries data after its mapping's delete")
	}
}
