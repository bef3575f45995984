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
// (its old index gone: a new device, read by its name) or the first pass.
// Each step is one resync's served interfaces, as kernel name → the
// interface it is now (by the step's own link names).
func TestListenerRenames(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "fo2r")
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
	var got []string
	l := &listener{log: zap.NewNop(), onRename: func(k []string) { got = append(got, k...) }}
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
		got = nil
		l.renames(nh, want)
		slices.Sort(got)
	}
	for _, step := range []struct {
		name   string
		do     [][]string // ip commands, run first
		served []string
		want   []string
	}{
		{"first pass", nil, []string{a, b}, nil},
		{"unchanged", nil, []string{a, b}, nil},
		{"a and b trade names", [][]string{
			{"ip", "link", "set", a, "name", tmp}, {"ip", "link", "set", b, "name", a}, {"ip", "link", "set", tmp, "name", b},
		}, []string{a, b}, []string{a, b}},
		{"unchanged after the trade", nil, []string{a, b}, nil},
		{"b renamed to c (c served)", [][]string{{"ip", "link", "set", b, "name", c}}, []string{a, c}, []string{b, c}},
		{"a re-created (old index gone)", [][]string{{"ip", "link", "del", a}, veth(a)}, []string{a, c}, nil},
		{"c renamed to a (a's interface renamed away, unserved)", [][]string{
			{"ip", "link", "set", a, "name", tmp}, {"ip", "link", "set", c, "name", a},
		}, []string{a}, []string{a, c}},
	} {
		for _, cmd := range step.do {
			ns.MustRun(t, cmd...)
		}
		pass(step.served...)
		if !slices.Equal(got, step.want) {
			t.Errorf("%s: reported %q, want %q", step.name, got, step.want)
		}
	}
	if len(l.byIndex) > len(l.byName) {
		t.Errorf("byIndex holds %d pairs, byName %d: stale pairs kept", len(l.byIndex), len(l.byName))
	}
}
