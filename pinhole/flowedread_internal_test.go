package pinhole

import (
	"encoding/binary"
	"testing"

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
