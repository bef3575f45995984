package server

import (
	"testing"
	"time"

	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// TestE2EReloadRepairArmsCut (review h/revattcut, finding 3; pinhole/arm.go):
// an admin's "flush ruleset" deletes pcpd's table with an IPv6 MAP's and
// a NAT-PMP mapping's flows established. The tamper check's repair
// (checkFirewall: Setup, then every lease re-installed) lays the cut out
// disarmed, the labelled flows alive, so none is dropped before its
// element is back, and arms it once the re-install is done: both flows
// carry data after the repair, and the ruleset cuts again (CutsFlows
// true for the IPv6 MAP: its delete's reply need not wait for the walk).
// The same for a stop, the reload and a start (the restore arms it).
// Without the server's Arm (armCut) the "after the repair" and "after the
// restart" rows say CutsFlows false / Armed false.
func TestE2EReloadRepairArmsCut(t *testing.T) {
	l := newLab(t, func(cfg *Config, p *policy.Config) {
		cfg.TamperInterval = time.Hour // the test runs the checks
	})
	const port = 9960
	c6, _, dst6 := l.inbound(t, "map6", port, time.Hour)
	c4, _, _ := l.inbound(t, "pmp", port+1, time.Hour)
	pin := pinhole.Pinhole{Protocol: protoTCP, InternalAddr: dst6.Addr(), InternalPort: dst6.Port()}
	if !l.fw.CutsFlows(pin) {
		t.Fatal("CutsFlows false before the reload: nothing to test")
	}
	l.topo.Host.MustRun(t, "nft", "flush", "ruleset")
	l.srv.checkFirewall()
	if err := l.fw.Healthy(); err != nil {
		t.Fatalf("not repaired: %v", err)
	}
	if !l.fw.Armed() || !l.fw.CutsFlows(pin) {
		t.Errorf("after the repair: Armed %v, CutsFlows %v; want both true (armed once every lease is back)", l.fw.Armed(), l.fw.CutsFlows(pin))
	}
	if err := echoOnce(c6); err != nil {
		t.Errorf("the IPv6 MAP's flow after the repair: %v", err)
	}
	if err := echoOnce(c4); err != nil {
		t.Errorf("the NAT-PMP mapping's flow after the repair: %v", err)
	}
	// pcpd stopped, the admin's reload, pcpd started: the restore arms
	// the cut once the stored leases are back.
	l.stop()
	l.topo.Host.MustRun(t, "nft", "flush", "ruleset")
	l.start()
	if !l.fw.Armed() || !l.fw.CutsFlows(pin) {
		t.Errorf("after the restart: Armed %v, CutsFlows %v; want both true (armed once the restore is done)", l.fw.Armed(), l.fw.CutsFlows(pin))
	}
	if err := echoOnce(c6); err != nil {
		t.Errorf("the IPv6 MAP's flow after the restart: %v", err)
	}
	if err := echoOnce(c4); err != nil {
		t.Errorf("the NAT-PMP mapping's flow after the restart: %v", err)
	}
}
