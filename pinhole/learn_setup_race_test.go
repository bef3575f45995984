package pinhole_test

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestLearnWindowTamper (review4 F4): learnListed reads the owner chains
// back after the last batch of them is committed, and keeps the first
// chain's listing per set of interfaces if its expressions are of the
// right kinds. Setup (run by the server after any tamper it sees, so at
// a time an attacker chooses) rewrites every chain, in transactions of
// 16: the first batch stands in the kernel, unlearnt, while the others
// are written. A chain rewritten by hand then, with the same kinds of
// expressions (here: its limit rule's drop made accept), is learnt: it
// passes Healthy from then on, and every other owner's intact chain fails
// it, so each check rewrites them all (their buckets reset) until the
// next Setup. The attacker here rewrites the first chain in a loop
// (nft -f, flush and add: no handle needed) while Setup runs.
func TestLearnWindowTamper(t *testing.T) {
	ns := netlab.NewNS(t, "learnrace")
	b := newBackend(t, ns, pinhole.Config{Routes: noRoutes{}, Meter: pinhole.Meter{Rate: 200, Burst: 400, Ports: []uint16{5351}}})
	defer b.Teardown()
	var owners []pinhole.Owner
	for i := range 400 {
		owners = append(owners, pinhole.Owner{ID: fmt.Sprintf("wg:peer%d", i),
			Prefixes: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 32)}})
	}
	if err := b.SetOwners(owners, nil); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, n := range pinhole.OwnerChains(owners) {
		names = append(names, n)
	}
	first := slices.Min(names)
	legit := ns.MustRun(t, "nft", "list", "chain", "inet", "pcpd", first)
	counters := regexp.MustCompile(`counter packets \d+ bytes \d+`)
	tampered := counters.ReplaceAllString(legit, "counter")
	tampered = regexp.MustCompile(`(limit rate over [^\n]*counter) drop`).ReplaceAllString(tampered, "$1 accept")
	if tampered == counters.ReplaceAllString(legit, "counter") {
		t.Fatalf("no limit rule to tamper with:\n%s", legit)
	}
	file := filepath.Join(t.TempDir(), "tamper.nft")
	if err := os.WriteFile(file, []byte("flush chain inet pcpd "+first+"\n"+tampered), 0o600); err != nil {
		t.Fatal(err)
	}
	for attempt := range 10 {
		var stop atomic.Bool
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				ns.Run("nft", "-f", file)
			}
		}()
		err := b.Setup()
		stop.Store(true)
		wg.Wait()
		if err != nil {
			t.Fatal(err)
		}
		// The check and its repair, as the server's: twice.
		for range 2 {
			if err := b.Healthy(); err != nil {
				if err := b.RepairOwners(); err != nil {
					t.Fatal(err)
				}
			}
		}
		out := ns.MustRun(t, "nft", "list", "chain", "inet", "pcpd", first)
		herr := b.Healthy()
		if strings.Contains(out, "accept") || herr != nil {
			t.Fatalf("attempt %d: after Setup with %s rewritten by hand meanwhile, then two checks and repairs: Healthy = %v, chain:\n%s",
				attempt, first, herr, out)
		}
	}
}
