package server

import (
	"errors"
	"fmt"
	"go.uber.org/zap"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
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
	before := l.natPriorLen()
	// The first call stamps the generation; the second drops what was
	// recorded before the first.
	l.srv.pruneNATPrior()
	l.srv.pruneNATPrior()
	after := l.natPriorLen()
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

type natListerFunc func(fn func(proto uint8, ext netip.AddrPort)) error

func (f natListerFunc) NATEndpoints(fn func(proto uint8, ext netip.AddrPort)) error { return f(fn) }

// TestPruneNATPriorGenerations: pruneNATPrior drops only entries recorded
// before its previous call that no listed flow uses: an entry recorded
// while the dump runs (or since the previous call) stays, one whose
// endpoint the listing names (a DNAT-ed flow's original destination, a
// SNAT-ed flow's reply destination) stays, and a failed listing drops
// nothing.
func TestPruneNATPriorGenerations(t *testing.T) {
	defer func(m int) { natPriorDumpMin = m }(natPriorDumpMin)
	natPriorDumpMin = 1
	a := netip.MustParseAddr("192.0.2.1")
	to := netip.MustParseAddrPort("10.0.0.2:80")
	tg := func(p uint16) ctTarget { return ctTarget{addr: a, proto: 6, port: p} }
	var fail error
	var during func()
	s := &Server{log: zap.NewNop(), natLister: natListerFunc(func(fn func(uint8, netip.AddrPort)) error {
		fn(6, netip.AddrPortFrom(a, 1))
		fn(17, netip.AddrPortFrom(a, 2)) // another protocol: not entry 2's
		if during != nil {
			during()
		}
		return fail
	})}
	s.mu.Lock()
	for p := uint16(1); p <= 4; p++ {
		s.notePrior(tg(p), to, 0)
	}
	s.mu.Unlock()
	s.pruneNATPrior() // stamps: nothing judged yet
	if len(s.natPrior) != 4 {
		t.Fatalf("first call: %d entries, want 4", len(s.natPrior))
	}
	fail = errors.New("no conntrack")
	s.pruneNATPrior()
	if len(s.natPrior) != 4 {
		t.Fatalf("failed listing: %d entries, want 4", len(s.natPrior))
	}
	fail = nil
	s.natPriorDumpAt = 0
	during = func() {
		s.mu.Lock()
		s.notePrior(tg(3), netip.MustParseAddrPort("10.0.0.3:80"), 0) // 3 recorded again meanwhile
		s.notePrior(tg(5), to, 0)
		s.mu.Unlock()
	}
	s.pruneNATPrior()
	var got []uint16
	for k := range s.natPrior {
		got = append(got, k.port)
	}
	slices.Sort(got)
	if !slices.Equal(got, []uint16{1, 3, 5}) {
		t.Errorf("kept %v, want [1 3 5] (1: a flow; 3, 5: recorded during the dump)", got)
	}
}

// natPriorLen is how many endpoints the server's natPrior records.
func (l *lab) natPriorLen() int {
	l.srv.mu.Lock()
	defer l.srv.mu.Unlock()
	return len(l.srv.natPrior)
}

// natPriorLeft waits up to 5 s for natPrior to empty (its drop follows
// the walk) and returns how many entries are left.
func (l *lab) natPriorLeft() int {
	left := 0
	_ = netlab.Eventually(5*time.Second, func() error {
		if left = l.natPriorLen(); left > 0 {
			return fmt.Errorf("%d left", left)
		}
		return nil
	})
	return left
}

// waitWalkClean waits up to within for the walks up to seq to be done
// and clean (ctFlusher.cleanSeq); what names the walk in the failure.
func (l *lab) waitWalkClean(t *testing.T, what string, seq uint64, within time.Duration) {
	t.Helper()
	if err := netlab.Eventually(within, func() error {
		if c := l.srv.ct.cleanSeq(); c < seq {
			return fmt.Errorf("%s not clean (clean %d < %d)", what, c, seq)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// storeEndedRedirects writes n IPv6 redirects (MAP leases whose external
// port is the internal one + 10000) of the internal endpoints at(0..n-1),
// expired a minute ago, to the stopped lab's store, 10 000 a commit: the
// NAT mappings its next start ends.
func (l *lab) storeEndedRedirects(t *testing.T, n int, at func(i int) (netip.Addr, uint16)) {
	t.Helper()
	st, _, err := store.Open(l.dir, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	now := time.Now()
	var put []store.Lease
	for i := range n {
		addr, port := at(i)
		put = append(put, store.Lease{
			Key:          store.Key{Owner: "ended", InternalAddr: addr, InternalPort: port, Protocol: protoTCP},
			ExternalAddr: addr, ExternalPort: port + 10000, Kind: store.KindMap,
			Created: now.Add(-2 * time.Hour), Expires: now.Add(-time.Minute),
		})
		if len(put) == 10000 || i == n-1 {
			if err := st.Commit(put, nil); err != nil {
				t.Fatal(err)
			}
			put = put[:0]
		}
	}
}
