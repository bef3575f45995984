package server

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestE2EAuditAboveMaxRestores (h/bigaudit; root, lab): with the firewall
// watch off (--firewall-watch=false) and the threshold lowered to 4 (pcpd:
// 200 000), Serve's periodic audit (every second here) over 5 live leases
// puts back the elements of live leases deleted by hand (pin6 ×2, the
// NAPT mapping's napt4 element and its snat4 companion), each with no more
// than its lease's remaining lifetime (and its own: lifetimes differ), and
// traffic passes again; the element of a lease deleted by PCP stays gone.
// On main (the audit skipped above the threshold; here: auditLarge's call
// replaced by the skip) it fails: 'not back after 2 audits'.
func TestE2EAuditAboveMaxRestores(t *testing.T) {
	netlab.RequireRoot(t)
	var audits atomic.Int64
	saved, hook := auditMaxLeases, auditLargeHook
	t.Cleanup(func() { auditMaxLeases, auditLargeHook = saved, hook }) // after the lab's own cleanups
	auditMaxLeases = 4
	auditLargeHook = func(int) { audits.Add(1) }
	l := newLab(t, func(c *Config, _ *policy.Config) {
		c.NoFirewallWatch = true
		c.TamperInterval, c.AuditInterval = time.Hour, time.Second
	})
	c, c4, pub := l.topo.ClientV6, l.topo.ClientV4, l.topo.HostPublicV4
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c, 443).String())
	l.topo.Client.ServeTCP(t, netip.AddrPortFrom(c4, 9090).String())
	ok := func(r pcp.Response) pcp.Response {
		t.Helper()
		if r.Result != pcp.Success {
			t.Fatalf("%+v", r)
		}
		return r
	}
	ok(l.pcp(mapReq(c, pcp.ProtoTCP, 443, 0, time.Hour, 1)))
	ok(l.pcp(mapReq(c, pcp.ProtoTCP, 7001, 0, 20*time.Minute, 1)))
	ok(l.pcp(mapReq(c, pcp.ProtoTCP, 7002, 0, 30*time.Minute, 1)))
	ok(l.pcp(mapReq(c, pcp.ProtoUDP, 7003, 0, 40*time.Minute, 1)))
	if r := ok(l.pcp(mapReq(c4, pcp.ProtoTCP, 9090, 19090, 50*time.Minute, 1))); r.Map.ExternalPort != 19090 {
		t.Fatalf("MAP IPv4: %+v", r)
	}
	ok(l.pcp(mapReq(c, pcp.ProtoTCP, 7009, 0, time.Hour, 1)))
	ok(l.pcp(mapReq(c, pcp.ProtoTCP, 7009, 0, 0, 1))) // deleted by PCP
	svc6, svc4 := netip.AddrPortFrom(c, 443), netip.AddrPortFrom(pub, 19090)
	if !l.reach(svc6) || !l.reach(svc4) {
		t.Fatal("mappings pass no traffic before the deletes")
	}
	expiry := map[string]time.Time{}
	for _, ls := range l.srv.Leases() {
		expiry[fmt.Sprintf("%d %s", ls.Protocol, netip.AddrPortFrom(ls.InternalAddr, ls.InternalPort))] = ls.Expires
	}
	if len(expiry) != 5 {
		t.Fatalf("%d leases, want 5 (> the threshold 4)", len(expiry))
	}

	h := l.topo.Host
	h.MustRun(t, "nft", "delete", "element", "inet", "pcpd", "pin6", fmt.Sprintf("{ %s . tcp . 443, %s . tcp . 7002 }", c, c))
	h.MustRun(t, "nft", "delete", "element", "inet", "pcpd", "napt4", fmt.Sprintf("{ %s . tcp . 19090 }", pub))
	h.MustRun(t, "nft", "delete", "element", "inet", "pcpd", "snat4", fmt.Sprintf("{ %s . tcp . 9090 }", c4))
	// Two audits that began after the deletes.
	from := audits.Load()
	if err := netlab.Eventually(watchBound, func() error {
		if audits.Load() < from+2 {
			return errors.New("audit not run")
		}
		return nil
	}); err != nil {
		t.Fatalf("%d audits above the threshold in %v, want 2", audits.Load()-from, watchBound)
	}
	for _, w := range []struct {
		proto uint8
		addr  netip.Addr
		port  uint16
	}{{6, c, 443}, {6, c, 7002}, {6, c4, 9090}, {6, c, 7001}, {17, c, 7003}} {
		t0 := time.Now()
		left, held := l.holds(w.proto, w.addr, w.port)
		name := fmt.Sprintf("%d %s", w.proto, netip.AddrPortFrom(w.addr, w.port))
		if !held {
			t.Errorf("%s: not back after 2 audits above the threshold (watch off)", name)
			continue
		}
		// The kernel counts in jiffies (≤ 10 ms at HZ 100) from its
		// commit, a little after the audit read its clock.
		lease := expiry[name].Sub(t0)
		if left > lease+20*time.Millisecond || left < lease-10*time.Second {
			t.Errorf("%s: kernel has %v left, lease %v: want no more than the lease's own remaining lifetime", name, left, lease)
		}
	}
	if _, held := l.holds(6, c, 7009); held {
		t.Error("the element of the lease deleted by PCP is back")
	}
	if out := h.MustRun(t, "nft", "list", "map", "inet", "pcpd", "snat4"); !strings.Contains(out, fmt.Sprintf("%s . tcp . 9090", c4)) {
		t.Errorf("snat4 companion not back:\n%s", out)
	}
	if !l.reach(svc6) || !l.reach(svc4) {
		t.Error("restored mappings pass no traffic")
	}
}
