package pinhole

import (
	"net/netip"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/pcpd/pcpd/internal/netlab"
)

// TestFlowedLookupWhereNoSet (root, namespace; h/flushdump): the kernel
// answers a GETSETELEM with ENOENT for a missing element, and also for a
// missing table or set (deleted under pcpd: the watch notices, later).
// Only the first is "not flowed": a lookup in a set or table that is not
// there leaves the address unanswered (taken as flowed: its walk runs).
// Before, every ENOENT read as absent, so a walk could be left out in
// the window before the damage was noticed. The element's own ENOENT,
// in a set that is there, still reads as absent, and a present one as
// present.
func TestFlowedLookupWhereNoSet(t *testing.T) {
	ns := netlab.NewNS(t, "fdnoset")
	h, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	in := netip.MustParseAddr("2001:db8::1")
	out := netip.MustParseAddr("2001:db8::2")
	ns.MustRun(t, "nft", "add table inet there; add set inet there flowed6 { type ipv6_addr; size 16; flags dynamic; }; add element inet there flowed6 { 2001:db8::1 }; add table inet noset")
	for _, tc := range []struct {
		table string
		want  map[netip.Addr]bool // answered: present or not; missing: unanswered
	}{
		{"there", map[netip.Addr]bool{in: true, out: false}},
		{"noset", nil},
		{"notable", nil},
	} {
		tbl := &nftables.Table{Family: nftables.TableFamilyINet, Name: tc.table}
		b := &Backend{table: tbl, netns: int(h), flowed6: &nftables.Set{Table: tbl, Name: "flowed6", KeyType: nftables.TypeIP6Addr, KeyByteOrder: binaryutil.BigEndian}}
		seen := map[netip.Addr]bool{}
		b.flowedLookup([]netip.Addr{in, out}, seen)
		b.flowed.raw.close()
		for _, a := range []netip.Addr{in, out} {
			got, answered := seen[a]
			want, wantAnswered := tc.want[a]
			if got != want || answered != wantAnswered {
				t.Errorf("table %s: %v answered %v present %v, want answered %v present %v", tc.table, a, answered, got, wantAnswered, want)
			}
		}
	}
}
