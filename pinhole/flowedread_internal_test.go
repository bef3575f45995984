package pinhole

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
)

// TestFlowedAnswer (h/flushdump): what flowedReader takes as a lookup's
// answer, and what fails the batch (its addresses then taken as flowed).
func TestFlowedAnswer(t *testing.T) {
	msg := func(typ uint16, seq uint32, data ...byte) []byte {
		b := binary.NativeEndian.AppendUint32(nil, uint32(unix.NLMSG_HDRLEN+len(data)))
		b = binary.NativeEndian.AppendUint16(b, typ)
		b = binary.NativeEndian.AppendUint16(b, 0)
		b = binary.NativeEndian.AppendUint32(b, seq)
		b = binary.NativeEndian.AppendUint32(b, 0) // port id
		b = append(b, data...)
		for len(b)%4 != 0 {
			b = append(b, 0)
		}
		return b
	}
	errno := func(e int32) []byte {
		return append(binary.NativeEndian.AppendUint32(nil, uint32(e)), make([]byte, 16)...)
	}
	const newElem = unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWSETELEM
	elem := msg(newElem, 7, 10, 0, 0, 0, 1, 2, 3)
	for _, tc := range []struct {
		name          string
		b             []byte
		present, isOK bool
	}{
		{"the element", elem, true, true},
		{"ENOENT", msg(unix.NLMSG_ERROR, 7, errno(-int32(unix.ENOENT))...), false, true},
		{"the element, another sequence", msg(newElem, 8, 10, 0, 0, 0), false, false},
		{"ENOENT, another sequence", msg(unix.NLMSG_ERROR, 6, errno(-int32(unix.ENOENT))...), false, false},
		{"another error", msg(unix.NLMSG_ERROR, 7, errno(-int32(unix.EPERM))...), false, false},
		{"an acknowledgement", msg(unix.NLMSG_ERROR, 7, errno(0)...), false, false},
		{"a short error", msg(unix.NLMSG_ERROR, 7, 0xfe), false, false},
		{"another type", msg(unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWSET, 7, 1, 2, 3, 4), false, false},
		{"a done", msg(unix.NLMSG_DONE, 7, 0, 0, 0, 0), false, false},
		{"two messages", append(append([]byte{}, elem...), elem...), false, false},
		{"a length past the datagram", elem[:len(elem)-4], false, false},
		{"a header only, cut", elem[:12], false, false},
		{"nothing", nil, false, false},
	} {
		present, ok := flowedAnswer(tc.b, 7)
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
}
