package server

import (
	"net/netip"
	"slices"
	"testing"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/internal/netlab"
)

// TestListenerRenames (review of the F3 fix, h/revown): the listener
// reports to onRename the kernel names a rename of a served interface
// concerns (policy.WireGuard then refuses them until it has re-read the
// interfaces by their new names), and nothing for a re-created interface
// (its old index gone: a new device, read by its name) or the first pass;
// to onDevice (h/swapev) every name whose device is not the one served
// before, renamed, re-created or deleted.
// Each step is one resync's served interfaces, as kernel name → the
// interface it is now (by the step's own link names).
func TestListenerRenames(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "fo2r")
	away := netlab.NewNS(t, "fo2x")
	_, nh := nsHandles(t, ns)
	a, b, c := netlab.UniqueIfName("fo2a"), netlab.UniqueIfName("fo2b"), netlab.UniqueIfName("fo2c")
	tmp := netlab.UniqueIfName("fo2t")
	// veth pairs (the box may lack the dummy module); the peers are
	// never served.
	veth := func(n string) []string {
		return []string{"ip", "link", "add", n, "type", "veth", "peer", "name", netlab.UniqueIfName("fo2p")}
	}
	ns.MustRun(t, veth(a)...)
	ns.MustRun(t, veth(b)...)
	var got, devs, gone []string
	l := &listener{log: zap.NewNop(), onRename: func(k []string) { got = append(got, k...) },
		onDevice: func(k []string, g bool) {
			if g {
				gone = append(gone, k...)
			} else {
				devs = append(devs, k...)
			}
		}}
	pass := func(served ...string) {
		t.Helper()
		want := map[netip.AddrPort]link{}
		for i, n := range served {
			lnk, err := nh.LinkByName(n)
			if err != nil {
				t.Fatal(err)
			}
			want[netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, 0, byte(i + 1)}), Port)] = link{name: n, kname: n, index: lnk.Attrs().Index}
		}
		got, devs, gone = nil, nil, nil
		l.renames(nh, want)
		slices.Sort(got)
	}
	// devs and gone (h/swapev): onDevice's reports, the names whose
	// device is not the one served before (the ownership's view of them
	// judges no request that opens a pinhole until it is read again):
	// every rename, a re-created interface (before, reported nowhere:
	// its first requests were judged by the old device's peers,
	// TestE2EWireGuardDeviceSwapWithinBound), a deleted one (once).
	for _, step := range []struct {
		name       string
		do         [][]string // ip commands, run first
		served     []string
		want       []string
		devs, gone []string
	}{
		{"first pass", nil, []string{a, b}, nil, nil, nil},
		{"unchanged", nil, []string{a, b}, nil, nil, nil},
		{"a and b trade names", [][]string{
			{"ip", "link", "set", a, "name", tmp}, {"ip", "link", "set", b, "name", a}, {"ip", "link", "set", tmp, "name", b},
		}, []string{a, b}, []string{a, b}, []string{a, b}, nil},
		{"unchanged after the trade", nil, []string{a, b}, nil, nil, nil},
		{"b renamed to c (c served)", [][]string{{"ip", "link", "set", b, "name", c}}, []string{a, c}, []string{b, c}, []string{b, c}, nil},
		{"a re-created (old index gone)", [][]string{{"ip", "link", "del", a}, veth(a)}, []string{a, c}, nil, []string{a}, nil},
		{"c renamed to a (a's interface renamed away, unserved)", [][]string{
			{"ip", "link", "set", a, "name", tmp}, {"ip", "link", "set", c, "name", a},
		}, []string{a}, []string{a, c}, []string{a, c}, nil},
		{"a down (not served, the same index)", [][]string{{"ip", "link", "set", a, "down"}}, nil, nil, nil, nil},
		{"a up again (the same index)", [][]string{{"ip", "link", "set", a, "up"}}, []string{a}, nil, nil, nil},
		{"a deleted", [][]string{{"ip", "link", "del", a}}, nil, nil, nil, []string{a}},
		{"a still gone", nil, nil, nil, nil, nil},
		{"a created again", [][]string{veth(a)}, []string{a}, nil, []string{a}, nil},
		// h/swap2: a served name found deleted and served again on the
		// same index (moved to another namespace and back) is reported
		// again; before, only deleted (TestE2EWireGuardDeviceBackFromNamespace).
		{"a moved to another namespace", [][]string{{"ip", "link", "set", a, "netns", away.Name}}, nil, nil, nil, []string{a}},
		{"a back on its index, down", [][]string{{"ip", "-n", away.Name, "link", "set", a, "netns", ns.Name}}, nil, nil, nil, nil},
		{"a served again on its index", [][]string{{"ip", "link", "set", a, "up"}}, []string{a}, nil, []string{a}, nil},
		{"unchanged after the return", nil, []string{a}, nil, nil, nil},
	} {
		for _, cmd := range step.do {
			ns.MustRun(t, cmd...)
		}
		pass(step.served...)
		slices.Sort(devs)
		slices.Sort(gone)
		if !slices.Equal(got, step.want) || !slices.Equal(devs, step.devs) || !slices.Equal(gone, step.gone) {
			t.Errorf("%s: reported renamed %q, changed %q, deleted %q; want %q, %q, %q", step.name, got, devs, gone, step.want, step.devs, step.gone)
		}
	}
	if len(l.byIndex) > len(l.byName) {
		t.Errorf("byIndex holds %d pairs, byName %d: stale pairs kept", len(l.byIndex), len(l.byName))
	}
}
