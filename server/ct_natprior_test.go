package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestE2ENATPriorPruned (root, namespaces; review h/revnatleft, left:
// natPrior unbounded with KeepConnections): with KeepConnections no walk
// drops natPrior's entries, so every IPv6 redirect ever ended and never
// retaken for another target stayed recorded (on main: 1 + n entries
// after the prune calls, the test's first error). pruneNATPrior drops the
// entries of endpoints no NAT-ed flow uses: after it only the endpoint
// whose old connection still lives is recorded, and retaking that
// endpoint for another port still ends the old connection.
func TestE2ENATPriorPruned(t *testing.T) {
	defer func(m int) { natPriorDumpMin = m }(natPriorDumpMin)
	natPriorDumpMin = 1
	l := newLab(t, func(cfg *Config, p *policy.Config) {
		p.MinLifetime = time.Second
		cfg.KeepConnections = true
	})
	const port = 9890
	conn, _, dst := l.inbound(t, "redir6", port, time.Hour)
	if dst.Port() == port {
		t.Fatalf("MAP of %d not redirected (external %v)", port, dst)
	}
	serveEcho(t, l.topo.Client, netip.AddrPortFrom(l.topo.ClientV6, port+1))
	if d := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, port, dst.Port(), 0, 1)); d.Result != pcp.Success {
		t.Fatalf("delete: %+v", d)
	}
	const n = 100
	for i := range n {
		in, ext := uint16(20000+i), uint16(30000+i)
		if r := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, in, ext, time.Hour, 7)); r.Result != pcp.Success || r.Map.ExternalPort == in {
			t.Fatalf("MAP of %d: %+v", in, r)
		}
		if r := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, in, ext, 0, 7)); r.Result != pcp.Success {
			t.Fatalf("delete of %d: %+v", in, r)
		}
	}
	count := func() int {
		l.srv.mu.Lock()
		defer l.srv.mu.Unlock()
		return len(l.srv.natPrior)
	}
	before := count()
	// The first call stamps the generation; the second drops what was
	// recorded before the first.
	l.srv.pruneNATPrior()
	l.srv.pruneNATPrior()
	after := count()
	t.Logf("natPrior: %d entries before the prune, %d after", before, after)
	if before != n+1 || after != 1 {
		t.Errorf("natPrior: %d entries before, %d after; want %d, 1 (the endpoint whose flow lives)", before, after, n+1)
	}
	tg := ctTarget{addr: dst.Addr(), proto: 6, port: dst.Port()}
	l.srv.mu.Lock()
	_, kept := l.srv.natPrior[tg]
	l.srv.mu.Unlock()
	if !kept {
		t.Errorf("%v, whose old connection lives, was pruned", dst)
	}
	if r := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, port+1, dst.Port(), time.Hour, 2)); r.Result != pcp.Success || r.Map.ExternalPort != dst.Port() {
		t.Fatalf("MAP of %d for external port %d: %+v", port+1, dst.Port(), r)
	}
	if err := echoOnce(conn); err == nil {
		t.Errorf("the old connection still reaches port %d after %v was mapped to port %d", port, dst, port+1)
	}
}
