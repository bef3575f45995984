package netlab

import (
	"encoding/binary"
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/ctnl"
)

// ConntrackEntry is a conntrack entry FillConntrack creates: original
// tuple Src → Dst, reply from ReplySrc (Dst unless set) to Src, with
// Status and Labels (ICMPv6: an echo request's, its ports unused),
// timing out after TimeoutSecond (0: an hour). With DNAT, the kernel's
// NAT binds it to DNAT as a dnat rule would (CTA_NAT_DST): the reply
// from DNAT, status IPS_DST_NAT (a status set directly keeps no NAT
// bit: the kernel drops them), ReplySrc unused.
type ConntrackEntry struct {
	Proto         uint8
	Src, Dst      netip.AddrPort
	ReplySrc      netip.AddrPort
	DNAT          netip.AddrPort
	Status        uint32
	Labels        []byte
	TimeoutSecond uint32
}

// FillConntrack creates the entries gen makes for 0 ≤ i < n in ns over
// ctnetlink, many messages a datagram and without acknowledgements (≈ 1 s
// for 1 000 000), and checks that ns's conntrack table then holds at
// least n (raise nf_conntrack_max first for many).
func FillConntrack(tb testing.TB, ns *NS, n int, gen func(i int) ConntrackEntry) {
	tb.Helper()
	var c *netlink.Conn
	if err := ns.Do(func() (err error) {
		c, err = netlink.Dial(unix.NETLINK_NETFILTER, nil)
		return err
	}); err != nil {
		tb.Fatal(err)
	}
	defer c.Close()
	var batch []netlink.Message
	size := 0
	flush := func() {
		if len(batch) == 0 {
			return
		}
		if _, err := c.SendMessages(batch); err != nil {
			tb.Fatal(err)
		}
		batch, size = batch[:0], 0
	}
	for i := range n {
		m := conntrackNew(tb, gen(i))
		batch = append(batch, m)
		if size += len(m.Data) + 16; size > 48<<10 {
			flush()
		}
	}
	flush()
	if got := ConntrackCount(tb, ns); got < n {
		tb.Fatalf("conntrack holds %d entries, want ≥ %d (nf_conntrack_max?)", got, n)
	}
}

// FillConntrackUnrelated raises ns's nf_conntrack_max to n plus slack
// (it cannot exceed the initial namespace's: raise that first for many)
// and creates n replied UDP flows to port 53 between addresses of no
// lab client, half IPv4 (198.51.100.0/16 sources to 192.0.2.1), half
// IPv6 (2001:db8:ff::/112 sources to 2001:db8:fe::1), status
// IPS_SEEN_REPLY|IPS_ASSURED: a big table a conntrack walk reads to the
// end.
func FillConntrackUnrelated(tb testing.TB, ns *NS, n int) {
	tb.Helper()
	ns.MustRun(tb, "sysctl", "-qw", "net.netfilter.nf_conntrack_max="+strconv.Itoa(n+n/10+1024))
	src4, dst4 := netip.MustParseAddr("198.51.100.1").As4(), netip.MustParseAddr("192.0.2.1").As4()
	src6, dst6 := netip.MustParseAddr("2001:db8:ff::1").As16(), netip.MustParseAddr("2001:db8:fe::1").As16()
	FillConntrack(tb, ns, n, func(i int) ConntrackEntry {
		port := uint16(1024 + i%60000)
		k := i / 60000
		if i%2 == 0 {
			s, d := src4, dst4
			s[2], s[3] = byte(k>>8), byte(k)
			return ConntrackEntry{Proto: unix.IPPROTO_UDP, Src: netip.AddrPortFrom(netip.AddrFrom4(s), port),
				Dst: netip.AddrPortFrom(netip.AddrFrom4(d), 53), Status: 2 | 4}
		}
		s, d := src6, dst6
		s[14], s[15] = byte(k>>8), byte(k)
		return ConntrackEntry{Proto: unix.IPPROTO_UDP, Src: netip.AddrPortFrom(netip.AddrFrom16(s), port),
			Dst: netip.AddrPortFrom(netip.AddrFrom16(d), 53), Status: 2 | 4}
	})
}

// conntrackNew is e's IPCTNL_MSG_CT_NEW.
func conntrackNew(tb testing.TB, e ConntrackEntry) netlink.Message {
	fam, srcA, dstA := uint8(unix.AF_INET), uint16(ctnl.IPv4Src), uint16(ctnl.IPv4Dst)
	if e.Src.Addr().Is6() {
		fam, srcA, dstA = unix.AF_INET6, ctnl.IPv6Src, ctnl.IPv6Dst
	}
	if !e.ReplySrc.IsValid() || e.DNAT.IsValid() {
		e.ReplySrc = e.Dst
	}
	if e.TimeoutSecond == 0 {
		e.TimeoutSecond = 3600
	}
	tuple := func(ae *netlink.AttributeEncoder, src, dst netip.AddrPort, icmpType uint8) {
		ae.Nested(ctnl.TupleIP, func(ae *netlink.AttributeEncoder) error {
			ae.Bytes(srcA, src.Addr().AsSlice())
			ae.Bytes(dstA, dst.Addr().AsSlice())
			return nil
		})
		ae.Nested(ctnl.TupleProto, func(ae *netlink.AttributeEncoder) error {
			ae.Uint8(ctnl.ProtoNum, e.Proto)
			if e.Proto == unix.IPPROTO_ICMPV6 {
				// An echo: CTA_PROTO_ICMPV6_ID, _TYPE, _CODE.
				ae.Uint16(7, 1)
				ae.Uint8(8, icmpType)
				ae.Uint8(9, 0)
				return nil
			}
			ae.Uint16(ctnl.ProtoSrcPort, src.Port())
			ae.Uint16(ctnl.ProtoDstPort, dst.Port())
			return nil
		})
	}
	ae := netlink.NewAttributeEncoder()
	ae.ByteOrder = binary.BigEndian
	ae.Nested(ctnl.TupleOrig, func(ae *netlink.AttributeEncoder) error { tuple(ae, e.Src, e.Dst, 128); return nil })
	ae.Nested(ctnl.TupleReply, func(ae *netlink.AttributeEncoder) error { tuple(ae, e.ReplySrc, e.Src, 129); return nil })
	// CTA_STATUS: the kernel marks a new entry IPS_CONFIRMED before it
	// applies the status, and refuses to change that bit (EBUSY).
	ae.Uint32(ctnl.Status, e.Status|8)
	ae.Uint32(7, e.TimeoutSecond) // CTA_TIMEOUT
	if e.Labels != nil {
		ae.Bytes(ctnl.Labels, e.Labels)
	}
	if e.DNAT.IsValid() {
		// CTA_NAT_DST: CTA_NAT_V4_MINIP, _MAXIP (V6: 4, 5), CTA_NAT_PROTO
		// (CTA_PROTONAT_PORT_MIN, _MAX).
		minIP, maxIP := uint16(1), uint16(2)
		if e.DNAT.Addr().Is6() {
			minIP, maxIP = 4, 5
		}
		ae.Nested(13, func(ae *netlink.AttributeEncoder) error {
			ae.Bytes(minIP, e.DNAT.Addr().AsSlice())
			ae.Bytes(maxIP, e.DNAT.Addr().AsSlice())
			ae.Nested(3, func(ae *netlink.AttributeEncoder) error {
				ae.Uint16(1, e.DNAT.Port())
				ae.Uint16(2, e.DNAT.Port())
				return nil
			})
			return nil
		})
	}
	attrs, err := ae.Encode()
	if err != nil {
		tb.Fatal(err)
	}
	return ctnl.Request(ctnl.MsgNew, netlink.Request|netlink.Create, fam, attrs)
}

// ConntrackCount is ns's nf_conntrack_count.
func ConntrackCount(tb testing.TB, ns *NS) int {
	tb.Helper()
	out := strings.TrimSpace(ns.MustRun(tb, "cat", "/proc/sys/net/netfilter/nf_conntrack_count"))
	n, err := strconv.Atoi(out)
	if err != nil {
		tb.Fatal(err)
	}
	return n
}
