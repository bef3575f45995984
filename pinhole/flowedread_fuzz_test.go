package pinhole

import (
	"encoding/binary"
	"testing"

	"golang.org/x/sys/unix"
)

// FuzzFlowedAnswer (review h/revdump): flowedAnswer never panics, and
// reads a datagram as "absent" (present false, ok true: the address's
// conntrack walk is left out) only when it is one message, an
// NLMSG_ERROR of the lookup's sequence, errno ENOENT, with extended-ack
// TLVs flagged, holding an NLMSGERR_ATTR_OFFS of 8 bytes at a 4-byte
// boundary after the quoted request whose value is the element's offset;
// and then for no other element offset and no other sequence. "present"
// only for a NEWSETELEM of the sequence. Any other verdict is the safe
// side (the walk runs) and not checked.
func FuzzFlowedAnswer(f *testing.F) {
	const elemOff = 60
	hdr := func(l uint32, typ, flags uint16, seq uint32) []byte {
		b := binary.NativeEndian.AppendUint32(nil, l)
		b = binary.NativeEndian.AppendUint16(b, typ)
		b = binary.NativeEndian.AppendUint16(b, flags)
		b = binary.NativeEndian.AppendUint32(b, seq)
		return binary.NativeEndian.AppendUint32(b, 0)
	}
	req := append(hdr(80, unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_GETSETELEM, unix.NLM_F_REQUEST, 7), make([]byte, 64)...)
	offs := binary.NativeEndian.AppendUint32(binary.NativeEndian.AppendUint32(nil, 8|unix.NLMSGERR_ATTR_OFFS<<16), elemOff)
	enoent := -int32(unix.ENOENT)
	errno := binary.NativeEndian.AppendUint32(nil, uint32(enoent))
	full := append(append(append([]byte{}, errno...), req...), offs...)
	f.Add(append(hdr(uint32(16+len(full)), unix.NLMSG_ERROR, unix.NLM_F_ACK_TLVS, 7), full...), uint32(7), uint32(elemOff))
	capped := append(append(append([]byte{}, errno...), req[:16]...), offs...)
	f.Add(append(hdr(uint32(16+len(capped)), unix.NLMSG_ERROR, unix.NLM_F_ACK_TLVS|unix.NLM_F_CAPPED, 7), capped...), uint32(7), uint32(elemOff))
	f.Add(append(hdr(24, unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWSETELEM, 0, 7), 10, 0, 0, 0, 1, 2, 3, 4), uint32(7), uint32(elemOff))
	f.Add(append(hdr(uint32(16+len(full)), unix.NLMSG_ERROR, unix.NLM_F_ACK_TLVS, 7), full[:len(full)-4]...), uint32(7), uint32(20))
	f.Fuzz(func(t *testing.T, b []byte, seq, off uint32) {
		present, ok := flowedAnswer(b, seq, off)
		if !ok {
			if present {
				t.Fatalf("present %v with ok false", present)
			}
			return
		}
		// Both verdicts: one message, of the sequence, no second after it.
		if len(b) < unix.NLMSG_HDRLEN {
			t.Fatalf("ok for %d bytes", len(b))
		}
		l := int(binary.NativeEndian.Uint32(b))
		typ := binary.NativeEndian.Uint16(b[4:])
		flags := binary.NativeEndian.Uint16(b[6:])
		if l < unix.NLMSG_HDRLEN || l > len(b) || len(b)-l >= 4 || binary.NativeEndian.Uint32(b[8:]) != seq {
			t.Fatalf("ok for a datagram of %d bytes, its message %d, sequence %d (asked %d)", len(b), l, binary.NativeEndian.Uint32(b[8:]), seq)
		}
		if _, again := flowedAnswer(b, seq+1, off); again {
			t.Fatalf("ok for sequence %d and %d", seq, seq+1)
		}
		if present {
			if typ != unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWSETELEM {
				t.Fatalf("present for type %#x", typ)
			}
			return
		}
		// Absent: the safety-relevant verdict.
		if typ != unix.NLMSG_ERROR || flags&unix.NLM_F_ACK_TLVS == 0 || l < 2*unix.NLMSG_HDRLEN+4 {
			t.Fatalf("absent for type %#x flags %#x length %d", typ, flags, l)
		}
		p := b[unix.NLMSG_HDRLEN:l]
		if e := int32(binary.NativeEndian.Uint32(p)); e != -int32(unix.ENOENT) {
			t.Fatalf("absent for errno %d", e)
		}
		start := 4 + unix.NLMSG_HDRLEN
		if flags&unix.NLM_F_CAPPED == 0 {
			start = 4 + (int(binary.NativeEndian.Uint32(p[4:]))+3)&^3
		}
		found := false
		for i := start; i >= 4+unix.NLMSG_HDRLEN && i+8 <= len(p); i += 4 {
			if binary.NativeEndian.Uint16(p[i:]) == 8 && binary.NativeEndian.Uint16(p[i+2:])&^(unix.NLA_F_NESTED|unix.NLA_F_NET_BYTEORDER) == unix.NLMSGERR_ATTR_OFFS && binary.NativeEndian.Uint32(p[i+4:]) == off {
				found = true
				break
			}
		}
		if !found {
			t.Fatalf("absent with no NLMSGERR_ATTR_OFFS of %d after the quoted request: % x", off, b)
		}
		for _, other := range []uint32{off + 1, off - 1, off + 4, off - 4, 0} {
			if _, again := flowedAnswer(b, seq, other); again && other != off {
				t.Fatalf("absent for element offset %d and %d", off, other)
			}
		}
	})
}
