package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestE2ERenewalDuringReinstallBackoff (root, namespaces; issue 9, review
// h/revleft9's left item): while a repair's re-install of every lease
// keeps failing and backs off (≤ 31 checks, ≈ 2.6 min), an early renewal
// of a lease whose element the damage removed (pin6 flushed by hand) was
// absorbed: SUCCESS, and no pinhole passed the client's traffic. Now such
// a renewal is written through: it puts its own element back (row "the
// renewal's write works") or is answered with the failure code (row
// "every write fails"). The damage, the repair and the kernel's sets are
// real; the re-install's failure is injected (rearmFault's Apply). Fails
// without the fix: "renewal answered SUCCESS ... its element is missing"
// in both rows.
func TestE2ERenewalDuringReinstallBackoff(t *testing.T) {
	for i, c := range []struct {
		name      string
		applyFail int // after the repair's failed re-install
	}{
		{"the renewal's write works", 0},
		{"every write fails", 1 << 20},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := newLab(t, func(cfg *Config, _ *policy.Config) {
				cfg.TamperInterval = time.Hour // the test runs the checks
			})
			f := &rearmFault{Backend: l.fw}
			l.stop()
			l.tweak = func(s *Server) { s.fw = f; s.cutter = f }
			l.start()
			port := uint16(9901 + i)
			client := l.topo.ClientV6
			svc := netip.AddrPortFrom(client, port)
			laddr := netip.AddrPortFrom(client, 40000+port) // one client port: a renewal
			life := 4 * time.Hour
			renew := func() pcp.Response {
				t.Helper()
				life += time.Minute // a later expiry each time, synced expiry ≥ 5/8 of it away
				out, err := l.exchange(laddr, l.server6(), pcp.AppendRequest(nil, mapReq(client, pcp.ProtoTCP, port, port, life, 7)))
				if err != nil {
					t.Fatalf("MAP %v: %v", life, err)
				}
				var r pcp.Response
				if err := pcp.ParseResponse(out, &r); err != nil {
					t.Fatalf("reply % x: %v", out, err)
				}
				return r
			}
			if r := renew(); r.Result != pcp.Success {
				t.Fatalf("MAP: %+v", r)
			}
			a0 := counterValue(t, l.srv.m.absorbed)
			if r := renew(); r.Result != pcp.Success {
				t.Fatalf("renewal: %+v", r)
			}
			if counterValue(t, l.srv.m.absorbed) != a0+1 {
				t.Fatal("an early renewal of a healthy lease was not absorbed: nothing to test")
			}
			l.topo.Host.MustRun(t, "nft", "flush", "set", "inet", "pcpd", "pin6")
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
			a1 := counterValue(t, l.srv.m.absorbed)
			r := renew()
			_, back := l.kernelHas(svc)
			absorbed := counterValue(t, l.srv.m.absorbed) - a1
			t.Logf("renewal during the back-off: %v, element in the kernel %v, absorbed %v", r.Result, back, absorbed)
			if r.Result == pcp.Success && !back {
				t.Errorf("renewal answered SUCCESS during the re-install's back-off, yet its element is missing (absorbed %v)", absorbed)
			}
			if c.applyFail > 0 && r.Result == pcp.Success {
				t.Errorf("renewal answered SUCCESS while every kernel write fails")
			}
			f.set(0, 0)
		})
	}
}
