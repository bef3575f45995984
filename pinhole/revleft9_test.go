package pinhole_test

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pinhole"
)

// TestPreparedSetupSeesUnlabelledFlow (root; review h/revleft9): the
// server's repair calls PrepareSetup, then waits for its engine lock,
// then calls Setup. PrepareSetup's read of conntrack for flows admitted
// unlabelled (pinFlowsUnlabelled: asked because Healthy found damage)
// is a moment older than the layout Setup writes: a connection the
// damaged layout (guard6 flushed: the forward chain's accept) lets in
// during that wait is not in it. Setup then took "none", said CutsFlows
// true and marked recheck6 checked, yet the ruleset never cuts that
// connection (it carries no label): after its pinhole's delete it still
// carried data, and a reply to that delete would not have waited for the
// walk. Fixed: such a "none" is read again over the written layout
// (VerifySetup) before CutsFlows says true. Row "Setup alone" is the control (its own read right before the
// layout sees the flow: CutsFlows false, as before h/left9).
func TestPreparedSetupSeesUnlabelledFlow(t *testing.T) {
	for _, prepared := range []bool{false, true} {
		name := "Setup alone"
		if prepared {
			name = "PrepareSetup, flow, Setup"
		}
		t.Run(name, func(t *testing.T) {
			topo, b, client, p := guardedPinhole(t, 7391)
			topo.Host.MustRun(t, "nft", "flush", "chain", "inet", "pcpd", "guard6")
			if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
				t.Fatalf("Healthy after the flush of guard6: %v", err)
			}
			if prepared {
				b.PrepareSetup() // the repair, before it takes the engine lock
			}
			// Meanwhile (the engine held its lock) a connection comes in
			// through the damaged layout: unlabelled.
			f := openEcho(t, tcp, topo.Client, topo.Internet, netip.AddrPortFrom(topo.InternetV6, 47391), client)
			if err := b.Setup(); err != nil {
				t.Fatal(err)
			}
			b.VerifySetup() // the server, its lock let go
			checkUnlabelledCut(t, topo.Host, b, p, f, "after the repair, yet the connection let in unlabelled during it")
		})
	}
}

// TestPreparedSetupSparesFlowLabelledDuringWait (root; review
// h/revleft9): PrepareSetup's read of labelled flows (whether to lay the
// cut out disarmed over re-checked sets that lost their elements) is
// older than the layout by the repair's wait for its engine lock. A set
// flushed (no flow yet: the read says none), then, during the wait, an
// element put back (a renewal), a connection through it (labelled), and
// the set flushed again (a second reload): Setup laid the cut out armed
// over the empty set, and the live connection was dropped until the
// re-install. Row "Setup alone" is the control (its own read sees the
// labelled flow: disarmed). Fixed: a Setup that takes PrepareSetup's
// answers lays a cut that is not intact out disarmed without reading
// (the repair arms it after its re-install, as over labelled flows).
func TestPreparedSetupSparesFlowLabelledDuringWait(t *testing.T) {
	for _, prepared := range []bool{false, true} {
		name := "Setup alone"
		if prepared {
			name = "PrepareSetup, flow, Setup"
		}
		t.Run(name, func(t *testing.T) {
			topo, b, client, p := guardedPinhole(t, 7392)
			flush := func() { topo.Host.MustRun(t, "nft", "flush", "set", "inet", "pcpd", "pin6") }
			flush()
			if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
				t.Fatalf("Healthy after the flush of pin6: %v", err)
			}
			if prepared {
				b.PrepareSetup()
			}
			apply(t, b, install(p, time.Hour)) // a renewal meanwhile
			f := openEcho(t, tcp, topo.Client, topo.Internet, netip.AddrPortFrom(topo.InternetV6, 47392), client)
			flush() // a second reload
			setupSparesThenCuts(t, b, p, f, "repaired")
		})
	}
}
