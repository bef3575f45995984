package pinhole_test

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestProtectedPartialFailure (review of 2026-12-03, h/review2 finding 3):
// a SetProtected that fails part way leaves the sets holding a mix of the
// old and the new prefixes. Before, the Backend kept the old list, so
// Healthy reported the mix as damage of the kind only a full repair
// fixes; Setup then wrote the old list back (the new clients the failed
// call had guarded lost their guard: here protected6's new prefixes), and
// the server re-installed every lease and gave the new list again, every
// check (5 s) for as long as the failure lasted. Now the new list is
// adopted: Healthy reports the difference wrapping ErrProtected (the
// caller retries RepairProtected alone, no re-install), a Setup meanwhile
// keeps the new prefixes and restores the rest, and once the sets can be
// written one RepairProtected brings them to the new list.
func TestProtectedPartialFailure(t *testing.T) {
	for _, tc := range []struct {
		name      string
		old, new  []netip.Prefix
		fail      string // the set whose writes fail
		skip      int    // after this many transactions of it
		landedNew []netip.Prefix
	}{
		{"protected4 fails, protected6 written",
			manyProtected(20, 0), manyProtected(20, 100), "protected4", 0, v6Only(manyProtected(20, 100))},
		{"second transaction of protected6 fails",
			manyProtected(1200, 0), manyProtected(1200, 5000), "protected6", 1, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := netlab.NewNS(t, "protpart")
			b := newBackend(t, ns, pinhole.Config{Meter: pinhole.Meter{Rate: 200}})
			if err := b.SetProtected(tc.old); err != nil {
				t.Fatal(err)
			}
			restore := pinhole.FailProtectedWrites(b, tc.fail, tc.skip)
			defer restore()
			if err := b.SetProtected(tc.new); !errors.Is(err, pinhole.ErrProtected) {
				t.Fatalf("SetProtected with %s failing: %v, want ErrProtected", tc.fail, err)
			}
			mixed := mustProtected(t, b)
			if slices.Equal(sortedPrefixes(mixed), sortedPrefixes(tc.old)) {
				t.Fatalf("the failing SetProtected wrote nothing: not a partial failure")
			}
			// Three checks while the failure lasts (pcpd: 15 s): each
			// reports the protected sets alone, whose repair fails again.
			for round := range 3 {
				err := b.Healthy()
				if !errors.Is(err, pinhole.ErrProtected) || errors.Is(err, pinhole.ErrOwnerMeter) {
					t.Fatalf("round %d: Healthy = %v, want an error wrapping ErrProtected alone (a partial repair)", round, err)
				}
				if err := b.RepairProtected(); !errors.Is(err, pinhole.ErrProtected) {
					t.Fatalf("round %d: RepairProtected while failing = %v, want ErrProtected", round, err)
				}
			}
			// A full repair meanwhile (another object damaged): it
			// restores the layout, keeps every new prefix that landed,
			// and reports the protected sets apart.
			ns.MustRun(t, "nft", "flush", "set", "inet", "pcpd", "pin6")
			if err := b.Setup(); !errors.Is(err, pinhole.ErrProtected) {
				t.Fatalf("Setup while the protected sets cannot be written: %v, want ErrProtected", err)
			}
			after := mustProtected(t, b)
			for _, p := range tc.landedNew {
				if !slices.Contains(after, p) {
					t.Fatalf("Setup uncovered %v, a new prefix the failed SetProtected had guarded (the old list written back)", p)
				}
			}
			if err := b.Healthy(); !errors.Is(err, pinhole.ErrProtected) {
				t.Fatalf("Healthy after Setup = %v, want ErrProtected alone", err)
			}
			restore()
			if err := b.RepairProtected(); err != nil {
				t.Fatalf("RepairProtected once writable: %v", err)
			}
			if err := b.Healthy(); err != nil {
				t.Fatalf("Healthy after RepairProtected: %v", err)
			}
			if got := mustProtected(t, b); fmt.Sprint(sortedPrefixes(got)) != fmt.Sprint(sortedPrefixes(tc.new)) {
				t.Errorf("after the repair the kernel holds %d prefixes, not the %d given last", len(got), len(tc.new))
			}
		})
	}
}

func v6Only(ps []netip.Prefix) []netip.Prefix {
	return slices.DeleteFunc(slices.Clone(ps), func(p netip.Prefix) bool { return p.Addr().Is4() })
}
