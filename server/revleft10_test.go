package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
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
			l := newLab(t, func(cfg *Config, _ *policy.Config) {
				cfg.TamperInterval = time.Hour // the test runs the checks
			})
			f := &rearmFault{Backend: l.fw}
			l.stop()
			l.tweak = func(s *Server) { s.fw = f; s.cutter = f }
			l.start()
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
			l.topo.Host.MustRun(t, "nft", "flush", "set", "inet", "pcpd", "pin6_filter")
			f.set(1, 0) // the repair's re-install fails
			l.srv.checkFirewall()
			l.srv.mu.Lock()
			owed := l.srv.reinstallOwed
			l.srv.mu.Unlock()
			if !owed {
				t.Fatal("no re-install owed after the failed repair: nothing to test")
			}
			if _, ok := l.kernelHas(svc); ok {
				t.Fatal("the element is there after the failed re-install: nothing to test")
			}
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
