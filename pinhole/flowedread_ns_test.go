package pinhole

import (
	"fmt"
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

// TestFlowedAddrsFailedBatchOnce (root, namespace; review h/revdump):
// when the batched lookups of a walk's addresses fail (here flowed6's
// table has no such set: each ENOENT names the set, as every ENOENT does
// on a kernel that does not name the element, before Linux 5.19's
// b53c116642502 and its stable backports), the addresses are taken as
// flowed without asking each again alone. Before, FlowedAddrs' func
// asked each unanswered address alone (flowedHas: a socket dialled,
// a lookup, the socket closed): 900 addresses asked, 1 + 900 reads,
// ≈ 70 µs each, ≈ 60-70 ms a walk under b.flowed.mu (and the server's
// unflowed lock) for as long as it lasts; on such a kernel, at every
// walk. An address not asked is taken as flowed too, while the batch's
// failure lasts (this FlowedAddrs call).
func TestFlowedAddrsFailedBatchOnce(t *testing.T) {
	ns := netlab.NewNS(t, "fdonce")
	h, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	ns.MustRun(t, "nft", "add table inet noset")
	tbl := &nftables.Table{Family: nftables.TableFamilyINet, Name: "noset"}
	b := &Backend{table: tbl, netns: int(h), flowed6: &nftables.Set{Table: tbl, Name: "flowed6", KeyType: nftables.TypeIP6Addr, KeyByteOrder: binaryutil.BigEndian}}
	reads := 0
	defer SetFlowedRecvHook(func(string, int) { reads++ })()
	var asked []netip.Addr
	for i := range 900 {
		asked = append(asked, netip.MustParseAddr(fmt.Sprintf("2001:db8::%x", i)))
	}
	b.flowed.mu.Lock()
	flowed := b.flowedFunc(asked)
	b.flowed.mu.Unlock()
	for _, a := range append(asked, netip.MustParseAddr("2001:db8:1::1")) {
		if !flowed(a) {
			t.Fatalf("%v not flowed: its lookup failed", a)
		}
	}
	b.flowed.mu.Lock()
	b.flowed.raw.close()
	b.flowed.mu.Unlock()
	if reads != 2 {
		t.Errorf("%d reads of answers for 900 addresses asked and 1 not, their batch failed: want 2 (the batch, once more)", reads)
	}
}
