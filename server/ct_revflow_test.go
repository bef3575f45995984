package server

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// TestE2EFlowLetInWhileTableGoneEndsWithMapping (root, namespaces; review
// h/revflow): pcpd's table deleted while pcpd was down (a firewall reload
// between a stop and a start), a connection opened to a mapped port
// meanwhile (nothing guarded the prefix): unlabelled, so the ruleset's
// re-check never cuts it, and unrecorded in flowed6. The start lays the
// table out fresh and puts the mapping back; the mapping's delete must
// end the connection (PMP-12): its walk deletes the entry, and the
// remote's next segment is a new flow no element admits. h/flowed trusted
// the fresh record and left the walk out (skipUnflowed): the connection
// carried data after the delete was answered, for good.
func TestE2EFlowLetInWhileTableGoneEndsWithMapping(t *testing.T) {
	const port = 9760
	// No firewall checks: the first that finds the layout intact
	// rebuilds the record (h/flowedlife), and the counter below is 0.
	l := newLab(t, func(c *Config, p *policy.Config) { p.MinLifetime = time.Second; c.TamperInterval = time.Hour })
	serveEcho(t, l.topo.Client, netip.AddrPortFrom(l.topo.ClientV6, port))
	if r := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, port, port, time.Hour, 1)); r.Result != pcp.Success {
		t.Fatalf("MAP: %+v", r)
	}
	// The admin's own ruleset, which keeps conntrack on (as a host's
	// firewall does) while pcpd's table is gone.
	l.topo.Host.MustRun(t, "nft", "add table inet admin")
	l.topo.Host.MustRun(t, "nft", "add chain inet admin forward_admin { type filter hook forward priority 10; }")
	l.topo.Host.MustRun(t, "nft", "add rule inet admin forward_admin ct state established,related,new accept")
	l.stop()
	l.nftIn(t, "delete", "table", "inet", "pcpd")
	src, dst := netip.AddrPortFrom(l.topo.InternetV6, port+40000), netip.AddrPortFrom(l.topo.ClientV6, port)
	c := dialIn(t, l.topo.Internet, src, dst)
	if err := echoOnce(c); err != nil {
		t.Fatalf("with no table: %v", err)
	}
	l.freshBackend(t) // a new process: nothing of the last one's Backend
	l.start()
	if err := echoOnce(c); err != nil {
		t.Fatalf("through the mapping put back: %v", err)
	}
	l.flushed(t)
	if r := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, port, port, 0, 1)); r.Result != pcp.Success {
		t.Fatalf("delete: %+v", r)
	}
	l.flushed(t)
	if f := l.ctFlowOf(t, protoTCP, src, dst); f != nil {
		t.Errorf("flow let in while the table was gone still tracked after its mapping's delete and walk: %s", f)
	}
	if err := echoOnce(c); err == nil {
		t.Error("the connection carries data after its mapping's delete and walk")
	}
	// Written down for a later pcpd over the table, which reads no
	// conntrack over an intact layout: admit6's counter at 1.
	if out := l.nftIn(t, "list", "chain", "inet", "pcpd", "admit6"); !strings.Contains(out, "counter packets 1 ") {
		t.Errorf("admit6's counter not written at 1 once a flow let in unguarded was found:\n%s", out)
	}
}

// freshBackend gives l a new pinhole.Backend, as a restarted pcpd has
// (l.stop then l.start keep the lab's, and its memory of damage).
func (l *lab) freshBackend(t *testing.T) {
	t.Helper()
	conn, err := l.topo.Host.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	fw, err := pinhole.New(conn, pinhole.Config{})
	if err != nil {
		t.Fatal(err)
	}
	l.fw = fw
}
