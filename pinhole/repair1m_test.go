package pinhole_test

import (
	"errors"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pinhole"
)

// TestPreparedSetupVoidedReadsNothingLocked (root; h/repair1m): the
// server's repair calls PrepareSetup (conntrack read without any lock),
// then takes its engine lock and calls Setup. A write of the layout in
// between (here SetProtected with the same prefixes, as the engine's
// updateProtected on a WireGuard peer's change; SetServed, SetOwners and
// a route's change likewise move the Backend's generation) voids
// PrepareSetup's answers, and Setup read conntrack again itself: with
// the caller's lock held (the whole table when no flow matches: ≈ 1.5 s
// at 1 000 000 entries with every request waiting), and under the
// Backend's lock too when the layout moved again before it took it. Now
// such a Setup reads nothing: it lays the cut that is not intact out
// disarmed (the repair arms after its re-install) and leaves the checks
// for flows let in unlabelled to VerifySetup, which the repair calls
// with its lock let go. Rows: no such flow (after Arm and VerifySetup:
// armed, CutsFlows, recheck6 marked, as after a repair that was not
// voided); a connection let in unlabelled by the damaged layout (guard6
// flushed) during the wait (VerifySetup sees it: CutsFlows false,
// recheck6 unmarked, as TestPreparedSetupSeesUnlabelledFlow). No
// timing. Fails without the fix: "reads with the caller's lock held:
// [pin dnat]" in both rows.
func TestPreparedSetupVoidedReadsNothingLocked(t *testing.T) {
	for _, flow := range []bool{false, true} {
		name := "no flow"
		if flow {
			name = "flow let in unlabelled"
		}
		t.Run(name, func(t *testing.T) {
			topo, b, client, p := guardedPinhole(t, 7395)
			var engine sync.Mutex // the server's s.mu
			var mu sync.Mutex
			var reads, locked []string
			defer pinhole.OnSetupReads(func(what string, bLocked bool) {
				free := engine.TryLock()
				if free {
					engine.Unlock()
				}
				mu.Lock()
				defer mu.Unlock()
				reads = append(reads, what)
				if !free || bLocked {
					locked = append(locked, what)
				}
			})()
			what := []string{"set", "inet", "pcpd", "pin6"}
			if flow {
				what = []string{"chain", "inet", "pcpd", "guard6"}
			}
			topo.Host.MustRun(t, append([]string{"nft", "flush"}, what...)...)
			if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
				t.Fatalf("Healthy after the flush of %v: %v", what, err)
			}
			b.PrepareSetup()
			if len(reads) == 0 {
				t.Fatal("PrepareSetup read nothing: nothing to test")
			}
			var f *echoFlow
			if flow {
				f = openEcho(t, tcp, topo.Client, topo.Internet, netip.AddrPortFrom(topo.InternetV6, 47395), client)
			}
			// The write between, then the repair's Setup under its lock.
			if err := b.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
				t.Fatal(err)
			}
			engine.Lock()
			n := len(reads)
			err := b.Setup()
			during := reads[n:]
			if !flow {
				apply(t, b, install(p, time.Hour)) // the re-install
			}
			if aerr := b.Arm(); aerr != nil {
				t.Error(aerr)
			}
			engine.Unlock()
			if err != nil {
				t.Fatal(err)
			}
			mu.Lock()
			if len(locked) > 0 {
				t.Errorf("reads with the caller's lock held: %v", locked)
			}
			mu.Unlock()
			t.Logf("reads by Setup: %v", during)
			b.VerifySetup() // the server, its lock let go
			if !flow {
				cuts, marked := b.CutsFlows(p), markedChecked(t, topo.Host, "recheck6")
				if !b.Armed() || !cuts || !marked {
					t.Errorf("after the repair and VerifySetup: Armed %v, CutsFlows %v, recheck6 marked %v; want all true", b.Armed(), cuts, marked)
				}
				return
			}
			checkUnlabelledCut(t, topo.Host, b, p, f, "after the repair, yet the connection let in unlabelled during it")
		})
	}
}
