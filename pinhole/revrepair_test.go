package pinhole_test

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pinhole"
)

// TestRepairSeesFlowLetInWhileTableGone (root; review h/revrepair): an
// admin's reload ("flush ruleset", here "delete table inet pcpd")
// removes pcpd's table, and until the repair (the next firewall check)
// nothing of pcpd's filters the forward hook: a connection from the
// Internet to a client comes in unlabelled, as through a flushed guard6.
// The Setup after a Healthy that found damage reads conntrack for such
// flows (recheckFlows), but only over a layout that exists (existing()):
// over the deleted table it asked nothing, and after the re-install and
// Arm CutsFlows said true while the connection, never labelled, carried
// data after its pinhole's delete (the server answered the delete
// without the walk). Rows: the repair's path (PrepareSetup, Setup,
// re-install, Arm, VerifySetup; voided answers, h/repair1m's
// unreadLocked, ask the same) and a Setup on its own. No timing.
func TestRepairSeesFlowLetInWhileTableGone(t *testing.T) {
	for _, row := range []string{"Setup alone", "prepared"} {
		t.Run(row, func(t *testing.T) {
			topo, b, client, p := guardedPinhole(t, 7397)
			// The admin's own ruleset, which a reload loads again with
			// the flush: its ct rule keeps conntrack tracking the host's
			// traffic (the kernel registers conntrack's hooks in a
			// namespace only while a rule uses them) after pcpd's table
			// goes.
			topo.Host.MustRun(t, "nft", "add", "table", "inet", "admin")
			topo.Host.MustRun(t, "nft", "add", "chain", "inet", "admin", "afwd", "{ type filter hook forward priority 10; policy accept; }")
			topo.Host.MustRun(t, "nft", "add", "rule", "inet", "admin", "afwd", "ct", "state", "invalid", "drop")
			topo.Host.MustRun(t, "nft", "delete", "table", "inet", "pcpd")
			if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
				t.Fatalf("Healthy after the table's delete: %v", err)
			}
			// The reload's window: nothing of pcpd's filters.
			f := openEcho(t, tcp, topo.Client, topo.Internet, netip.AddrPortFrom(topo.InternetV6, 47397), client)
			if row != "Setup alone" {
				b.PrepareSetup()
			}
			if err := b.Setup(); err != nil {
				t.Fatal(err)
			}
			apply(t, b, install(p, time.Hour)) // the re-install
			if err := b.Arm(); err != nil {
				t.Fatal(err)
			}
			b.VerifySetup() // the server, its lock let go
			checkUnlabelledCut(t, topo.Host, b, p, f, "after the repair, yet the connection let in while the table was gone")
		})
	}
}

// TestRepairProtectedSeesFlowLetInUnguarded (root; review h/revrepair):
// the entry chain sends a packet to guard6 only when its destination is
// in protected6 ("ip6 daddr @protected6 goto guard6"). A protected6
// flushed ("nft flush set inet pcpd protected6", a reload that re-made
// the set) lets a connection from the Internet to a client in through
// the forward chain's accept, unlabelled, as a flushed guard6 does. Yet
// Healthy reports that damage as the protected sets' alone (ErrProtected:
// the server repairs it with RepairProtected, no Setup), which noteDamage
// took as harmless to the cut: CutsFlows stayed true and the connection,
// never labelled, carried data after its pinhole's delete (the server
// answered the delete without the walk). No timing.
func TestRepairProtectedSeesFlowLetInUnguarded(t *testing.T) {
	topo, b, client, p := guardedPinhole(t, 7398)
	topo.Host.MustRun(t, "nft", "flush", "set", "inet", "pcpd", "protected6")
	f := openEcho(t, tcp, topo.Client, topo.Internet, netip.AddrPortFrom(topo.InternetV6, 47398), client)
	repairProtected6(t, b)
	checkUnlabelledCut(t, topo.Host, b, p, f, "after the repair of protected6, yet the connection let in unguarded")
}

// TestRepairProtectedCutsAgainAfterVerify (root): the control of
// TestRepairProtectedSeesFlowLetInUnguarded: with no flow let in while
// protected6 was flushed, VerifySetup after the repair finds none and
// CutsFlows is true again, recheck6 marked.
func TestRepairProtectedCutsAgainAfterVerify(t *testing.T) {
	topo, b, _, p := guardedPinhole(t, 7399)
	topo.Host.MustRun(t, "nft", "flush", "set", "inet", "pcpd", "protected6")
	repairProtected6(t, b)
	if !b.CutsFlows(p) || !markedChecked(t, topo.Host, "recheck6") {
		t.Errorf("no flow let in: CutsFlows %v, recheck6 marked %v after VerifySetup; want both true", b.CutsFlows(p), markedChecked(t, topo.Host, "recheck6"))
	}
}

// repairProtected6 is the server's repair of a flushed protected6:
// Healthy finds the protected sets' damage alone (ErrProtected), the
// repair is RepairProtected (repairPartial, no Setup), then the next
// check finds the layout healthy and calls VerifySetup.
func repairProtected6(t *testing.T, b *pinhole.Backend) {
	t.Helper()
	if err := b.Healthy(); !errors.Is(err, pinhole.ErrProtected) {
		t.Fatalf("Healthy after the flush of protected6: %v, want ErrProtected", err)
	}
	if err := b.RepairProtected(); err != nil {
		t.Fatal(err)
	}
	if err := b.Healthy(); err != nil {
		t.Fatalf("Healthy after RepairProtected: %v", err)
	}
	b.VerifySetup()
}

// TestPreparedSetupVoidedSparesLabelledFlow (root; review h/revrepair):
// TestPreparedSetupVoidedReadsNothingLocked's "no flow" row checks the
// voided path reads nothing and ends armed, but not that it lays a cut
// that is not intact out disarmed (unreadLocked's labelled = true, which
// checkDisarm now trusts whatever the bits): with no labelled flow alive
// an armed layout passes it too. Here a connection labelled through its
// pinhole lives when pin6 is flushed; PrepareSetup, a write of the layout
// (voiding its answers), Setup: the connection must go on until the
// re-install and Arm, and be cut after its pinhole's delete. Shown
// failing with unreadLocked's labelled left false (the connection
// dropped at Setup). No timing.
func TestPreparedSetupVoidedSparesLabelledFlow(t *testing.T) {
	topo, b, client, p := guardedPinhole(t, 7400)
	f := openEcho(t, tcp, topo.Client, topo.Internet, netip.AddrPortFrom(topo.InternetV6, 47400), client)
	topo.Host.MustRun(t, "nft", "flush", "set", "inet", "pcpd", "pin6")
	if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
		t.Fatalf("Healthy after the flush of pin6: %v", err)
	}
	b.PrepareSetup()
	if err := b.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
		t.Fatal(err)
	}
	setupSparesThenCuts(t, b, p, f, "repaired (voided PrepareSetup)")
}
