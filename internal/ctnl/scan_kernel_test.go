package ctnl_test

import (
	"errors"
	"fmt"
	"net/netip"
	"testing"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/ctnl"
	"github.com/pcpd/pcpd/internal/netlab"
)

// scanEntries is what TestScanKernel puts into conntrack: n of each of
// four kinds, told apart by i%4 and each by its source port (i): IPv4
// DNAT-ed (the kernel's NAT binding: IPS_DST_NAT), IPv4 plain, IPv6
// DNAT-ed (a redirect), IPv6 plain with label bit 127.
func scanEntry(i int) netlab.ConntrackEntry {
	const seen = 2 | 4 // IPS_SEEN_REPLY, IPS_ASSURED
	ap := func(a string, port int) netip.AddrPort {
		return netip.AddrPortFrom(netip.MustParseAddr(a), uint16(port))
	}
	sport := 1024 + i
	switch i % 4 {
	case 0:
		return netlab.ConntrackEntry{Proto: unix.IPPROTO_TCP, Src: ap("203.0.113.1", sport), Dst: ap("192.0.2.1", 5000), DNAT: ap("10.0.0.2", 80), Status: seen}
	case 1:
		return netlab.ConntrackEntry{Proto: unix.IPPROTO_UDP, Src: ap("203.0.113.1", sport), Dst: ap("192.0.2.9", 53), Status: seen}
	case 2:
		return netlab.ConntrackEntry{Proto: unix.IPPROTO_TCP, Src: ap("2001:db8:ff::1", sport), Dst: ap("2001:db8:1::2", 8080), DNAT: ap("2001:db8:1::2", 443), Status: seen}
	}
	labels := make([]byte, 16)
	labels[15] = 0x80 // bit 127
	return netlab.ConntrackEntry{Proto: unix.IPPROTO_UDP, Src: ap("2001:db8:ff::1", sport), Dst: ap("2001:db8:1::3", 53), Status: seen, Labels: labels}
}

// TestScanKernel (root, a namespace of its own, review h/revctnl): Scan
// against the kernel's own dump of 4000 entries (dozens of datagrams,
// so multi-part boundaries are crossed): each filter gives exactly the
// entries it names, each once, with tuples, status and labels decoded
// (DNAT-ed: IPS_DST_NAT of both families; not DNAT-ed nor expected, IPv6
// only; every entry); a Scan stopped at a flow reports it and the next
// Scan reads the table whole. The last row has the kernel not filter (as
// a kernel before 6.1, which ignores CTA_STATUS and CTA_STATUS_MASK in a
// dump): Scan's callers are promised the filtered entries only; before
// review h/revctnl they got every entry there (pinhole's NATEndpoints
// then called every flow's destination a DNAT-ed endpoint).
func TestScanKernel(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "revctnlscan")
	h, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	// Labels are kept only once a rule of the namespace sets one.
	ns.MustRun(t, "nft", "add table inet revctnl; add chain inet revctnl c; add rule inet revctnl c ct label set 127")
	const n = 4000
	netlab.FillConntrack(t, ns, n, scanEntry)
	kind := func(f *ctnl.Flow) (int, error) {
		i := int(f.Orig.Sport) - 1024
		if i < 0 || i >= n || !f.Orig.SportOK {
			return 0, fmt.Errorf("not an entry of the test: %+v", *f)
		}
		e := scanEntry(i)
		if f.Orig.Src != e.Src.Addr() || f.Orig.Dst != e.Dst.Addr() || f.Orig.Dport != e.Dst.Port() || f.Orig.Proto != e.Proto {
			return 0, fmt.Errorf("entry %d decoded %+v, want %v -> %v proto %d", i, f.Orig, e.Src, e.Dst, e.Proto)
		}
		dnat := e.DNAT.IsValid()
		if f.DNATed() != dnat || (f.Status&ctnl.IPSDstNAT != 0) != dnat || (dnat && (f.Reply.Src != e.DNAT.Addr() || f.Reply.Sport != e.DNAT.Port())) {
			return 0, fmt.Errorf("entry %d: DNATed %v, status %#x, reply %+v; want DNAT %v", i, f.DNATed(), f.Status, f.Reply, e.DNAT)
		}
		if f.Labelled(127) != (e.Labels != nil) || f.Labelled(126) {
			return 0, fmt.Errorf("entry %d: labels %x", i, f.Labels)
		}
		return i, nil
	}
	scan := func(fam uint8, mask, val uint32, want func(i int) bool) {
		t.Helper()
		seen := make(map[int]int)
		found, err := ctnl.Scan(int(h), fam, mask, val, func(f *ctnl.Flow) bool {
			i, err := kind(f)
			if err != nil {
				t.Error(err)
				return false
			}
			seen[i]++
			return false
		})
		if err != nil || found {
			t.Fatalf("Scan(%d, %#x, %#x): found %v, %v", fam, mask, val, found, err)
		}
		wrong, dup, missed := 0, 0, 0
		for i := range n {
			switch c := seen[i]; {
			case c > 0 && !want(i):
				wrong++
			case c > 1:
				dup++
			case c == 0 && want(i):
				missed++
			}
		}
		if wrong+dup+missed > 0 {
			t.Errorf("Scan(%d, %#x, %#x): %d entries it does not name, %d twice, %d missed (of %d seen)", fam, mask, val, wrong, dup, missed, len(seen))
		}
	}
	dnat := func(i int) bool { return i%4 == 0 || i%4 == 2 }
	scan(unix.AF_UNSPEC, ctnl.IPSDstNAT, ctnl.IPSDstNAT, dnat)
	scan(unix.AF_INET, ctnl.IPSDstNAT, ctnl.IPSDstNAT, func(i int) bool { return i%4 == 0 })
	scan(unix.AF_INET6, ctnl.IPSDstNAT|ctnl.IPSExpected, 0, func(i int) bool { return i%4 == 3 })
	scan(unix.AF_UNSPEC, 0, 0, func(int) bool { return true })

	// Stopped at the 10th flow: found, and nothing after it is seen.
	k := 0
	found, err := ctnl.Scan(int(h), unix.AF_UNSPEC, 0, 0, func(*ctnl.Flow) bool { k++; return k == 10 })
	if !found || err != nil || k != 10 {
		t.Errorf("stopped Scan: found %v, %v, %d flows seen; want true, nil, 10", found, err, k)
	}
	scan(unix.AF_UNSPEC, 0, 0, func(int) bool { return true })

	// A kernel that does not filter (before 6.1): the same answers.
	defer ctnl.SetKernelFilter(false)()
	scan(unix.AF_UNSPEC, ctnl.IPSDstNAT, ctnl.IPSDstNAT, dnat)
	scan(unix.AF_INET6, ctnl.IPSDstNAT|ctnl.IPSExpected, 0, func(i int) bool { return i%4 == 3 })
}

// TestDeleteMsgNeverFlushes (root, review h/revctnl): a ctnetlink delete
// without a tuple the kernel knows is a flush of the whole table, so
// DeleteMsg refuses an empty tuple and any dir but the two tuples', and
// the deletes it makes end one entry at most: a tuple of no entry (by
// either direction, with an id) fails ENOENT and the table keeps all;
// the reply tuple and id of a dumped entry end that entry alone.
func TestDeleteMsgNeverFlushes(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "revctnldelmsg")
	h, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	const n = 3
	netlab.FillConntrack(t, ns, n, scanEntry) // IPv4 DNAT-ed, IPv4 plain, IPv6 DNAT-ed
	for _, c := range []struct {
		dir   uint16
		tuple []byte
	}{{ctnl.TupleOrig, nil}, {ctnl.TupleReply, []byte{}}, {ctnl.Status, []byte{4, 0, 1, 0x80}}, {0, []byte{4, 0, 1, 0x80}}} {
		if _, ok := ctnl.DeleteMsg(unix.AF_INET, c.dir, c.tuple, nil, nil); ok {
			t.Errorf("DeleteMsg(dir %d, tuple %x): made, want refused", c.dir, c.tuple)
		}
	}
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: int(h)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	type dumped struct {
		fam             uint8
		orig, reply, id []byte
	}
	var flows []dumped
	msgs, err := c.Execute(ctnl.Request(ctnl.MsgGet, netlink.Request|netlink.Dump, unix.AF_UNSPEC, nil))
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range msgs {
		var d dumped
		d.fam = m.Data[0]
		ctnl.Attrs(m.Data[4:], func(typ uint16, v []byte) {
			switch typ {
			case ctnl.TupleOrig:
				d.orig = v
			case ctnl.TupleReply:
				d.reply = v
			case ctnl.ID:
				d.id = v
			}
		})
		flows = append(flows, d)
	}
	if len(flows) != n {
		t.Fatalf("dumped %d entries, want %d", len(flows), n)
	}
	del := func(fam uint8, dir uint16, tuple, id []byte) error {
		m, ok := ctnl.DeleteMsg(fam, dir, tuple, nil, id)
		if !ok {
			t.Fatal("DeleteMsg refused a dumped tuple")
		}
		m.Header.Flags |= netlink.Acknowledge
		_, err := c.Execute(m)
		return err
	}
	// Entry 0's tuples with entry 1's id: no entry. (The kernel finds a
	// tuple in either direction, whichever attribute names it: the id
	// is what tells entry 0 from one made since whose original tuple is
	// entry 0's reply tuple, say.)
	a, b := flows[0], flows[1]
	for _, try := range []struct {
		dir       uint16
		tuple, id []byte
	}{{ctnl.TupleReply, a.reply, b.id}, {ctnl.TupleOrig, a.orig, b.id}, {ctnl.TupleReply, a.orig, b.id}} {
		if err := del(a.fam, try.dir, try.tuple, try.id); !errors.Is(err, unix.ENOENT) {
			t.Errorf("delete of no entry (dir %d): %v, want ENOENT", try.dir, err)
		}
		if got := netlab.ConntrackCount(t, ns); got != n {
			t.Fatalf("%d entries left, want %d", got, n)
		}
	}
	if err := del(a.fam, ctnl.TupleReply, a.reply, a.id); err != nil {
		t.Fatalf("delete of a dumped entry: %v", err)
	}
	if got := netlab.ConntrackCount(t, ns); got != n-1 {
		t.Errorf("%d entries left, want %d", got, n-1)
	}
}
