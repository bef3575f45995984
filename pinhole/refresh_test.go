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

// jiffy is the kernel clock's granularity that an element's countdown
// may lose against Go's clock: a timeout is counted in whole ticks from
// the tick the update ran in, and read back in whole ticks (two ticks at
// HZ 100, the coarsest Linux build). A clock granularity, not a
// scheduling allowance: time the test spends descheduled is measured,
// not allowed for.
const jiffy = 20 * time.Millisecond

func testRefresh(t *testing.T, ns *netlab.NS, b *pinhole.Backend) {
	// refresh refreshes every shape to d and returns the clock read just
	// before: a countdown restarted by it ends no earlier than that + d.
	refresh := func(d time.Duration) time.Time {
		var ops []pinhole.Op
		for _, p := range everyShape {
			ops = append(ops, pinhole.Op{Kind: pinhole.Refresh, Pinhole: p, Timeout: d})
		}
		before := time.Now()
		apply(t, b, ops...)
		return before
	}
	// check reads every element's countdown and asserts that each was set
	// to d by the refresh that began at from: it ends no earlier than
	// from + d (an element read at a time no later than the clock after
	// the read, so remaining ≥ d − (after − from)), less the nudge an
	// in-place update may leave (pinhole.RefreshNudge: when the element
	// already held d), and no later than d from now (remaining ≤ d). No
	// timing window: however long the box keeps the test from reading, a
	// refreshed element passes. It returns when the read began and ended,
	// what an element not refreshed could show is judged against.
	check := func(what string, from time.Time, d time.Duration) (readStart, readEnd time.Time) {
		t.Helper()
		got, _ := listPinholes(t, b)
		want := append([]pinhole.Pinhole(nil), everyShape...)
		slices.SortFunc(want, sortPinholes)
		if diff := cmp.Diff(want, got, cmpAddr, cmpPrefix, cmpOdd); diff != "" {
			t.Fatalf("%s: pinholes (-want +got):\n%s", what, diff)
		}
		readStart = time.Now()
		ds := expiries(t, ns)
		readEnd = time.Now()
		if len(ds) < len(everyShape) {
			t.Fatalf("%s: %d elements with a countdown, want at least %d", what, len(ds), len(everyShape))
		}
		lo := d - pinhole.RefreshNudge - readEnd.Sub(from) - jiffy
		for _, r := range ds {
			if r < lo || r > d {
				t.Errorf("%s: an element expires in %v, want within [%v, %v] (refreshed to %v, read %v after the refresh began)",
					what, r, lo, d, d, readEnd.Sub(from).Round(time.Millisecond))
			}
		}
		return readStart, readEnd
	}
	var ins []pinhole.Op
	for _, p := range everyShape {
		ins = append(ins, install(p, 3*time.Second))
	}
	// The same timeout: only an update restarts the countdown. An element
	// left alone ends at most 3 s after the install returned; the check
	// tells it from a refreshed one only if the refresh came later than
	// that by more than the read's own length (the element is read at
	// some moment between its start and end), the nudge and a jiffy
	// either side: on a box loaded enough to stretch the read past the
	// 1.5 s wait, install and wait again.
	const tries = 3
	for try := 1; ; try++ {
		apply(t, b, ins...)
		installed := time.Now()
		time.Sleep(1500 * time.Millisecond)
		from := refresh(3 * time.Second)
		readStart, readEnd := check("same timeout", from, 3*time.Second)
		if t.Failed() || readEnd.Sub(readStart)+pinhole.RefreshNudge+2*jiffy < from.Sub(installed) {
			break
		}
		if try == tries {
			t.Fatalf("same timeout: reading the countdowns took longer (%v, last) than the wait between install and refresh in %d tries: the box is too loaded to tell a restarted countdown from one left alone",
				readEnd.Sub(readStart), tries)
		}
		t.Logf("same timeout, try %d: the read took %v, the refresh came %v after the install: cannot tell; again",
			try, readEnd.Sub(readStart), from.Sub(installed))
	}
	check("lengthened", refresh(time.Hour), time.Hour)
	check("1h again", refresh(time.Hour), time.Hour) // at once: the element already holds exactly 1h
	check("shortened", refresh(5*time.Second), 5*time.Second)
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
