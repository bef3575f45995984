package pinhole_test

import (
	"errors"
	"net/netip"
	"regexp"
	"slices"
	"strings"
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

// TestRefreshInPlace: Install and Refresh set an existing element's
// timeout, on this kernel (which Setup's probe must find updating elements
// in place, Linux ≥ 6.10: two adds, no delete) and with the probe's result
// forced off (the add, delete, add sequence older kernels get, run against
// this real kernel). Either way the same timeout must restart the
// countdown, a longer one lengthen it and a shorter one shorten it, for
// every shape and its SNAT companion, with no extra element left.
func TestRefreshInPlace(t *testing.T) {
	netlab.RequireRoot(t)
	for _, tc := range []struct {
		name    string
		inPlace bool
	}{{"in place", true}, {"re-created", false}} {
		t.Run(tc.name, func(t *testing.T) {
			ns := netlab.NewNS(t, "inplace")
			b := newBackend(t, ns, pinhole.Config{})
			if !b.UpdatesInPlace() {
				t.Fatal("Setup's probe found no in-place timeout update on this kernel (Linux ≥ 6.10 has it)")
			}
			if got := expiries(t, ns); len(got) != 0 {
				t.Fatalf("Setup left %d elements with a timeout (the probe element?)", len(got))
			}
			pinhole.SetUpdatesInPlace(b, tc.inPlace)
			testRefresh(t, ns, b)
		})
	}
}

func testRefresh(t *testing.T, ns *netlab.NS, b *pinhole.Backend) {
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

// TestProbeLeavesNothing: a second Setup (the repair after a failed
// Healthy) keeps the probe's result without probing again, List never
// shows the probe element, and a loopback internal address (the probe's
// key) is refused as a pinhole.
func TestProbeLeavesNothing(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "probe")
	b := newBackend(t, ns, pinhole.Config{})
	if err := b.Setup(); err != nil {
		t.Fatalf("second Setup: %v", err)
	}
	if !b.UpdatesInPlace() {
		t.Fatal("UpdatesInPlace false after a second Setup")
	}
	if got, _ := listPinholes(t, b); len(got) != 0 {
		t.Fatalf("List after Setup: %v", got)
	}
	if out := nftList(t, ns, "table", "inet", "pcpd"); strings.Contains(out, "::1") {
		t.Fatalf("the probe element is still in the table:\n%s", out)
	}
	err := b.Apply([]pinhole.Op{install(pinhole.Pinhole{InternalAddr: netip.IPv6Loopback()}, time.Minute)})
	if !errors.Is(err, pinhole.ErrInvalid) {
		t.Fatalf("Install of a ::1 pinhole: %v, want ErrInvalid", err)
	}
}
