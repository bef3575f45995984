package server

import (
	"net/netip"
	"sync"
	"testing"
	"time"

	mdnl "github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// Conntrack flush follow-ups of h/ctexp and h/revct (h/ctleft): failed
// dumps retried, the flows a live lease admits told as the kernel's set
// elements tell them, a mapping made again after its end sparing nothing.

// TestE2EConntrackDumpFailureRetried (root, namespaces): a conntrack
// dump failing with anything but EINVAL/EOPNOTSUPP (which fall back to
// the generic walk), or marked interrupted (NLM_F_DUMP_INTR) after
// missing the flow, left the flows of the deleted NAT-PMP mapping (its
// inbound one here) in conntrack until their timeout (TCP established:
// 5 days): the error was logged at debug level and the filters dropped.
// Now the group is walked again with a backoff until a walk succeeds, and
// the failure is counted (pcpd_conntrack_flush_failures_total). The
// faults are injected where the dump's result comes back (ctDumpFault);
// the flow, the mapping and its delete are real.
//
// Fails without the retry: the flow is still tracked ctFlushBound after
// the delete.
func TestE2EConntrackDumpFailureRetried(t *testing.T) {
	intr := func([]mdnl.Message, error) ([]mdnl.Message, error) {
		// Interrupted, and the flow missed: no entry came back.
		return []mdnl.Message{{Header: mdnl.Header{Flags: mdnl.Multi | mdnl.DumpInterrupted}}}, nil
	}
	errno := func(e unix.Errno) func([]mdnl.Message, error) ([]mdnl.Message, error) {
		return func([]mdnl.Message, error) ([]mdnl.Message, error) {
			return nil, &mdnl.OpError{Op: "receive", Err: e}
		}
	}
	for i, c := range []struct {
		name  string
		fault func([]mdnl.Message, error) ([]mdnl.Message, error)
		n     int // dumps that fail (each walk dumps inbound and SNAT-ed flows)
	}{
		{"EBUSY once", errno(unix.EBUSY), 1},
		{"EINTR once", errno(unix.EINTR), 1},
		{"ENOBUFS, four dumps", errno(unix.ENOBUFS), 4},
		{"ENOMEM, eight dumps (past the held reply)", errno(unix.ENOMEM), 8},
		{"interrupted dump, twice", intr, 2},
	} {
		t.Run(c.name, func(t *testing.T) {
			var mu sync.Mutex
			dumps := 0
			l := newLab(t, func(_ *Config, p *policy.Config) { p.MinLifetime = time.Second })
			l.stop()
			l.tweak = func(s *Server) {
				s.ctDumpFault = func(msgs []mdnl.Message, err error) ([]mdnl.Message, error) {
					mu.Lock()
					defer mu.Unlock()
					if dumps++; dumps <= c.n {
						return c.fault(msgs, err)
					}
					return msgs, err
				}
			}
			l.start()
			_, src, dst := l.inbound(t, "pmp", uint16(9600+i), time.Hour)
			l.pmpMap(t, uint16(9600+i), 0, 0)
			d := l.waitFlowGone(t, src, dst)
			mu.Lock()
			n := dumps
			mu.Unlock()
			t.Logf("flow gone %v after the delete's reply, %d dumps", d, n)
			if n <= c.n {
				t.Fatalf("%d dumps, want more than the %d failed", n, c.n)
			}
			if f := counterValue(t, l.srv.m.ctFailures); f < 1 {
				t.Errorf("pcpd_conntrack_flush_failures_total %v, want ≥ 1", f)
			}
		})
	}
}

// TestE2EMapDeleteKeepsAllPortsFlow (root, namespaces): an IPv6 TCP
// all-ports MAP (MAP-05) of the address admits every inbound TCP flow to
// it, so the delete of a port MAP of the same address ends none of them:
// the kernel admits them still, through the all-ports element. With a
// FILTER, only the flows from the filter's remote stay. Before, only the
// leases holding the deleted MAP's exact endpoint were asked (the
// all-ports MAP holds the address's port 0), and both flows were flushed.
func TestE2EMapDeleteKeepsAllPortsFlow(t *testing.T) {
	for i, c := range []struct {
		name   string
		filter bool // the all-ports MAP FILTERs to the first remote
	}{
		{"all-ports MAP", false},
		{"all-ports MAP with FILTER", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := newLab(t, func(_ *Config, p *policy.Config) {
				p.MinLifetime = time.Second
				p.AllowAllPorts = true
			})
			port := uint16(9500 + i)
			conn, src, dst := l.inbound(t, "map6", port, time.Hour)
			r := mapReq(l.topo.ClientV6, pcp.ProtoTCP, 0, 0, time.Hour, 2)
			if c.filter {
				r.Options.Filters = append(r.Options.Filters, pcp.Filter{Remote: netip.PrefixFrom(src.Addr(), 128), RemotePort: src.Port()})
			}
			if resp := l.pcp(r); resp.Result != pcp.Success {
				t.Fatalf("all-ports MAP: %+v", resp)
			}
			src2 := netip.AddrPortFrom(src.Addr(), src.Port()+1) // outside the FILTER
			conn2 := dialIn(t, l.topo.Internet, src2, dst)
			if err := echoOnce(conn2); err != nil {
				t.Fatalf("second connection: %v", err)
			}
			if resp := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, port, port, 0, 1)); resp.Result != pcp.Success {
				t.Fatalf("port MAP delete: %+v", resp)
			}
			// The reply did not wait for the walk (the ruleset cut the IPv6
			// MAP's flows: mustWaitFlush); wait for it.
			l.srv.waitConntrack()
			for _, f := range []struct {
				src  netip.AddrPort
				want bool
			}{{src, true}, {src2, !c.filter}} {
				kept := l.ctFlow(t, f.src, dst) != nil
				t.Logf("flow from %v kept: %v", f.src, kept)
				if kept != f.want {
					t.Errorf("flow from %v kept %v, want %v (the all-ports MAP admits it: %v)", f.src, kept, f.want, f.want)
				}
			}
			if err := echoOnce(conn); err != nil {
				t.Errorf("the connection the all-ports MAP admits ended: %v", err)
			}
		})
	}
}
