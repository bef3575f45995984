package server

import (
	"net/netip"
	"slices"
	"testing"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/internal/netlab"
)

// TestListenerRenamesAcrossNamespaces (review rev3p of 9304deb): an
// interface leaves pcpd's namespace and comes back (ip link set DEV netns
// X, then back; WireGuard interfaces are moved between namespaces by
// design), keeping its index, under the name of another served
// interface (deleted while away). While it is away LinkByIndex finds no such index, so the
// prune of 9304deb drops its name ↔ index pair as if it were deleted;
// back, its index was served before under another name (the listener's
// first rule: a rename, both names reported), but with the pair pruned
// nothing is reported, and requests arriving under the reused name are
// judged by the ownership's stale view of the interface of that name
// (its peers, not this interface's) until the next WireGuard re-read.
// Reported before 9304deb ([a b]); nothing with it.
func TestListenerRenamesAcrossNamespaces(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "rv3n")
	away := netlab.NewNS(t, "rv3x")
	_, nh := nsHandles(t, ns)
	a, b := netlab.UniqueIfName("rv3a"), netlab.UniqueIfName("rv3b")
	for _, n := range []string{a, b} {
		ns.MustRun(t, "ip", "link", "add", n, "type", "veth", "peer", "name", netlab.UniqueIfName("rv3p"))
	}
	index := func(n string) int {
		t.Helper()
		lnk, err := nh.LinkByName(n)
		if err != nil {
			t.Fatal(err)
		}
		return lnk.Attrs().Index
	}
	bIndex := index(b)
	var got []string
	l := &listener{log: zap.NewNop(), onRename: func(k []string) { got = append(got, k...) }}
	for _, step := range []struct {
		name   string
		do     []*netlab.NS // where each command of cmds runs
		cmds   [][]string
		served []string
		want   []string
	}{
		{"first pass", nil, nil, []string{a, b}, nil},
		{"a and b moved to another namespace", []*netlab.NS{ns, ns},
			[][]string{{"ip", "link", "set", a, "netns", away.Name}, {"ip", "link", "set", b, "netns", away.Name}},
			nil, nil},
		{"b back as a (its index kept)", []*netlab.NS{away, away, away},
			[][]string{{"ip", "link", "del", a}, {"ip", "link", "set", b, "name", a}, {"ip", "link", "set", a, "netns", ns.Name}},
			[]string{a}, []string{a, b}},
	} {
		for i, cmd := range step.cmds {
			step.do[i].MustRun(t, cmd...)
		}
		want := map[netip.AddrPort]link{}
		for i, n := range step.served {
			want[netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, 0, byte(i + 1)}), Port)] = link{name: n, kname: n, index: index(n)}
		}
		if step.name == "b back as a (its index kept)" && index(a) != bIndex {
			t.Skipf("the kernel gave %s index %d back, not %d: no rename to find", a, index(a), bIndex)
		}
		got = nil
		l.renames(nh, want)
		slices.Sort(got)
		if wantRep := slices.Sorted(slices.Values(step.want)); !slices.Equal(got, wantRep) {
			t.Errorf("%s: reported %q, want %q", step.name, got, wantRep)
		}
	}
}
