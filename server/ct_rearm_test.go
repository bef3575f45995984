package server

import (
	"sync"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pinhole"
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
	l := checkedLab(t)
	c6, c4, pin := l.twoFlows(t, 9960)
	l.topo.Host.MustRun(t, "nft", "flush", "ruleset")
	l.srv.checkFirewall()
	if err := l.fw.Healthy(); err != nil {
		t.Fatalf("not repaired: %v", err)
	}
	if !l.fw.Armed() || !l.fw.CutsFlows(pin) {
		t.Errorf("after the repair: Armed %v, CutsFlows %v; want both true (armed once every lease is back)", l.fw.Armed(), l.fw.CutsFlows(pin))
	}
	flowsEcho(t, c6, c4, " after the repair")
	// pcpd stopped, the admin's reload, pcpd started: the restore arms
	// the cut once the stored leases are back. The flows quiet first
	// (waitQuiet: a segment, such as the echo's delayed ACK, reaching the
	// host between the flush and the start is reset by its stack).
	l.waitQuiet(t, c6, c4)
	l.stop()
	l.topo.Host.MustRun(t, "nft", "flush", "ruleset")
	l.start()
	if !l.fw.Armed() || !l.fw.CutsFlows(pin) {
		t.Errorf("after the restart: Armed %v, CutsFlows %v; want both true (armed once the restore is done)", l.fw.Armed(), l.fw.CutsFlows(pin))
	}
	flowsEcho(t, c6, c4, " after the restart")
}

// TestE2EReinstallFailedArmsLater (review h/revarm, finding 1): an
// admin's "flush ruleset" with an IPv6 MAP's and a NAT-PMP mapping's
// flows established, and the repair's re-install fails (its Apply
// refused once). The repair's Setup laid the cut out disarmed, and
// Healthy checks that disarmed layout as intact: without armOwed no
// later check repaired or armed anything, and the cut stayed disarmed
// (CutsFlows false: every delete waiting for the walk; the leases'
// elements missing) for the rest of the process. With it the next
// check that finds the layout healthy re-installs every lease and arms:
// Armed and CutsFlows true, the MAP's element back, both flows echo.
func TestE2EReinstallFailedArmsLater(t *testing.T) {
	l, fault := rearmFaultLab(t) // Apply refused once below
	c6, c4, pin := l.twoFlows(t, 9970)
	l.topo.Host.MustRun(t, "nft", "flush", "ruleset")
	fault.set(1, 0)
	l.srv.checkFirewall()
	if l.fw.Armed() {
		t.Fatal("armed after a failed re-install: nothing to test")
	}
	for i := 1; i <= 2; i++ {
		l.srv.checkFirewall()
		if err := l.fw.Healthy(); err != nil {
			t.Fatalf("check %d: %v", i, err)
		}
	}
	has := false
	es, err := l.fw.List()
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		if e.Pinhole.InternalAddr == pin.InternalAddr && e.Pinhole.InternalPort == pin.InternalPort {
			has = true
		}
	}
	if !l.fw.Armed() || !l.fw.CutsFlows(pin) || !has {
		t.Errorf("two checks after the failed re-install: Armed %v, CutsFlows %v, the MAP's element there %v; want all true",
			l.fw.Armed(), l.fw.CutsFlows(pin), has)
	}
	flowsEcho(t, c6, c4, "")
}

// applyHook is the lab's Backend with a hook run once before the next
// Apply (a test's kernel change between two of the server's writes).
type applyHook struct {
	*pinhole.Backend
	mu   sync.Mutex
	once func()
}

func (f *applyHook) Apply(ops []pinhole.Op) error {
	f.mu.Lock()
	h := f.once
	f.once = nil
	f.mu.Unlock()
	if h != nil {
		h()
	}
	return f.Backend.Apply(ops)
}

// TestE2EReloadDuringRestoreKeepsLeases (review h/revarm, finding 4): an
// admin's "flush ruleset" while a start restores the stored leases (here
// just before its first install). Every install then fails for want of
// pcpd's sets (ErrMissing), not for anything of the leases': the restore
// tried lease by lease and dropped them all from the table and the store
// (0 leases left, the clients' mappings gone until they asked again).
// Now a lease whose install found pcpd's objects missing is kept, the
// cut left disarmed (armOwed), and the firewall check's repair puts both
// back: 2 leases, Armed, both flows echo.
func TestE2EReloadDuringRestoreKeepsLeases(t *testing.T) {
	l := checkedLab(t)
	const port = 9980
	c6, _, _ := l.inbound(t, "map6", port, time.Hour)
	c4, _, _ := l.inbound(t, "pmp", port+1, time.Hour)
	l.waitQuiet(t, c6, c4) // the hook's flush comes next
	hook := &applyHook{Backend: l.fw, once: func() { l.topo.Host.MustRun(t, "nft", "flush", "ruleset") }}
	l.restartWith(func(s *Server) { s.fw = hook })
	if n := len(l.srv.Leases()); n != 2 {
		t.Errorf("after the start: %d leases, want 2", n)
	}
	l.srv.checkFirewall()
	if err := l.fw.Healthy(); err != nil {
		t.Fatalf("not repaired: %v", err)
	}
	if n := len(l.srv.Leases()); n != 2 || !l.fw.Armed() {
		t.Errorf("after the repair: %d leases, Armed %v; want 2, true", n, l.fw.Armed())
	}
	flowsEcho(t, c6, c4, "")
}
