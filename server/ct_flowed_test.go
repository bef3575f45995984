package server

import (
	"fmt"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// The ruleset records where admitted IPv6 flows went (flowed6,
// pinhole/flowed.go), and the flusher leaves out the filters of ended
// IPv6 pinholes whose address had none (skipUnflowed): a churn of
// mappings nobody connected through runs no conntrack dump.

// flushed waits until the flusher has handled every filter set queued so
// far, the flowed6 prune after their walk included (it runs after the
// release: afterSettled; no time bound of its own: the test's).
func (l *lab) flushed(t *testing.T) {
	t.Helper()
	done := make(chan struct{})
	l.srv.ct.afterSettled(l.srv.ct.seq(), func() { close(done) })
	<-done
}

// churnNoFlows makes and deletes n IPv6 TCP MAPs of the client from port0
// up, none with a flow, and returns the walks (dumps) they cost.
func (l *lab) churnNoFlows(t *testing.T, port0 uint16, n int) float64 {
	t.Helper()
	l.flushed(t)
	before := counterValue(t, l.srv.m.ctWalks)
	for i := range n {
		port := port0 + uint16(i)
		if r := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, port, port, time.Hour, 1)); r.Result != pcp.Success {
			t.Fatalf("MAP %d: %+v", port, r)
		}
		if r := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, port, port, 0, 1)); r.Result != pcp.Success {
			t.Fatalf("delete %d: %+v", port, r)
		}
		l.flushed(t)
	}
	return counterValue(t, l.srv.m.ctWalks) - before
}

// TestE2EChurnWithoutFlowsRunsNoDump (root, namespaces; issue 8's churn
// row): 8 IPv6 MAPs made and deleted, no flow through any: no conntrack
// walk runs (pcpd_conntrack_flushes_total unchanged), their 8 filters
// counted as skipped. Then a MAP with an established TCP flow through it
// is deleted: a walk runs and the flow's conntrack entry is gone.
func TestE2EChurnWithoutFlowsRunsNoDump(t *testing.T) {
	l := newLab(t, func(_ *Config, p *policy.Config) { p.MinLifetime = time.Second })
	if w := l.churnNoFlows(t, 9700, 8); w != 0 {
		t.Fatalf("%v conntrack walks for 8 deletes of mappings that never had a flow, want 0", w)
	}
	if k := counterValue(t, l.srv.m.ctSkipped); k < 8 {
		t.Errorf("%v filters skipped, want ≥ 8", k)
	}
	// A mapping whose endpoint had an admitted flow: walked, its flow's
	// entry deleted.
	_, src, dst := l.inbound(t, "map6", 9710, time.Hour)
	if l.ctFlowOf(t, protoTCP, src, dst) == nil {
		t.Fatal("no conntrack entry of the flow: nothing to test")
	}
	before := counterValue(t, l.srv.m.ctWalks)
	if r := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, 9710, 9710, 0, 1)); r.Result != pcp.Success {
		t.Fatalf("delete: %+v", r)
	}
	l.flushed(t)
	if w := counterValue(t, l.srv.m.ctWalks) - before; w < 1 {
		t.Errorf("%v walks after deleting a mapping that had a flow, want ≥ 1", w)
	}
	if f := l.ctFlowOf(t, protoTCP, src, dst); f != nil {
		t.Errorf("flow of the deleted mapping still tracked after its walk: %s", f)
	}
}

// nftIn runs nft in the host namespace of l.
func (l *lab) nftIn(t *testing.T, args ...string) string {
	t.Helper()
	var out []byte
	if err := l.topo.Host.Do(func() (err error) {
		out, err = exec.Command("nft", args...).CombinedOutput()
		if err != nil {
			err = fmt.Errorf("nft %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return string(out)
}

// TestE2EFlowedUntrustedWalks (root, namespaces): where the record may
// lack a flow, mappings without flows are walked as before: a restart
// over a layout of a pcpd before the record (guard6's admission rules
// accepting, no admit6: an upgrade), and admit6's counter above 0 (an add
// that failed: the set full).
func TestE2EFlowedUntrustedWalks(t *testing.T) {
	// No firewall checks: the first that finds the layout intact
	// rebuilds the record and trusts it again (h/flowedlife,
	// TestE2EFlowedRegainedAfterCounter).
	noChecks := func(c *Config, p *policy.Config) { p.MinLifetime = time.Second; c.TamperInterval = time.Hour }
	t.Run("upgrade from the old layout", func(t *testing.T) {
		l := newLab(t, noChecks)
		l.stop()
		// The layout as main before flowed6 wrote it: each admission
		// rule accepts where it went to admit6.
		re := regexp.MustCompile(`(?m)^\s*(.*@pin6\S* ct label set \S+) goto admit6 # handle (\d+)$`)
		n := 0
		for _, m := range re.FindAllStringSubmatch(l.nftIn(t, "-a", "list", "chain", "inet", "pcpd", "guard6"), -1) {
			l.nftIn(t, "replace", "rule", "inet", "pcpd", "guard6", "handle", m[2], m[1]+" accept")
			n++
		}
		if n != 5 {
			t.Fatalf("%d admission rules rewritten, want 5", n)
		}
		l.start()
		if w := l.churnNoFlows(t, 9720, 3); w < 3 {
			t.Fatalf("%v conntrack walks for 3 deletes after an upgrade from a layout without the record, want 3", w)
		}
		// The next pcpd over the same table does not trust it either
		// (admit6's counter written at 1).
		l.stop()
		l.start()
		if w := l.churnNoFlows(t, 9730, 2); w < 2 {
			t.Fatalf("%v conntrack walks for 2 deletes at the start after the upgrade's, want 2", w)
		}
	})
	t.Run("counter above 0", func(t *testing.T) {
		// No firewall watch either: it tells the counter's rewrite
		// below as a change to pcpd's rules, and the check it runs
		// finds the layout intact and trusts the rebuilt record again
		// before the deletes (CI at 8af8250: '2 conntrack walks for 3
		// deletes with admit6's counter at 1, want 3').
		l := newLab(t, func(c *Config, p *policy.Config) { noChecks(c, p); c.NoFirewallWatch = true })
		l.admitCounterAt1(t)
		if w := l.churnNoFlows(t, 9740, 3); w < 3 {
			t.Fatalf("%v conntrack walks for 3 deletes with admit6's counter at 1, want 3", w)
		}
	})
}

// admitCounterAt1 writes admit6's counter at 1, as an add that failed
// (flowed6 full) leaves it.
func (l *lab) admitCounterAt1(t *testing.T) {
	t.Helper()
	re := regexp.MustCompile(`(?m)^\s*counter packets 0 bytes \d+ accept # handle (\d+)$`)
	m := re.FindStringSubmatch(l.nftIn(t, "-a", "list", "chain", "inet", "pcpd", "admit6"))
	if m == nil {
		t.Fatal("no counter rule at 0 in admit6")
	}
	// Its bytes at pinhole's base (2^40, h/flowtrust) and one datagram's.
	l.nftIn(t, "replace", "rule", "inet", "pcpd", "admit6", "handle", m[1], "counter packets 1 bytes 1099511627856 accept")
}

// TestE2EUnflowedWalkedAfterDamage (root, namespaces): damage not yet
// seen lets a flow in unrecorded (pin6's admission rule accepting with no
// label and no record, as an admin's edit); its mapping's delete leaves
// the walk out (the record is still trusted: no check ran), and the
// firewall check that finds the damage walks what was left out: the
// flow's conntrack entry goes.
func TestE2EUnflowedWalkedAfterDamage(t *testing.T) {
	l := newLab(t, func(c *Config, p *policy.Config) {
		p.MinLifetime = time.Second
		c.TamperInterval = time.Hour
		c.NoFirewallWatch = true
	})
	// The fresh table's record read over (verifyFlowed) before the
	// damage: else that read finds the flow below and walks at once.
	if _, ok := l.fw.FlowedAddrs(); !ok {
		t.Fatal("the record not trusted before the damage: nothing to test")
	}
	re := regexp.MustCompile(`(?m)^\s*(.*@pin6) ct label set \S+ goto admit6 # handle (\d+)$`)
	m := re.FindStringSubmatch(l.nftIn(t, "-a", "list", "chain", "inet", "pcpd", "guard6"))
	if m == nil {
		t.Fatal("no admission rule of pin6 in guard6")
	}
	l.nftIn(t, "replace", "rule", "inet", "pcpd", "guard6", "handle", m[2], m[1]+" accept")
	_, src, dst := l.inbound(t, "map6", 9750, time.Hour)
	l.flushed(t)
	before := counterValue(t, l.srv.m.ctWalks)
	if r := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, 9750, 9750, 0, 1)); r.Result != pcp.Success {
		t.Fatalf("delete: %+v", r)
	}
	l.flushed(t)
	if w := counterValue(t, l.srv.m.ctWalks) - before; w != 0 {
		t.Fatalf("%v walks with the damage unseen: nothing to test", w)
	}
	if l.ctFlowOf(t, protoTCP, src, dst) == nil {
		t.Fatal("flow gone without a walk: nothing to test")
	}
	l.srv.checkFirewall() // finds the damage
	l.flushed(t)
	if f := l.ctFlowOf(t, protoTCP, src, dst); f != nil {
		t.Errorf("flow let in unrecorded by damage still tracked after the check that found the damage: %s", f)
	}
}

// inFlowed reports whether flowed6 holds a (nft's listing).
func (l *lab) inFlowed(t *testing.T, a string) bool {
	t.Helper()
	return regexp.MustCompile(`[\s{,]` + regexp.QuoteMeta(a) + `[\s},]`).MatchString(l.nftIn(t, "list", "set", "inet", "pcpd", "flowed6"))
}

// TestE2EFlowedPrunedAfterWalk (root, namespaces; review h/revflow,
// finding 4): an address whose mappings all ended and whose flows a walk
// ended leaves flowed6 (pruneFlowed); while a lease still holds it, it
// stays; a flow to it after the prune is recorded again, and its
// mapping's delete walks.
func TestE2EFlowedPrunedAfterWalk(t *testing.T) {
	l := newLab(t, func(_ *Config, p *policy.Config) { p.MinLifetime = time.Second })
	if _, ok := l.fw.FlowedAddrs(); !ok {
		t.Fatal("the record not trusted: nothing to test")
	}
	a := l.topo.ClientV6.String()
	if r := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, 9761, 9761, time.Hour, 1)); r.Result != pcp.Success {
		t.Fatalf("MAP 9761: %+v", r)
	}
	_, src, dst := l.inbound(t, "map6", 9762, time.Hour)
	if !l.inFlowed(t, a) {
		t.Fatal("the client's address not in flowed6 after a flow to it: nothing to test")
	}
	if r := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, 9762, 9762, 0, 1)); r.Result != pcp.Success {
		t.Fatalf("delete 9762: %+v", r)
	}
	l.flushed(t)
	if f := l.ctFlowOf(t, protoTCP, src, dst); f != nil {
		t.Fatalf("flow of the deleted mapping still tracked after its walk: %s", f)
	}
	if !l.inFlowed(t, a) {
		t.Fatal("the client's address left flowed6 while its MAP 9761 lives")
	}
	before := counterValue(t, l.srv.m.ctWalks)
	if r := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, 9761, 9761, 0, 1)); r.Result != pcp.Success {
		t.Fatalf("delete 9761: %+v", r)
	}
	l.flushed(t)
	if w := counterValue(t, l.srv.m.ctWalks) - before; w < 1 {
		t.Fatalf("%v walks after deleting 9761 (its address flowed): nothing to test", w)
	}
	if l.inFlowed(t, a) {
		t.Fatal("the client's address still in flowed6 after its mappings ended and their flows were walked away")
	}
	// Recorded again: a new flow adds it, its mapping's delete walks.
	_, src, dst = l.inbound(t, "map6", 9763, time.Hour)
	if !l.inFlowed(t, a) {
		t.Fatal("a flow after the prune not recorded in flowed6")
	}
	before = counterValue(t, l.srv.m.ctWalks)
	if r := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, 9763, 9763, 0, 1)); r.Result != pcp.Success {
		t.Fatalf("delete 9763: %+v", r)
	}
	l.flushed(t)
	if w := counterValue(t, l.srv.m.ctWalks) - before; w < 1 {
		t.Errorf("%v walks after deleting a mapping with a flow after the prune, want ≥ 1", w)
	}
	if f := l.ctFlowOf(t, protoTCP, src, dst); f != nil {
		t.Errorf("flow after the prune still tracked after its mapping's walk: %s", f)
	}
}
