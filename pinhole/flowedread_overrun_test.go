package pinhole

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/mdlayher/netlink"
	"github.com/pcpd/pcpd/internal/netlab"
	"golang.org/x/sys/unix"
)

// TestFlowedLookupOverrun (root, namespace; review h/revdump): a batch's
// answers that do not fit the socket's receive buffer are dropped by the
// kernel (the socket overrun: ENOBUFS on the next read). No address is
// then answered wrongly: those read before are as flowed6 holds them,
// the rest unanswered (taken as flowed), the socket closed; asked again
// on a socket of the usual buffer, every one is answered as the set
// holds it. 64 present and 64 absent addresses, interleaved, asked on a
// socket whose receive buffer holds a few answers.
func TestFlowedLookupOverrun(t *testing.T) {
	ns := netlab.NewNS(t, "fdover")
	h, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	want := map[netip.Addr]bool{}
	var asked, in []string
	var as []netip.Addr
	for i := range 128 {
		a := netip.MustParseAddr(fmt.Sprintf("2001:db8::%x", i))
		want[a] = i%2 == 0
		if want[a] {
			in = append(in, a.String())
		}
		asked = append(asked, a.String())
		as = append(as, a)
	}
	ns.MustRun(t, "nft", "add table inet t; add set inet t flowed6 { type ipv6_addr; size 1024; flags dynamic; }; add element inet t flowed6 { "+strings.Join(in, ", ")+" }")
	tbl := &nftables.Table{Family: nftables.TableFamilyINet, Name: "t"}
	b := &Backend{table: tbl, netns: int(h), flowed6: &nftables.Set{Table: tbl, Name: "flowed6", KeyType: nftables.TypeIP6Addr, KeyByteOrder: binaryutil.BigEndian}}
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: int(h)})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetOption(netlink.ExtendedAcknowledge, true); err != nil {
		t.Fatal(err)
	}
	if err := c.SetReadBuffer(1); err != nil { // the kernel's least
		t.Fatal(err)
	}
	b.flowed.raw.c = c
	seen := map[netip.Addr]bool{}
	b.flowedLookup(as, seen)
	for a, v := range seen {
		if v != want[a] {
			t.Errorf("overrun: %v answered present %v, want %v", a, v, want[a])
		}
	}
	if len(seen) == len(as) || b.flowed.raw.c != nil {
		t.Errorf("overrun: %d of %d answered, socket closed %v: want some unanswered and the socket closed", len(seen), len(as), b.flowed.raw.c == nil)
	}
	t.Logf("overrun: %d of %d answered", len(seen), len(as))
	seen = map[netip.Addr]bool{}
	b.flowedLookup(as, seen)
	b.flowed.raw.close()
	for _, a := range as {
		if v, ok := seen[a]; !ok || v != want[a] {
			t.Errorf("again: %v answered %v present %v, want present %v", a, ok, v, want[a])
		}
	}
}
