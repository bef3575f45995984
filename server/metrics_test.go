package server

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
)

// TestMetrics: requests by protocol, opcode and result; leases;
// revocations.
func TestMetrics(t *testing.T) {
	h := newHarness(t)
	reg := prometheus.NewRegistry()
	for _, c := range h.s.Collectors() {
		reg.MustRegister(c)
	}
	h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1))
	h.do(mapReq(addrA, pcp.ProtoSCTP, 443, 0, time.Hour, 1))
	h.pmp(v4A, pcp.PMPOpMapUDP, 53, 0, time.Hour)
	h.s.Revoke(context.Background(), RevokeFilter{Owner: ownerA})
	got := gather(t, reg)
	for k, v := range map[string]float64{
		"pcpd_requests_total,opcode=MAP,protocol=pcp,result=SUCCESS":         1,
		"pcpd_requests_total,opcode=MAP,protocol=pcp,result=UNSUPP_PROTOCOL": 1,
		"pcpd_requests_total,opcode=MAP_UDP,protocol=natpmp,result=SUCCESS":  1,
		"pcpd_revocations_total,cause=operator":                              2,
		"pcpd_leases":                                                        0,
		"pcpd_batch_requests":                                                2,
		"pcpd_kernel_apply_seconds":                                          3,
	} {
		if got[k] != v {
			t.Errorf("%s = %v, want %v (all: %v)", k, got[k], v, got)
		}
	}
}

// gather reads every metric of reg as "name,label=value,..." → value (a
// histogram's sample count).
func gather(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			key := mf.GetName()
			for _, l := range m.GetLabel() {
				key += "," + l.GetName() + "=" + l.GetValue()
			}
			switch {
			case m.GetCounter() != nil:
				got[key] = m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				got[key] = m.GetGauge().GetValue()
			case m.GetHistogram() != nil:
				got[key] = float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return got
}

// TestOwnerMeterFailure (RELIABILITY.md bug 4, review S3): when the firewall
// is restored but its owner meter cannot be written, every lease's pinholes
// are re-installed all the same, and the failure is logged and counted;
// the next checks retry the owner meter alone (no re-install, no lock)
// until it is written. The owner meter's kernel drops reach /metrics by
// reason.
func TestOwnerMeterFailure(t *testing.T) {
	h := newHarness(t)
	reg := prometheus.NewRegistry()
	for _, c := range h.s.Collectors() {
		reg.MustRegister(c)
	}
	h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1))
	h.do(mapReq(addrB, pcp.ProtoUDP, 53, 0, time.Hour, 1))
	if h.fw.OwnerSets == 0 {
		t.Fatal("the owner meter was never given the owners")
	}
	h.fw.FailOwners = func() error { return servertest.ErrInjected }
	h.fw.Tamper()
	h.clock.Advance(time.Minute)
	h.s.checkFirewall()
	if n := len(h.fw.Holes()); n != 2 {
		t.Fatalf("%d pinholes after a restore whose owner meter failed, want both leases' 2", n)
	}
	applies := h.fw.Applies
	// One failed write of the meter (Setup's), counted once: the repair
	// used to give the owners again right after Setup, which failed and
	// counted a second time.
	if got := gather(t, reg)["pcpd_owner_meter_errors_total"]; got != 1 {
		t.Errorf("pcpd_owner_meter_errors_total = %v after one failed repair, want 1", got)
	}
	if len(h.logs.FilterMessageSnippet("not the kernel's owner meter").All()) == 0 {
		t.Error("the owner meter's failure is not logged")
	}
	// Still failing: retried, counted, nothing re-installed.
	errs := gather(t, reg)["pcpd_owner_meter_errors_total"]
	h.s.checkFirewall()
	if got := gather(t, reg)["pcpd_owner_meter_errors_total"]; got != errs+1 || h.fw.Applies != applies || h.fw.OwnerRepairs != 0 {
		t.Errorf("retry while failing: errors %v (was %v), applies %d (was %d), repairs %d", got, errs, h.fw.Applies, applies, h.fw.OwnerRepairs)
	}
	// Writable again: the owner meter alone is written.
	h.fw.FailOwners = nil
	h.s.checkFirewall()
	if h.fw.OwnerRepairs != 1 || h.fw.Applies != applies {
		t.Errorf("retry: %d repairs, %d applies (was %d), want one repair and no re-install", h.fw.OwnerRepairs, h.fw.Applies, applies)
	}
	if err := h.fw.Healthy(); err != nil {
		t.Errorf("Healthy after the retry: %v", err)
	}
	if n := len(h.fw.Holes()); n != 2 {
		t.Errorf("%d pinholes, want 2", n)
	}

	h.fw.Drops = pinhole.MeterDrops{ReversePath: 7, OwnerRate: 11, UnownedRate: 13, Loopback: 17}
	got := gather(t, reg)
	for k, v := range map[string]float64{
		"pcpd_kernel_requests_dropped_total,reason=reverse-path":        7,
		"pcpd_kernel_requests_dropped_total,reason=owner-rate-limit":    11,
		"pcpd_kernel_requests_dropped_total,reason=unowned-rate-limit":  13,
		"pcpd_kernel_requests_dropped_total,reason=loopback-rate-limit": 17,
	} {
		if got[k] != v {
			t.Errorf("%s = %v, want %v", k, got[k], v)
		}
	}
}

// TestFirewallCheckFollowsRoutes: every firewall check (every
// TamperInterval) first has the owner meter follow the routes of the
// owned prefixes (pinhole's FollowRoutes), which bounds how long its
// reverse-path rule lags a route change; a failure is logged and the
// check goes on, with nothing restored.
func TestFirewallCheckFollowsRoutes(t *testing.T) {
	h := newHarness(t)
	h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1))
	applies := h.fw.Applies
	h.s.checkFirewall()
	h.s.checkFirewall()
	if h.fw.RouteFollows != 2 {
		t.Errorf("two firewall checks followed the routes %d times, want 2", h.fw.RouteFollows)
	}
	h.fw.FailRoutes = func() error { return servertest.ErrInjected }
	h.s.checkFirewall()
	if h.fw.RouteFollows != 3 || h.fw.Applies != applies || h.fw.OwnerRepairs != 0 {
		t.Errorf("a failed follow: %d follows, %d applies (was %d), %d repairs; want 3 and nothing restored", h.fw.RouteFollows, h.fw.Applies, applies, h.fw.OwnerRepairs)
	}
	if len(h.logs.FilterMessageSnippet("cannot follow the routes").All()) != 1 {
		t.Error("the failed follow is not logged")
	}
}

// TestProtectedFailureRepairedAlone (review of 2026-12-03, h/review2
// finding 3): when the protected sets cannot be written (a SetProtected
// that failed part way leaves them holding a mix of old and new), each
// firewall check retries the protected sets alone, with no Setup, no lock
// and no re-install of every lease, for as long as the failure lasts;
// then one repair writes them. Before, every check (5 s) ran the full
// repair: Setup (which wrote the old prefixes back) and a re-install of
// every lease. A real tamper of the pinhole sets meanwhile still gets the
// full repair, whose pinholes come back although the protected sets fail.
func TestProtectedFailureRepairedAlone(t *testing.T) {
	h := newHarness(t)
	h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1))
	h.do(mapReq(addrB, pcp.ProtoUDP, 53, 0, time.Hour, 1))
	h.fw.FailProtected = func() error { return servertest.ErrInjected }
	h.s.protected = nil // the ownership changed: given again, and failing
	h.s.updateProtected()
	applies, setups := h.fw.Applies, h.fw.Setups
	for range 3 {
		h.s.checkFirewall()
	}
	if h.fw.Setups != setups || h.fw.Applies != applies || h.fw.ProtectedRepairs != 0 {
		t.Errorf("3 checks while the protected sets fail: %d Setups (was %d), %d applies (was %d), %d repairs; want the protected sets retried alone",
			h.fw.Setups, setups, h.fw.Applies, applies, h.fw.ProtectedRepairs)
	}
	if n := len(h.logs.FilterMessageSnippet("cannot restore the protected sets").All()); n != 3 {
		t.Errorf("%d failed protected repairs logged, want 3", n)
	}
	// A flushed pinhole set meanwhile: the full repair, pinholes back.
	h.fw.Tamper()
	h.s.checkFirewall()
	if n := len(h.fw.Holes()); n != 2 || h.fw.Setups != setups+1 {
		t.Errorf("after a tamper while the protected sets fail: %d pinholes (want 2), %d Setups (want %d)", n, h.fw.Setups, setups+1)
	}
	applies = h.fw.Applies
	h.fw.FailProtected = nil
	h.s.checkFirewall()
	if h.fw.ProtectedRepairs != 1 || h.fw.Applies != applies || h.fw.Setups != setups+1 {
		t.Errorf("once writable: %d repairs, %d applies (was %d), %d Setups; want one repair alone", h.fw.ProtectedRepairs, h.fw.Applies, applies, h.fw.Setups)
	}
	if err := h.fw.Healthy(); err != nil {
		t.Errorf("Healthy after the repair: %v", err)
	}
}

// TestAuditMissingSetRepairs (review of 2026-12-03): when the audit's
// listing finds a pinhole set gone (pinhole.ErrMissing: deleted by hand
// after the rules that use it), the firewall is checked and restored
// then, not only at the next tamper tick; before, the audit logged a
// warning and went on.
func TestAuditMissingSetRepairs(t *testing.T) {
	h := newHarness(t)
	h.do(mapReq(addrA, pcp.ProtoTCP, 443, 0, time.Hour, 1))
	h.do(mapReq(addrB, pcp.ProtoUDP, 53, 0, time.Hour, 1))
	setups := h.fw.Setups
	h.fw.Tamper()
	h.s.auditFirewall(context.Background())
	if n := len(h.fw.Holes()); n != 2 || h.fw.Setups != setups+1 {
		t.Errorf("after an audit that found a set missing: %d pinholes (want 2), %d Setups (want %d)", n, h.fw.Setups, setups+1)
	}
}

// TestRouteChangeFollowedAtOnce (review of 2026-12-03): when the firewall
// tells of a change of the host's links, addresses, routes or policy
// rules (pinhole's route watch), the routes are followed about
// routeFollowDelay later, a burst of changes once, follows at least
// routeFollowGap apart, not at the next firewall check (here an hour away): an interface index reused by a
// device moved into the namespace was trusted by the owner meter's
// reverse-path rule until then.
func TestRouteChangeFollowedAtOnce(t *testing.T) {
	h := newHarness(t, func(c *Config, _ *policy.Config) { c.TamperInterval, c.AuditInterval = time.Hour, time.Hour })
	h.fw.Changes = make(chan struct{}, 1)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { h.s.watchFirewall(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	wait := func(n int) {
		t.Helper()
		deadline := time.Now().Add(2 * time.Second)
		for h.fw.Follows() < n && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if got := h.fw.Follows(); got != n {
			t.Fatalf("%d route follows, want %d", got, n)
		}
	}
	for range 3 { // a burst: one follow
		select {
		case h.fw.Changes <- struct{}{}:
		default:
		}
		time.Sleep(20 * time.Millisecond)
	}
	wait(1)
	first := time.Now()
	time.Sleep(2 * routeFollowDelay)
	wait(1)
	// Another change soon after: followed, but routeFollowGap after the
	// first follow (review4 F2: a churning host made a follow, a dump of
	// every route, every routeFollowDelay).
	h.fw.Changes <- struct{}{}
	wait(2)
	if gap := time.Since(first); gap < routeFollowGap-50*time.Millisecond {
		t.Errorf("second follow %v after the first, want >= %v", gap, routeFollowGap)
	}
	// After a quiet spell, a change is followed routeFollowDelay later.
	time.Sleep(routeFollowGap)
	start := time.Now()
	h.fw.Changes <- struct{}{}
	wait(3)
	if d := time.Since(start); d > routeFollowGap-100*time.Millisecond {
		t.Errorf("a change after a quiet spell followed %v later, want about %v", d, routeFollowDelay)
	}
}

// TestRouteLookupOwnersReported (BENCHMARKS.md item 28): the owners each
// of whose requests costs the kernel a route lookup (RouteLookups) show as
// pcpd_owner_meter_route_lookup_owners, and each firewall check logs the
// owners that entered that state since the last one, by ID and prefix:
// an owner that stays is logged once, one that leaves and comes back
// again, and past maxLookupLogs at once the rest are counted in one line.
func TestRouteLookupOwnersReported(t *testing.T) {
	h := newHarness(t)
	reg := prometheus.NewRegistry()
	for _, c := range h.s.Collectors() {
		reg.MustRegister(c)
	}
	owner := func(id string) pinhole.Owner {
		return pinhole.Owner{ID: id, Prefixes: []netip.Prefix{netip.MustParsePrefix("10.78.0.0/16")}}
	}
	var many []pinhole.Owner
	var manyIDs []string
	for i := range maxLookupLogs + 3 {
		many = append(many, owner(fmt.Sprintf("static:many%02d", i)))
		manyIDs = append(manyIDs, many[i].ID)
	}
	for _, step := range []struct {
		name     string
		lookedUp []pinhole.Owner
		logged   []string // owners named by this check
		more     int      // owners counted in the summary line
	}{
		{"none", nil, nil, 0},
		{"one enters", []pinhole.Owner{owner("static:a")}, []string{"static:a"}, 0},
		{"it stays", []pinhole.Owner{owner("static:a")}, nil, 0},
		{"another enters", []pinhole.Owner{owner("static:a"), owner("static:b")}, []string{"static:b"}, 0},
		{"both leave", nil, nil, 0},
		{"one comes back", []pinhole.Owner{owner("static:b")}, []string{"static:b"}, 0},
		{"many enter", many, manyIDs[:maxLookupLogs], 3},
	} {
		h.logs.TakeAll()
		h.fw.LookedUp = step.lookedUp
		h.s.checkFirewall()
		if got := gather(t, reg)["pcpd_owner_meter_route_lookup_owners"]; got != float64(len(step.lookedUp)) {
			t.Errorf("%s: pcpd_owner_meter_route_lookup_owners = %v, want %d", step.name, got, len(step.lookedUp))
		}
		var named []string
		more := 0
		for _, e := range h.logs.FilterMessageSnippet("costs a route lookup").All() {
			if id, ok := e.ContextMap()["owner"].(string); ok {
				named = append(named, id)
				if p := fmt.Sprint(e.ContextMap()["prefixes"]); !strings.Contains(p, "10.78.0.0/16") {
					t.Errorf("%s: %s logged with prefixes %s", step.name, id, p)
				}
			}
			if n, ok := e.ContextMap()["unnamed"].(int64); ok {
				more += int(n)
			}
		}
		if !slices.Equal(named, step.logged) || more != step.more {
			t.Errorf("%s: logged owners %v and %d more, want %v and %d more", step.name, named, more, step.logged, step.more)
		}
	}
}

// Every metric metrics.go names is one the engine registers, and the
// reverse: cmd/pcpd's TestReadmeNamesRealFlagsAndMetrics finds the
// metrics pcpd serves by their names in metrics.go, so a collector built
// there but left out of collectors(), or one named elsewhere, would pass
// it documented but not served, or served undocumented. The optional
// collectors are built as New builds them for a firewall that has them
// (an owner meter with route lookups, the flowed6 check).
func TestMetricsNamedInMetricsGo(t *testing.T) {
	src, err := os.ReadFile("metrics.go")
	if err != nil {
		t.Fatal(err)
	}
	named := map[string]bool{}
	for _, m := range regexp.MustCompile(`"(pcpd_[a-z0-9_]+)"`).FindAllStringSubmatch(string(src), -1) {
		named[m[1]] = true
	}
	m := newMetrics(func() float64 { return 0 })
	fw := servertest.NewFirewall(time.Now)
	m.kernelDrops = newKernelDrops(fw.MeterDrops)
	m.lookupOwners = newLookupOwners(fw)
	m.flowedUnnamed = newFlowedUnnamed(func() bool { return false })
	reg := prometheus.NewRegistry()
	registered := map[string]bool{}
	for _, c := range m.collectors() {
		reg.MustRegister(c)
		ch := make(chan *prometheus.Desc, 4)
		c.Describe(ch)
		close(ch)
		for d := range ch {
			name := regexp.MustCompile(`fqName: "([a-z0-9_]+)"`).FindStringSubmatch(d.String())
			if name == nil {
				t.Fatalf("no name in %v", d)
			}
			registered[name[1]] = true
		}
	}
	for n := range named {
		if !registered[n] {
			t.Errorf("metrics.go names %s, which the engine does not register (collectors())", n)
		}
	}
	for n := range registered {
		if !named[n] {
			t.Errorf("the engine registers %s, which metrics.go does not name in full", n)
		}
	}
}
