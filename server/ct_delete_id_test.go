package server

import (
	"net/netip"
	"testing"

	mdnl "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
)

// TestCtDeleteSparesRemadeFlow (root, review h/revctnl): the flusher's
// walk deletes a flow some time after its dump found it (spareLive asks
// the live leases in between). A flow that ended meanwhile and was made
// again is another flow the walk never judged: with the same original
// tuple (a remote reusing its source port towards the endpoint) but
// delivered elsewhere (DNAT-ed to another target, as a mapping made again
// for another internal endpoint delivers it), or delivered to the same
// target through another external endpoint (same reply tuple). The delete
// names the dumped entry by its reply tuple and CTA_ID (ctnl.DeleteMsg),
// so the kernel ends only an entry with the judged flow's tuples both
// ways (ENOENT for the others, not counted). Before, the delete by the
// original tuple ended the first row's new flow; by the reply tuple
// alone it would end the second's; the id alone cannot tell the first
// (the kernel's id hashes the original tuple and the entry's address,
// which the new entry takes again).
func TestCtDeleteSparesRemadeFlow(t *testing.T) {
	netlab.RequireRoot(t)
	ap := netip.MustParseAddrPort
	rem, ext, ext2 := ap("203.0.113.1:40000"), ap("192.0.2.1:5000"), ap("192.0.2.1:5001")
	old, other := ap("10.0.0.2:80"), ap("10.0.0.3:80")
	for _, c := range []struct {
		name        string
		dst, target netip.AddrPort // the flow made again
	}{
		{"same original tuple, delivered elsewhere", ext, other},
		{"same delivery, another external endpoint", ext2, old},
	} {
		t.Run(c.name, func(t *testing.T) {
			ns := netlab.NewNS(t, "revctnldel")
			h, nh := nsHandles(t, ns)
			netlab.FillConntrack(t, ns, 1, func(int) netlab.ConntrackEntry {
				return netlab.ConntrackEntry{Proto: protoTCP, Src: rem, Dst: ext, DNAT: old, Status: 2 | 4}
			})
			d, err := dialConntrack(int(h))
			if err != nil {
				t.Fatal(err)
			}
			defer d.close()
			other, err := dialConntrack(int(h))
			if err != nil {
				t.Fatal(err)
			}
			defer other.close()
			d.live = true
			asked := 0
			d.spare = func(hits []ctHit) {
				// Between the dump and the delete: the flow ends and
				// another is made.
				asked += len(hits)
				del, _ := ctDeleteMsg(unix.AF_INET, origTuple(t, rem, ext), nil)
				if n, err := other.deleteAll([]mdnl.Message{del}); n != 1 || err != nil {
					t.Fatalf("ending the dumped flow: %d, %v", n, err)
				}
				netlab.FillConntrack(t, ns, 1, func(int) netlab.ConntrackEntry {
					return netlab.ConntrackEntry{Proto: protoTCP, Src: rem, Dst: c.dst, DNAT: c.target, Status: 2 | 4}
				})
			}
			f := ctFilter{v4: true, t: ctTarget{addr: ext.Addr(), proto: protoTCP, port: ext.Port()}}
			n, err := d.end(f.group(), []ctFilter{f})
			if err != nil || asked != 1 {
				t.Fatalf("walk: %v (%d flows asked of spare, want 1)", err, asked)
			}
			flows, err := nh.ConntrackTableList(netlink.ConntrackTable, netlink.FAMILY_V4)
			if err != nil {
				t.Fatal(err)
			}
			var left []netip.AddrPort
			for _, fl := range flows {
				a, _ := netip.AddrFromSlice(fl.Forward.DstIP)
				left = append(left, netip.AddrPortFrom(a.Unmap(), fl.Forward.DstPort))
			}
			if len(left) != 1 || left[0] != c.dst || n != 0 {
				t.Errorf("after the walk: flows to %v, %d deleted; want the new flow (to %v) kept, 0 deleted", left, n, c.dst)
			}
		})
	}
}

// TestCtDeleteByReplyEveryKind (root, review h/revctnl): deleting by the
// dumped reply tuple and id ends every kind of flow the walk ends, the
// kernel parsing each reply tuple as it parses a lookup's (ICMPv6: the
// echo reply's type, id and code; a protocol without ports): an IPv6
// all-protocols wildcard's walk ends TCP, UDP, ICMPv6 echo and generic
// flows to its address and none to another.
func TestCtDeleteByReplyEveryKind(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "revctnlkinds")
	h, nh := nsHandles(t, ns)
	ap := netip.MustParseAddrPort
	a, b := netip.MustParseAddr("2001:db8:1::2"), netip.MustParseAddr("2001:db8:1::3")
	rem := netip.MustParseAddr("2001:db8:ff::1")
	var entries []netlab.ConntrackEntry
	for _, to := range []netip.Addr{a, b} {
		entries = append(entries,
			netlab.ConntrackEntry{Proto: protoTCP, Src: ap("[2001:db8:ff::1]:40000"), Dst: netip.AddrPortFrom(to, 80), Status: 6},
			netlab.ConntrackEntry{Proto: unix.IPPROTO_UDP, Src: ap("[2001:db8:ff::1]:40000"), Dst: netip.AddrPortFrom(to, 53), Status: 6},
			netlab.ConntrackEntry{Proto: unix.IPPROTO_ICMPV6, Src: netip.AddrPortFrom(rem, 0), Dst: netip.AddrPortFrom(to, 0), Status: 6},
			netlab.ConntrackEntry{Proto: 253, Src: netip.AddrPortFrom(rem, 0), Dst: netip.AddrPortFrom(to, 0), Status: 6},
		)
	}
	netlab.FillConntrack(t, ns, len(entries), func(i int) netlab.ConntrackEntry { return entries[i] })
	d, err := dialConntrack(int(h))
	if err != nil {
		t.Fatal(err)
	}
	defer d.close()
	d.live = true // spare nil: every flow matched ends
	f := ctFilter{t: ctTarget{addr: a}}
	n, err := d.end(f.group(), []ctFilter{f})
	if err != nil || n != 4 {
		t.Fatalf("walk: %d ended, %v; want 4, nil", n, err)
	}
	flows, err := nh.ConntrackTableList(netlink.ConntrackTable, netlink.FAMILY_V6)
	if err != nil {
		t.Fatal(err)
	}
	for _, fl := range flows {
		if dst, _ := netip.AddrFromSlice(fl.Forward.DstIP); dst != b {
			t.Errorf("left: proto %d to %v", fl.Forward.Protocol, dst)
		}
	}
	if len(flows) != 4 {
		t.Errorf("%d flows left, want b's 4", len(flows))
	}
}
