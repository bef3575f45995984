package pinhole

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
)

// TestFlowedAnswer (h/flushdump): what flowedReader takes as a lookup's
// answer, and what fails the batch (its addresses then taken as flowed).
func TestFlowedAnswer(t *testing.T) {
	msg := func(typ, flags uint16, seq uint32, data ...byte) []byte {
		b := binary.NativeEndian.AppendUint32(nil, uint32(unix.NLMSG_HDRLEN+len(data)))
		b = binary.NativeEndian.AppendUint16(b, typ)
		b = binary.NativeEndian.AppendUint16(b, flags)
		b = binary.NativeEndian.AppendUint32(b, seq)
		b = binary.NativeEndian.AppendUint32(b, 0) // port id
		b = append(b, data...)
		for len(b)%4 != 0 {
			b = append(b, 0)
		}
		return b
	}
	const newElem = unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWSETELEM
	const elemOff = 60
	req := msg(unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_GETSETELEM, unix.NLM_F_REQUEST, 7, make([]byte, 64)...)
	// err is the kernel's error reply to req: errno e, the request quoted
	// whole (or its header, capped), then TLVs.
	err := func(e int32, flags uint16, capped bool, tlvs ...byte) []byte {
		p := binary.NativeEndian.AppendUint32(nil, uint32(e))
		if capped {
			flags |= unix.NLM_F_CAPPED
			p = append(p, req[:unix.NLMSG_HDRLEN]...)
		} else {
			p = append(p, req...)
		}
		return msg(unix.NLMSG_ERROR, flags, 7, append(p, tlvs...)...)
	}
	offs := func(off uint32) []byte {
		b := binary.NativeEndian.AppendUint16(nil, 8)
		b = binary.NativeEndian.AppendUint16(b, unix.NLMSGERR_ATTR_OFFS)
		return binary.NativeEndian.AppendUint32(b, off)
	}
	other := append(binary.NativeEndian.AppendUint16(nil, 6), 1, 0, 'x', 0, 0, 0) // NLMSGERR_ATTR_MSG "x"
	enoent := -int32(unix.ENOENT)
	elem := msg(newElem, 0, 7, 10, 0, 0, 0, 1, 2, 3)
	for _, tc := range []struct {
		name          string
		b             []byte
		present, isOK bool
	}{
		{"the element", elem, true, true},
		{"ENOENT of the element", err(enoent, unix.NLM_F_ACK_TLVS, false, offs(elemOff)...), false, true},
		{"ENOENT of the element, capped", err(enoent, unix.NLM_F_ACK_TLVS, true, offs(elemOff)...), false, true},
		{"ENOENT of the element after a message", err(enoent, unix.NLM_F_ACK_TLVS, false, append(other, offs(elemOff)...)...), false, true},
		{"ENOENT of the table", err(enoent, unix.NLM_F_ACK_TLVS, false, offs(20)...), false, false},
		{"ENOENT of the set", err(enoent, unix.NLM_F_ACK_TLVS, false, offs(32)...), false, false},
		{"ENOENT, no offset", err(enoent, unix.NLM_F_ACK_TLVS, false, other...), false, false},
		{"ENOENT, no TLVs", err(enoent, 0, false), false, false},
		{"ENOENT, TLVs flagged, none", err(enoent, unix.NLM_F_ACK_TLVS, false), false, false},
		{"ENOENT, offset cut", err(enoent, unix.NLM_F_ACK_TLVS, false, offs(elemOff)[:6]...), false, false},
		{"ENOENT, another sequence", msg(unix.NLMSG_ERROR, 0, 6, err(enoent, unix.NLM_F_ACK_TLVS, false, offs(elemOff)...)[unix.NLMSG_HDRLEN:]...), false, false},
		{"the element, another sequence", msg(newElem, 0, 8, 10, 0, 0, 0), false, false},
		{"another error", err(-int32(unix.EPERM), unix.NLM_F_ACK_TLVS, false, offs(elemOff)...), false, false},
		{"an acknowledgement", err(0, unix.NLM_F_ACK_TLVS, false), false, false},
		{"a short error", msg(unix.NLMSG_ERROR, 0, 7, 0xfe), false, false},
		{"another type", msg(unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWSET, 0, 7, 1, 2, 3, 4), false, false},
		{"a done", msg(unix.NLMSG_DONE, 0, 7, 0, 0, 0, 0), false, false},
		{"two messages", append(append([]byte{}, elem...), elem...), false, false},
		{"a length past the datagram", elem[:len(elem)-4], false, false},
		{"a header only, cut", elem[:12], false, false},
		{"nothing", nil, false, false},
	} {
		present, ok := flowedAnswer(tc.b, 7, elemOff)
		if present != tc.present || ok != tc.isOK {
			t.Errorf("%s: present %v ok %v, want %v %v", tc.name, present, ok, tc.present, tc.isOK)
		}
	}
}

// TestFlowedRequests (h/flushdump): flowedReader's requests, written
// from its template with the key and the sequence patched, are the bytes
// mdlayher/netlink would send for flowedGet's message of that address.
func TestFlowedRequests(t *testing.T) {
	tbl := &nftables.Table{Family: nftables.TableFamilyINet, Name: "pcpd"}
	b := &Backend{table: tbl, flowed6: flowedSet(tbl)}
	r := newFlowedReader(b.flowedGet(netip.IPv6Unspecified()))
	r.seq = 41
	batch := []netip.Addr{netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("fe80::ffff:1234")}
	r.out = r.out[:0]
	for i, a := range batch {
		r.appendRequest(a, r.seq+1+uint32(i))
	}
	var want []byte
	for i, a := range batch {
		m := b.flowedGet(a)
		m.Header.Length = uint32(nlmsgAlign(unix.NLMSG_HDRLEN + len(m.Data)))
		m.Header.Sequence = 42 + uint32(i)
		w, err := m.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, w...)
	}
	if !bytes.Equal(r.out, want) {
		t.Errorf("requests\n%x\nwant\n%x", r.out, want)
	}
	// The element's attribute, where flowedAnswer looks for it: a nest
	// of NFTA_LIST_ELEM holding the key's two headers and 16 bytes.
	e := r.req[r.elemOff:]
	if l, typ := binary.NativeEndian.Uint16(e), binary.NativeEndian.Uint16(e[2:]); l != 3*unix.NLA_HDRLEN+16 || typ&^unix.NLA_F_NESTED != unix.NFTA_LIST_ELEM {
		t.Errorf("at elemOff %d: attribute of length %d type %#x, want %d, NFTA_LIST_ELEM", r.elemOff, l, typ, 3*unix.NLA_HDRLEN+16)
	}
}

// oldKernelENOENT is the answer a kernel before Linux 5.19 (b53c116642502
// and its stable backports: nf_tables_getsetelem sets no bad attribute)
// gives to flowedReader's lookup of :: in inet pcpd's flowed6, sequence 1,
// with NETLINK_EXT_ACK on: an NLMSG_ERROR of ENOENT, no NLM_F_ACK_TLVS,
// the request quoted whole (little-endian host). Its NFTA_LIST_ELEM is at
// offset 48 of the request.
const oldKernelENOENT = "6000000002000000010000000000000" + "0" +
	"feffffff" + // -ENOENT
	"4c0000000d0a010001000000e8030000" + // the request's header
	"01000000" + // nfgenmsg: inet
	"0900010070637064000000000c000200666c6f776564360020000380" +
	"1c000180180001801400010000000000000000000000000000000000"

// TestFlowedVerdictOldKernel (h/left9, issue 9): the classification
// FlowedMissNamed reads: an old kernel's ENOENT that names no attribute
// is answerUnnamed ("not named": the lookups fail, every address taken
// as flowed), the same answer from Linux 5.19 on (NLMSGERR_ATTR_OFFS at
// the element) answerAbsent, the offset of the table or set
// answerOther. Before, all three were one "not an answer".
func TestFlowedVerdictOldKernel(t *testing.T) {
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		t.Skip("the recorded answer is little-endian")
	}
	old, err := hex.DecodeString(oldKernelENOENT)
	if err != nil {
		t.Fatal(err)
	}
	named := func(off uint32) []byte {
		b := append([]byte{}, old...)
		b = binary.NativeEndian.AppendUint16(b, 8)
		b = binary.NativeEndian.AppendUint16(b, unix.NLMSGERR_ATTR_OFFS)
		b = binary.NativeEndian.AppendUint32(b, off)
		binary.NativeEndian.PutUint32(b, uint32(len(b)))
		binary.NativeEndian.PutUint16(b[6:], unix.NLM_F_ACK_TLVS)
		return b
	}
	for _, tc := range []struct {
		name string
		b    []byte
		want answer
	}{
		{"before 5.19: no offset", old, answerUnnamed},
		{"5.19 on: the element", named(48), answerAbsent},
		{"5.19 on: the set's name", named(32), answerOther},
		{"before 5.19, another sequence", old, answerOther},
	} {
		seq := uint32(1)
		if strings.Contains(tc.name, "another sequence") {
			seq = 2
		}
		if got := flowedVerdict(tc.b, seq, 48); got != tc.want {
			t.Errorf("%s: %d, want %d", tc.name, got, tc.want)
		}
		present, ok := flowedAnswer(tc.b, seq, 48)
		if present || ok != (tc.want == answerAbsent) {
			t.Errorf("%s: flowedAnswer present %v ok %v", tc.name, present, ok)
		}
	}
}
