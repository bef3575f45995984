package server

import (
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
)

// TestE2ERenewalUnchangedDuringReinstallBackoff (root, namespaces; review
// h/revleft10, finding 1): h/left10 writes every renewal through while a
// re-install of every lease is owed (reinstallOwed), so that it "puts its
// own element back or gets the failure code". A renewal whose kernel diff
// is empty did neither: a PEER asked again for no more than it has left
// (PEER-07: never shortened; the lease unchanged, leaseEqual) and a
// renewal of a MAP whose element another lease holds for longer (the
// same element: a MAP FILTERed to a PEER's remote) wrote no kernel op
// and were told SUCCESS while their element, flushed by the damage, was
// missing. Now, while a re-install is owed, a request that keeps or
// renews a lease writes its elements (Refresh). The damage (pin6_filter
// flushed by hand), the repair and the sets are real; the re-install's
// failure is injected (rearmFault). Rows: with the renewal's write
// working (the element must be back) and with every write failing (the
// failure code, not SUCCESS).
func TestE2ERenewalUnchangedDuringReinstallBackoff(t *testing.T) {
	for i, c := range []struct {
		name      string
		shared    bool // a MAP FILTERed to the PEER's remote, renewed
		applyFail int
	}{
		{"PEER asked again, write works", false, 0},
		{"PEER asked again, every write fails", false, 1 << 20},
		{"MAP sharing a PEER's element, write works", true, 0},
		{"MAP sharing a PEER's element, every write fails", true, 1 << 20},
	} {
		t.Run(c.name, func(t *testing.T) {
			l, f := rearmFaultLab(t)
			port := uint16(9801 + i)
			client := l.topo.ClientV6
			svc := netip.AddrPortFrom(client, port)
			remote := netip.AddrPortFrom(l.topo.InternetV6, 5555)
			do := func(laddr netip.AddrPort, r *pcp.Request) pcp.Response {
				t.Helper()
				out, err := l.exchange(laddr, l.server6(), pcp.AppendRequest(nil, r))
				if err != nil {
					t.Fatalf("%v: %v", r.Opcode, err)
				}
				var resp pcp.Response
				if err := pcp.ParseResponse(out, &resp); err != nil {
					t.Fatalf("reply % x: %v", out, err)
				}
				return resp
			}
			peerFrom := netip.AddrPortFrom(client, 41000+port)
			mapFrom := netip.AddrPortFrom(client, 42000+port)
			mapWithFilter := func(life time.Duration) *pcp.Request {
				r := mapReq(client, pcp.ProtoTCP, port, port, life, 8)
				r.Options.Filters = append(r.Options.Filters, pcp.Filter{Remote: netip.PrefixFrom(remote.Addr(), 128), RemotePort: remote.Port()})
				return r
			}
			if r := do(peerFrom, peerReq(client, pcp.ProtoTCP, port, remote, 4*time.Hour, 7)); r.Result != pcp.Success {
				t.Fatalf("PEER: %+v", r)
			}
			if c.shared {
				if r := do(mapFrom, mapWithFilter(time.Hour)); r.Result != pcp.Success {
					t.Fatalf("MAP with FILTER: %+v", r)
				}
			}
			if _, ok := l.kernelHas(svc); !ok {
				t.Fatal("no element after the requests")
			}
			failReinstallAfterFlush(t, l, f, "pin6_filter", svc)
			f.set(c.applyFail, 0)
			var r pcp.Response
			if c.shared {
				r = do(mapFrom, mapWithFilter(2*time.Hour)) // later, yet before the PEER's end
			} else {
				r = do(peerFrom, peerReq(client, pcp.ProtoTCP, port, remote, time.Hour, 7))
			}
			_, back := l.kernelHas(svc)
			t.Logf("request during the back-off: %v, element in the kernel %v", r.Result, back)
			if r.Result == pcp.Success && !back {
				t.Errorf("answered SUCCESS during the re-install's back-off, yet its element is missing")
			}
			if c.applyFail > 0 && r.Result == pcp.Success {
				t.Errorf("answered SUCCESS while every kernel write fails")
			}
			f.set(0, 0)
		})
	}
}

// TestE2EStartWalkRetriedDropsNATPrior (root, lab; review h/revleft10,
// finding 2): h/left10 drops the NAT mappings a start ended from natPrior
// once the start's walk is done (dropWalkedPriors, a waiter on the
// flusher). The waiter is called when the flusher releases the walk's
// waiters, which it does after ctHoldAttempts failed walks too: then the
// drop found the walk not clean and dropped nothing, and nothing called
// it again once a retry succeeded: the records stayed (≈ 127 B each) until
// the next doubling or housekeeping prune, the h/left10 row's 100+ MB at
// 1 000 000 redirects, exactly when conntrack is under pressure. The walk's
// failures are injected (every walk fails until let go); the leases,
// start, flusher and conntrack are real. Now the success that ends a run
// of failed walks drops them. Fails without: "natPrior holds N entries
// after the start's walk succeeded".
func TestE2EStartWalkRetriedDropsNATPrior(t *testing.T) {
	const n = 50
	l := newLab(t)
	l.stop()
	base := l.topo.ClientV6.As16()
	base[14] = 0x78
	l.storeEndedRedirects(t, n, func(i int) (netip.Addr, uint16) { return netip.AddrFrom16(base), uint16(2000 + i) })
	var failing atomic.Bool
	failing.Store(true)
	l.tweak = func(s *Server) {
		walk := s.ct.walk
		s.ct.walk = func(fs []ctFilter) ([]ctFilter, error) {
			if failing.Load() {
				return fs, errors.New("injected: conntrack dump interrupted")
			}
			return walk(fs)
		}
	}
	l.start()
	seq := l.srv.ct.seq()
	if held := l.natPriorLen(); held < n || seq == 0 {
		t.Fatalf("after the start: %d recorded, walk seq %d: nothing to test", held, seq)
	}
	if err := netlab.Eventually(time.Minute, func() error {
		l.srv.ct.mu.Lock()
		done := l.srv.ct.done
		l.srv.ct.mu.Unlock()
		if done < seq {
			return fmt.Errorf("the start walk's waiters not released (done %d < %d)", done, seq)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // the drop's goroutine
	if held := l.natPriorLen(); held < n {
		t.Fatalf("%d recorded after failed walks, want ≥ %d (the walk did not end their flows)", held, n)
	}
	failing.Store(false)
	l.waitWalkClean(t, "the start's walk", seq, time.Minute)
	left := l.natPriorLeft()
	t.Logf("natPrior after the start's walk succeeded on a retry: %d of %d", left, n)
	if left > 0 {
		t.Errorf("natPrior holds %d entries after the start's walk succeeded", left)
	}
}
