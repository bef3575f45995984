package pinhole_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestAttachedCutReloadWindow (review h/revattcut, finding 3; arm.go): the
// admin reloads their firewall ("nft -f" of a file that begins "flush
// ruleset", systemctl reload nftables), which deletes pcpd's objects; the
// tamper check's repair (server.checkFirewall) runs Setup, then
// re-installs every lease's pinholes (Apply, in batches). Setup laid
// pcpd_cut and the re-checks out over empty sets, and between the two
// every established flow pcpd labelled, of mappings that all live, was
// dropped: a window as long as the re-install. Now Setup lays the cut out
// disarmed (labelled flows alive, sets made anew): the flows go on,
// CutsFlows is false and Healthy accepts the disarmed layout; Arm, after
// the re-install, cuts again (the deleted mappings' flows are dropped).
// Without arm.go the "repaired, pinholes not yet re-installed" row fails
// both echoes (timeouts).
func TestAttachedCutReloadWindow(t *testing.T) {
	topo, b := attachedCut(t)
	reloadWindow(t, topo, b, pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd"}, func() {
		loadNft(t, topo.Host, strings.NewReplacer("HOSTPUB", topo.HostPublicV4.String(), "CLIENT4", topo.ClientV4.String(),
			"CLIENT6", topo.ClientV6.String()).Replace(attCutRuleset))
	})
}

// TestCutReloadWindow: standalone, "flush ruleset" deletes pcpd's table,
// and its repair had the same window (guard6's recheck6, natcut).
func TestCutReloadWindow(t *testing.T) {
	topo, b := guardedTopology(t, pinhole.Config{})
	reloadWindow(t, topo, b, pinhole.Config{}, nil)
}

func reloadWindow(t *testing.T, topo *netlab.Topology, b *pinhole.Backend, cfg pinhole.Config, reload func()) {
	pin, napt, flows := pinAndNAPT(t, topo, b, 7900)
	cuts := func(step string, want bool) {
		t.Helper()
		for _, p := range []pinhole.Pinhole{pin, napt} {
			if got := b.CutsFlows(p); got != want {
				t.Errorf("%s: CutsFlows(%v) = %v, want %v", step, p, got, want)
			}
		}
		if got := b.Armed(); got != want {
			t.Errorf("%s: Armed() = %v, want %v", step, got, want)
		}
	}
	checkAttFlows(t, topo.Host, "live", flows)
	cuts("live", true)
	topo.Host.MustRun(t, "nft", "flush", "ruleset")
	// Standalone, with no NAT chain left at the hooks the NAPT flow's
	// binding is not applied until Setup: only the attached reload (the
	// admin's NAT chain back) carries both flows here.
	if reload != nil {
		reload()
		checkAttFlows(t, topo.Host, "reloaded", flows)
	}
	if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
		t.Fatalf("Healthy after the reload: %v", err)
	}
	if err := b.Setup(); err != nil {
		t.Fatal(err)
	}
	checkAttFlows(t, topo.Host, "repaired, pinholes not yet re-installed", flows)
	cuts("repaired, disarmed", false)
	if err := b.Healthy(); err != nil {
		t.Errorf("Healthy over the disarmed layout: %v", err)
	}
	apply(t, b, install(pin, time.Hour), install(napt, time.Hour))
	checkAttFlows(t, topo.Host, "re-installed", flows)
	if err := b.Arm(); err != nil {
		t.Fatal(err)
	}
	cuts("armed", true)
	if err := b.Healthy(); err != nil {
		t.Errorf("Healthy over the armed layout: %v", err)
	}
	checkAttFlows(t, topo.Host, "armed", flows)
	// A restart over the intact table: armed at once, no window.
	nb := newBackend(t, topo.Host, cfg)
	if !nb.Armed() || !nb.CutsFlows(pin) {
		t.Errorf("restart over the intact table: Armed %v, CutsFlows %v; want both true", nb.Armed(), nb.CutsFlows(pin))
	}
	apply(t, b, del(pin), del(napt))
	for i := range flows {
		flows[i].cut = true
	}
	checkAttFlows(t, topo.Host, "armed, mappings deleted", flows)
}

// TestArmAfterDamage (review h/revarm, finding 2): Arm after a Healthy
// that found the layout damaged since the disarmed Setup (the forward
// chain flushed: nothing re-checks any flow) must not say CutsFlows
// true: Arm rewrites the re-check chains alone. Without the check of
// noteDamage in Arm both kinds said true until the next Setup, and a
// server would answer deletes without waiting for the walk while the
// ruleset cut nothing.
func TestArmAfterDamage(t *testing.T) {
	topo, b := guardedTopology(t, pinhole.Config{})
	pin, napt, flows := pinAndNAPT(t, topo, b, 7950)
	checkAttFlows(t, topo.Host, "live", flows)
	topo.Host.MustRun(t, "nft", "flush", "ruleset")
	if err := b.Setup(); err != nil {
		t.Fatal(err)
	}
	if b.Armed() {
		t.Fatal("armed after the reload's Setup: nothing to test")
	}
	apply(t, b, install(pin, time.Hour), install(napt, time.Hour))
	topo.Host.MustRun(t, "nft", "flush", "chain", "inet", "pcpd", "forward")
	if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
		t.Fatalf("Healthy after the damage: %v", err)
	}
	if err := b.Arm(); err != nil {
		t.Fatal(err)
	}
	for _, p := range []pinhole.Pinhole{pin, napt} {
		if b.CutsFlows(p) {
			t.Errorf("Arm over a layout found damaged: CutsFlows(%v) true", p)
		}
	}
	// Nor the checked marks a later start would trust over a layout
	// put back by hand (flows let in unlabelled meanwhile unread).
	for _, chain := range []string{"recheck6", "recheck_nat"} {
		if out := topo.Host.MustRun(t, "nft", "list", "chain", "inet", "pcpd", chain); strings.Contains(out, "pcpd: no flow") {
			t.Errorf("Arm over a layout found damaged marked %s checked:\n%s", chain, out)
		}
	}
	if err := b.Setup(); err != nil {
		t.Fatal(err)
	}
	for _, p := range []pinhole.Pinhole{pin, napt} {
		if !b.CutsFlows(p) {
			t.Errorf("after the repair's Setup: CutsFlows(%v) false", p)
		}
	}
}

// TestSetupDisarmedFailsCutsFlows (review h/revarm, finding 3): attached,
// the admin's "flush ruleset" deletes their table with pcpd's objects in
// it, labelled flows alive, and a Setup before their reload fails
// (ErrNoTable) once it has found the sets gone (disarmed). Nothing in the
// kernel cuts any flow; without the store in setupLocked CutsFlows kept
// the true of the last Setup.
func TestSetupDisarmedFailsCutsFlows(t *testing.T) {
	topo, b := attachedCut(t)
	pin, napt, flows := pinAndNAPT(t, topo, b, 7960)
	checkAttFlows(t, topo.Host, "live", flows)
	for _, p := range []pinhole.Pinhole{pin, napt} {
		if !b.CutsFlows(p) {
			t.Fatalf("CutsFlows(%v) false before the reload: nothing to test", p)
		}
	}
	topo.Host.MustRun(t, "nft", "flush", "ruleset")
	if err := b.Setup(); !errors.Is(err, pinhole.ErrNoTable) {
		t.Fatalf("Setup without the admin's table: %v, want ErrNoTable", err)
	}
	for _, p := range []pinhole.Pinhole{pin, napt} {
		if b.CutsFlows(p) {
			t.Errorf("no table, a Setup that found the sets gone: CutsFlows(%v) true", p)
		}
	}
}

// TestCutSetFlushedWindow (review h/revarm, finding 5): "nft flush set"
// of the IPv6 pinhole set and the NAPT map (their sentinels gone with
// every element), labelled flows alive. The armed re-checks drop both
// flows from the flush on; the repair's Setup found the sets present and
// laid the cut out armed, so they stayed dropped until the re-install.
// Now Setup lays it out disarmed (a set without its sentinel is as one
// made anew): both flows carry data again from the Setup on, and Arm
// after the re-install cuts as before.
func TestCutSetFlushedWindow(t *testing.T) {
	topo, b := guardedTopology(t, pinhole.Config{})
	pin, napt, flows := pinAndNAPT(t, topo, b, 7970)
	checkAttFlows(t, topo.Host, "live", flows)
	topo.Host.MustRun(t, "nft", "flush", "set", "inet", "pcpd", "pin6")
	topo.Host.MustRun(t, "nft", "flush", "map", "inet", "pcpd", "napt4")
	if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
		t.Fatalf("Healthy after the flush: %v", err)
	}
	if err := b.Setup(); err != nil {
		t.Fatal(err)
	}
	if b.Armed() {
		t.Error("Setup over flushed sets with labelled flows alive: armed")
	}
	checkAttFlows(t, topo.Host, "repaired, pinholes not yet re-installed", flows)
	apply(t, b, install(pin, time.Hour), install(napt, time.Hour))
	if err := b.Arm(); err != nil {
		t.Fatal(err)
	}
	if !b.Armed() || !b.CutsFlows(pin) || !b.CutsFlows(napt) {
		t.Errorf("after Arm: Armed %v, CutsFlows %v %v", b.Armed(), b.CutsFlows(pin), b.CutsFlows(napt))
	}
	checkAttFlows(t, topo.Host, "armed", flows)
	apply(t, b, del(pin), del(napt))
	for i := range flows {
		flows[i].cut = true
	}
	checkAttFlows(t, topo.Host, "armed, mappings deleted", flows)
}
