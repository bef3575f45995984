package ctnl

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// tuple encodes a CTA_TUPLE_* payload as the kernel sends it (ports: if
// proto has them).
func tuple(t *testing.T, src, dst netip.AddrPort, proto uint8, ports bool) []byte {
	ipSrc, ipDst := uint16(IPv4Src), uint16(IPv4Dst)
	if src.Addr().Is6() {
		ipSrc, ipDst = IPv6Src, IPv6Dst
	}
	ae := netlink.NewAttributeEncoder()
	ae.ByteOrder = binary.BigEndian
	ae.Nested(TupleIP, func(ae *netlink.AttributeEncoder) error {
		ae.Bytes(ipSrc, src.Addr().AsSlice())
		ae.Bytes(ipDst, dst.Addr().AsSlice())
		return nil
	})
	ae.Nested(TupleProto, func(ae *netlink.AttributeEncoder) error {
		ae.Uint8(ProtoNum, proto)
		if ports {
			ae.Uint16(ProtoSrcPort, src.Port())
			ae.Uint16(ProtoDstPort, dst.Port())
		}
		return nil
	})
	b, err := ae.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestDecodeTuple: both families, a protocol with ports and one without
// (what the server's filters need told apart), and a truncated payload
// (malformed: false).
func TestDecodeTuple(t *testing.T) {
	src, dst := netip.MustParseAddrPort("[2001:db8::1]:40000"), netip.MustParseAddrPort("[2001:db8:1::2]:443")
	var d Tuple
	if !DecodeTuple(tuple(t, src, dst, 6, true), &d) {
		t.Fatal("well-formed tuple: false")
	}
	if want := (Tuple{Src: src.Addr(), Dst: dst.Addr(), Sport: 40000, Dport: 443, Proto: 6, ProtoOK: true, SportOK: true, DportOK: true}); d != want {
		t.Errorf("got %+v, want %+v", d, want)
	}
	d = Tuple{}
	src4, dst4 := netip.MustParseAddrPort("192.0.2.1:0"), netip.MustParseAddrPort("10.0.0.2:0")
	if !DecodeTuple(tuple(t, src4, dst4, 1, false), &d) || !d.HasAddrs() || !d.Src.Is4() || !d.ProtoOK || d.SportOK || d.DportOK {
		t.Errorf("ICMP: %+v", d)
	}
	b := tuple(t, src, dst, 6, true)
	binary.NativeEndian.PutUint16(b, uint16(len(b)+8)) // the first attribute longer than the payload
	if DecodeTuple(b, &Tuple{}) {
		t.Error("malformed tuple: true")
	}
}

// TestMessagesDecodesFlow: a dump datagram's flow is decoded (tuples,
// status, labels), a message of another request skipped, and the DONE
// that follows ends the dump.
func TestMessagesDecodesFlow(t *testing.T) {
	orig := tuple(t, netip.MustParseAddrPort("203.0.113.1:40000"), netip.MustParseAddrPort("192.0.2.1:5000"), 6, true)
	reply := tuple(t, netip.MustParseAddrPort("10.0.0.2:80"), netip.MustParseAddrPort("203.0.113.1:40000"), 6, true)
	ae := netlink.NewAttributeEncoder()
	ae.ByteOrder = binary.BigEndian
	ae.Bytes(TupleOrig|netlink.Nested, orig)
	ae.Bytes(TupleReply|netlink.Nested, reply)
	ae.Uint32(Status, IPSDstNAT|8)
	labels := make([]byte, 16)
	labels[15] = 0x80 // bit 127
	ae.Bytes(Labels, labels)
	attrs, err := ae.Encode()
	if err != nil {
		t.Fatal(err)
	}
	msg := func(typ uint16, seq uint32, data []byte) []byte {
		b, err := netlink.Message{Header: netlink.Header{Length: uint32(unix.NLMSG_HDRLEN + len(data)),
			Type: netlink.HeaderType(typ), Flags: netlink.Multi, Sequence: seq}, Data: data}.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	flow := append([]byte{unix.AF_INET, 0, 0, 0}, attrs...)
	var dg []byte
	dg = append(dg, msg(unix.NFNL_SUBSYS_CTNETLINK<<8|MsgNew, 6, flow)...) // another request's
	dg = append(dg, msg(unix.NFNL_SUBSYS_CTNETLINK<<8|MsgNew, 7, flow)...)
	dg = append(dg, msg(unix.NLMSG_DONE, 7, []byte{0, 0, 0, 0})...)
	var f Flow
	n := 0
	end, found, err := Messages(dg, 7, &f, func(f *Flow) bool {
		n++
		if f.Orig.Dst != netip.MustParseAddr("192.0.2.1") || f.Orig.Dport != 5000 || f.Reply.Src != netip.MustParseAddr("10.0.0.2") ||
			f.Reply.Sport != 80 || f.Status != IPSDstNAT|8 || !f.DNATed() || !f.Labelled(127) || f.Labelled(126) {
			t.Errorf("decoded %+v", *f)
		}
		return false
	})
	if !end || found || err != nil || n != 1 {
		t.Errorf("end %v, found %v, err %v, %d flows; want the dump ended, 1 flow seen, none wanted", end, found, err, n)
	}
}

// TestMessagesRawAndInterrupted (h/genwalk): a flow carries its family
// and its attributes undecoded (what the generic walk deletes it by), and
// whether its message was marked NLM_F_DUMP_INTR.
func TestMessagesRawAndInterrupted(t *testing.T) {
	orig := tuple(t, netip.MustParseAddrPort("[2001:db8::1]:40000"), netip.MustParseAddrPort("[2001:db8::2]:443"), 6, true)
	ae := netlink.NewAttributeEncoder()
	ae.Bytes(TupleOrig|netlink.Nested, orig)
	attrs, err := ae.Encode()
	if err != nil {
		t.Fatal(err)
	}
	data := append([]byte{unix.AF_INET6, 0, 0, 0}, attrs...)
	for _, intr := range []bool{false, true} {
		flags := netlink.Multi
		if intr {
			flags |= netlink.DumpInterrupted
		}
		b, err := netlink.Message{Header: netlink.Header{Length: uint32(unix.NLMSG_HDRLEN + len(data)),
			Type: netlink.HeaderType(unix.NFNL_SUBSYS_CTNETLINK<<8 | MsgNew), Flags: flags, Sequence: 7}, Data: data}.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		var f Flow
		n := 0
		Messages(b, 7, &f, func(f *Flow) bool {
			n++
			if f.Family != unix.AF_INET6 || !bytes.Equal(f.Attrs, attrs) || f.Interrupted != intr {
				t.Errorf("family %d, attrs % x, interrupted %v; want %d, % x, %v", f.Family, f.Attrs, f.Interrupted, unix.AF_INET6, attrs, intr)
			}
			return false
		})
		if n != 1 {
			t.Errorf("%d flows, want 1", n)
		}
	}
}
