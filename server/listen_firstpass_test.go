package server

import (
	"net/netip"
	"slices"
	"testing"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/internal/netlab"
)

// TestListenerFirstPassDevices (review h/revsw, the start-up window): on
// its first pass the listener reports to onDevice every served kernel
// name whose index is not the one the ownership's first read found
// (firstIndex: another index, or unknown), and no other; later passes
// do not ask firstIndex again. Without firstIndex nothing is reported,
// as before (TestListenerRenames' first pass).
func TestListenerFirstPassDevices(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "fpd")
	_, nh := nsHandles(t, ns)
	names := []string{netlab.UniqueIfName("fpda"), netlab.UniqueIfName("fpdb"), netlab.UniqueIfName("fpdc")}
	want := map[netip.AddrPort]link{}
	index := map[string]int{}
	for i, n := range names {
		ns.MustRun(t, "ip", "link", "add", n, "type", "veth", "peer", "name", netlab.UniqueIfName("fpdp"))
		lnk, err := nh.LinkByName(n)
		if err != nil {
			t.Fatal(err)
		}
		index[n] = lnk.Attrs().Index
		// Two addresses of each: one report per name.
		for j := range 2 {
			want[netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i), byte(j + 1)}), Port)] = link{name: n, kname: n, index: index[n]}
		}
	}
	a, b, c := names[0], names[1], names[2]
	for _, tc := range []struct {
		name  string
		first map[string]int // the ownership's first read; nil: no firstIndex
		want  []string
	}{
		{"no firstIndex", nil, nil},
		{"all as read", map[string]int{a: index[a], b: index[b], c: index[c]}, nil},
		{"b swapped, c unknown", map[string]int{a: index[a], b: index[b] + 1000}, []string{b, c}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			asked := 0
			l := &listener{log: zap.NewNop(), onDevice: func(k []string, gone bool) {
				if gone {
					t.Errorf("onDevice(%v, gone)", k)
				}
				got = append(got, k...)
			}}
			if tc.first != nil {
				l.firstIndex = func(k string) (int, bool) {
					asked++
					i, ok := tc.first[k]
					return i, ok
				}
			}
			l.renames(nh, want)
			slices.Sort(got)
			if !slices.Equal(got, tc.want) {
				t.Errorf("first pass reported %v, want %v", got, tc.want)
			}
			got, asked = nil, 0
			l.renames(nh, want)
			if len(got) != 0 || asked != 0 {
				t.Errorf("second pass reported %v, asked firstIndex %d times; want nothing", got, asked)
			}
		})
	}
}
