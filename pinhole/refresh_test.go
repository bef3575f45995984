package pinhole_test

import (
	"regexp"
	"slices"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// expiries lists the countdown of every element with a timeout in pcpd's
// table, SNAT companions included (List shows only the pinhole sets).
func expiries(t *testing.T, ns *netlab.NS) []time.Duration {
	t.Helper()
	out := nftList(t, ns, "table", "inet", "pcpd")
	var ds []time.Duration
	for _, m := range regexp.MustCompile(`expires ([0-9a-z]+)`).FindAllStringSubmatch(out, -1) {
		d, err := time.ParseDuration(m[1])
		if err != nil {
			t.Fatalf("expiry %q: %v", m[1], err)
		}
		ds = append(ds, d)
	}
	return ds
}

// TestRefreshInPlace: Install and Refresh update an existing element in
// place (two adds, no delete). On this kernel that must restart the
// countdown when the timeout is unchanged, lengthen it, and shorten it, for
// every shape and its SNAT companion, and leave no extra element.
func TestRefreshInPlace(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "inplace")
	b := newBackend(t, ns, pinhole.Config{})
	refresh := func(d time.Duration) {
		var ops []pinhole.Op
		for _, p := range everyShape {
			ops = append(ops, pinhole.Op{Kind: pinhole.Refresh, Pinhole: p, Timeout: d})
		}
		apply(t, b, ops...)
	}
	check := func(what string, lo, hi time.Duration) {
		t.Helper()
		got, _ := listPinholes(t, b)
		want := append([]pinhole.Pinhole(nil), everyShape...)
		slices.SortFunc(want, sortPinholes)
		if diff := cmp.Diff(want, got, cmpAddr, cmpPrefix); diff != "" {
			t.Fatalf("%s: pinholes (-want +got):\n%s", what, diff)
		}
		ds := expiries(t, ns)
		if len(ds) < len(everyShape) {
			t.Fatalf("%s: %d elements with a countdown, want at least %d", what, len(ds), len(everyShape))
		}
		for _, d := range ds {
			if d < lo || d > hi {
				t.Errorf("%s: an element expires in %v, want within [%v, %v]", what, d, lo, hi)
			}
		}
	}
	var ins []pinhole.Op
	for _, p := range everyShape {
		ins = append(ins, install(p, 3*time.Second))
	}
	apply(t, b, ins...)
	time.Sleep(1500 * time.Millisecond)
	refresh(3 * time.Second) // the same timeout: only an update restarts the countdown
	check("same timeout", 2700*time.Millisecond, 3*time.Second)
	refresh(time.Hour)
	check("lengthened", time.Hour-time.Minute, time.Hour)
	refresh(time.Hour) // and again at once: the element already holds exactly 1h
	check("1h again", time.Hour-time.Minute, time.Hour)
	refresh(5 * time.Second)
	check("shortened", 4*time.Second, 5*time.Second)
	refresh(15 * time.Millisecond) // too short to nudge: re-created
	time.Sleep(100 * time.Millisecond)
	if got, _ := listPinholes(t, b); len(got) != 0 {
		t.Fatalf("after a 15 ms refresh and 100 ms: %v", got)
	}
}
