package pinhole_test

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/pcpd/pcpd/pinhole"
)

// TestFlowedSmallSetDumped (root, namespace; h/flushone): a walk that
// asks about many addresses while flowed6 holds few is answered by one
// dump of the set (flowedsmall.go), with exactly the answers the
// lookups give: a present address reported absent would leave a walk
// out while a flow to it lives on past its pinhole. Not when the set
// counts more than flowedDumpMax or flowedDumpPer an address asked, nor
// for fewer than flowedDumpMin asked: the lookups, as before. Before,
// every case looked each address up (900 answers read for 900 asked
// over a set of 5).
func TestFlowedSmallSetDumped(t *testing.T) {
	topo, be := guardedTopology(t, pinhole.Config{})
	if n, ok := pinhole.FlowedSetCount(be); !ok || n < 0 {
		t.Skipf("the kernel gives no set count (NFTA_SET_COUNT, Linux 6.16): %v %v", n, ok)
	}
	filled := 0
	for _, tc := range []struct {
		inSet, asked int
		dumped       bool
	}{
		{0, 900, true},
		{5, 900, true},
		{300, 900, true},
		{300, 80, true}, // 300 <= 4 x 80
		{300, 70, false},
		{300, 40, false}, // fewer than flowedDumpMin
		{512, 900, true},
		{513, 900, false}, // more than flowedDumpMax
	} {
		t.Run(fmt.Sprintf("set=%d/asked=%d", tc.inSet, tc.asked), func(t *testing.T) {
			if tc.inSet < filled {
				t.Fatal("cases must grow the set")
			}
			fillFlowedFrom(t, topo.Host, filled, tc.inSet)
			filled = tc.inSet
			if n, _ := pinhole.FlowedSetCount(be); n != tc.inSet {
				t.Fatalf("flowed6 counts %d, want %d", n, tc.inSet)
			}
			lookedUp, dumps := 0, 0
			defer pinhole.SetFlowedRecvHook(func(_ string, n int) { lookedUp += n })()
			defer pinhole.SetFlowedDumpHook(func(count int, whole bool) {
				dumps++
				if count != tc.inSet || !whole {
					t.Errorf("dump at count %d whole %v, want %d true", count, whole, tc.inSet)
				}
			})()
			want := map[netip.Addr]bool{}
			var asked []netip.Addr
			for i := range tc.asked {
				// Every other one of the set's (from its end), the
				// rest outside it; one asked twice.
				a := netip.MustParseAddr(fmt.Sprintf("2001:db8:fe00::%x", i))
				if i%2 == 0 && i/2 < tc.inSet {
					j := tc.inSet - 1 - i/2
					a = netip.MustParseAddr(fmt.Sprintf("2001:db8:ff00::%x:%x", j>>16, j&0xffff))
					want[a] = true
				}
				asked = append(asked, a)
			}
			asked = append(asked, asked[0], netip.MustParseAddr("192.0.2.1"))
			want[netip.MustParseAddr("192.0.2.1")] = true
			flowed, ok := be.FlowedAddrs(asked...)
			if !ok {
				t.Fatal("FlowedAddrs untrusted")
			}
			if tc.dumped && (dumps != 1 || lookedUp != 0) {
				t.Errorf("%d dumps, %d lookups' answers read; want one dump, no lookup", dumps, lookedUp)
			}
			if !tc.dumped && (dumps != 0 || lookedUp != tc.asked) {
				t.Errorf("%d dumps, %d lookups' answers read; want none, %d", dumps, lookedUp, tc.asked)
			}
			for _, a := range asked {
				if got := flowed(a); got != want[a] {
					t.Errorf("flowed(%v) %v, want %v", a, got, want[a])
				}
			}
			// Not asked up front: looked up alone, as before.
			j := 0
			for a, w := range map[netip.Addr]bool{
				netip.MustParseAddr(fmt.Sprintf("2001:db8:ff00::%x:%x", j>>16, j&0xffff)): tc.inSet > 0,
				netip.MustParseAddr("2001:db8:fd00::1"):                                   false,
			} {
				if _, was := want[a]; was {
					continue
				}
				if got := flowed(a); got != w {
					t.Errorf("flowed(%v) asked alone %v, want %v", a, got, w)
				}
			}
		})
	}
}
