package pinhole

import (
	"encoding/binary"
	"net/netip"
	"os"
	"testing"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"
)

// TestFlowedAnswersRead (review h/revdump): flowedReader.answers over a
// datagram socket pair, the kernel's side written by the test: a batch
// is taken whole only when each of its answers came, in order, each of
// its own sequence, whole, from port 0. A missing answer (fewer queued
// than asked: the second recvmmsg finds none), an answer left from an
// earlier batch, one cut (MSG_TRUNC) and one from a named sender fail
// the batch, set told of the answers before it only.
func TestFlowedAnswersRead(t *testing.T) {
	tbl := &nftables.Table{Family: nftables.TableFamilyINet, Name: "pcpd"}
	b := &Backend{table: tbl, flowed6: flowedSet(tbl)}
	tmpl := newFlowedReader(b.flowedGet(netip.IPv6Unspecified()))
	hdr := func(l int, typ, flags uint16, seq uint32) []byte {
		h := binary.NativeEndian.AppendUint32(nil, uint32(l))
		h = binary.NativeEndian.AppendUint16(h, typ)
		h = binary.NativeEndian.AppendUint16(h, flags)
		h = binary.NativeEndian.AppendUint32(h, seq)
		return binary.NativeEndian.AppendUint32(h, 0)
	}
	elem := func(seq uint32) []byte {
		return append(hdr(24, unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWSETELEM, 0, seq), 10, 0, 0, 0, 1, 2, 3, 4)
	}
	enoent := func(seq uint32) []byte {
		q := append([]byte{}, tmpl.req...)
		binary.NativeEndian.PutUint32(q[8:], seq)
		e := -int32(unix.ENOENT)
		p := binary.NativeEndian.AppendUint32(nil, uint32(e))
		p = append(p, q...)
		p = binary.NativeEndian.AppendUint32(p, 8|unix.NLMSGERR_ATTR_OFFS<<16)
		p = binary.NativeEndian.AppendUint32(p, uint32(tmpl.elemOff))
		return append(hdr(unix.NLMSG_HDRLEN+len(p), unix.NLMSG_ERROR, unix.NLM_F_ACK_TLVS, seq), p...)
	}
	long := append(hdr(flowedAnswerLen+64, unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWSETELEM, 0, 11), make([]byte, flowedAnswerLen+48)...)
	const first = 10
	for _, tc := range []struct {
		name  string
		named bool // sent from a bound (abstract) address: not port 0
		dgs   [][]byte
		ok    bool
		got   []bool
	}{
		{"all", false, [][]byte{elem(10), enoent(11), elem(12)}, true, []bool{true, false, true}},
		{"one missing", false, [][]byte{elem(10), enoent(11)}, false, []bool{true, false}},
		{"an earlier batch's", false, [][]byte{enoent(9), elem(10), enoent(11)}, false, nil},
		{"out of order", false, [][]byte{elem(10), elem(12), enoent(11)}, false, []bool{true}},
		{"cut", false, [][]byte{elem(10), long, elem(12)}, false, []bool{true}},
		{"not port 0", true, [][]byte{elem(10), enoent(11), elem(12)}, false, nil},
	} {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM, 0)
		if err != nil {
			t.Fatal(err)
		}
		f := os.NewFile(uintptr(fds[0]), "answers")
		if tc.named {
			if err := unix.Bind(fds[1], &unix.SockaddrUnix{Name: "@pcpd-revdump-answers"}); err != nil {
				t.Fatal(err)
			}
		}
		for _, d := range tc.dgs {
			if err := unix.Send(fds[1], d, 0); err != nil {
				t.Fatal(err)
			}
		}
		rc, err := f.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		r := newFlowedReader(b.flowedGet(netip.IPv6Unspecified()))
		var got []bool
		ok := r.answers(rc, first, 3, func(i int, present bool) {
			if i != len(got) {
				t.Errorf("%s: set(%d) after %d answers", tc.name, i, len(got))
			}
			got = append(got, present)
		})
		if ok != tc.ok || len(got) != len(tc.got) {
			t.Errorf("%s: ok %v, answers %v; want %v, %v", tc.name, ok, got, tc.ok, tc.got)
		} else {
			for i := range got {
				if got[i] != tc.got[i] {
					t.Errorf("%s: answer %d present %v, want %v", tc.name, i, got[i], tc.got[i])
				}
			}
		}
		f.Close()
		unix.Close(fds[1])
	}
}
