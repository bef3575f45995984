package server

import (
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
)

// prepHook is the lab's Backend with fn run once right after a
// PrepareSetup (the repair's read of conntrack, made before it waits
// for s.mu).
type prepHook struct {
	*pinhole.Backend
	mu sync.Mutex
	fn func()
}

func (p *prepHook) PrepareSetup() {
	p.Backend.PrepareSetup()
	p.mu.Lock()
	fn := p.fn
	p.fn = nil
	p.mu.Unlock()
	if fn != nil {
		fn()
	}
}

// TestE2ERepairSeesFlowLetInDuringItsWait (root, namespaces; review
// h/revleft9): an admin's "nft flush chain inet pcpd guard6" (the
// forward chain's accept then admits the owned prefixes' traffic,
// unlabelled); the firewall check's repair reads conntrack for flows let
// in unlabelled (PrepareSetup), then waits for s.mu; meanwhile (the hook,
// no timing) a connection comes in through the damaged guard6 to a live
// MAP's endpoint. The ruleset never cuts that connection (no label), so
// once repaired CutsFlows must be false for the MAP's kind, and the reply
// to the MAP's delete waits for the walk (mustWaitFlush): the entry is
// gone when the reply is. Without the fix: "CutsFlows true" (Setup took
// PrepareSetup's "none", made before the connection), and recheck6 was
// marked checked.
func TestE2ERepairSeesFlowLetInDuringItsWait(t *testing.T) {
	l := checkedLab(t)
	f := &prepHook{Backend: l.fw}
	l.restartWith(func(s *Server) { s.fw = f; s.cutter = f })
	const port = 9893
	dst := netip.AddrPortFrom(l.topo.ClientV6, port)
	src := netip.AddrPortFrom(l.topo.InternetV6, port+40000)
	serveEcho(t, l.topo.Client, dst)
	if r := l.pcp(mapReq(dst.Addr(), pcp.ProtoTCP, port, port, time.Hour, 1)); r.Result != pcp.Success {
		t.Fatalf("MAP: %+v", r)
	}
	pin := pinhole.Pinhole{Protocol: protoTCP, InternalAddr: dst.Addr(), InternalPort: port}
	if !l.fw.CutsFlows(pin) {
		t.Fatal("CutsFlows false before the damage: nothing to test")
	}
	l.topo.Host.MustRun(t, "nft", "flush", "chain", "inet", "pcpd", "guard6")
	var c net.Conn
	f.mu.Lock()
	f.fn = func() {
		c = dialIn(t, l.topo.Internet, src, dst)
		if err := echoOnce(c); err != nil {
			t.Errorf("through the damaged guard6: %v", err)
		}
	}
	f.mu.Unlock()
	l.srv.checkFirewall()
	if c == nil {
		t.Fatal("the repair made no PrepareSetup")
	}
	if err := l.fw.Healthy(); err != nil {
		t.Fatalf("after the repair: %v", err)
	}
	if l.ctFlow(t, src, dst) == nil {
		t.Fatal("no conntrack entry for the connection")
	}
	if l.fw.CutsFlows(pin) {
		t.Error("after the repair, a connection let in unlabelled during its wait for s.mu alive: CutsFlows true (the ruleset does not cut it)")
	}
	out, _ := l.topo.Host.Run("nft", "list", "chain", "inet", "pcpd", "recheck6")
	if containsMark(out) {
		t.Error("recheck6 marked checked with that connection alive (a later start trusts the mark)")
	}
	if r := l.pcp(mapReq(dst.Addr(), pcp.ProtoTCP, port, port, 0, 1)); r.Result != pcp.Success {
		t.Fatalf("delete: %+v", r)
	}
	if l.ctFlow(t, src, dst) != nil {
		t.Error("the connection's entry is still there when the delete is acknowledged")
	}
}

func containsMark(nft string) bool {
	return strings.Contains(nft, "pcpd: no flow admitted unlabelled")
}
