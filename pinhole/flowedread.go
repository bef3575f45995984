package pinhole

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"syscall"
	"unsafe"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// flowedAnswerLen bounds one lookup's answer (flowedLookup): a hit's
// NEWSETELEM (the table's and set's names, one IPv6 key: ≈ 100 bytes)
// or a miss's NLMSG_ERROR quoting the request (≈ 100 bytes, with an
// extended ack's attributes a few more). A longer datagram is truncated
// (MSG_TRUNC) and the batch fails: its addresses are taken as flowed.
const flowedAnswerLen = 512

// flowedReader sends a batch of lookups (flowedLookup) and reads their
// answers through the socket's descriptor: the requests written from one
// encoded template, its key patched, in one sendmsg; the answers,
// flowedBatch datagrams, in one recvmmsg into buffers kept from batch to
// batch. Before (BENCHMARKS.md item 82), each answer was one
// mdlayher/netlink Receive (a page-sized allocation, a peek and a read,
// each read starting a goroutine to watch a context: mdlayher/socket
// rwT) and each request encoded by an AttributeEncoder and marshalled
// again by SendMessages: ≈ 9.7-12 µs an address (items 73, 79, 81),
// which at ≈ 900 addresses a walk was ≈ 8 ms of the flusher's CPU every
// 100 ms in the churn row. Only what it asked is taken as an answer;
// anything else fails the batch (the safe side). The socket is its own
// (flowedState.raw): the sequence numbers are its.
type flowedReader struct {
	req     []byte                // one request, its key zero (flowedGet)
	keyOff  int                   // where its key is
	elemOff int                   // where its NFTA_LIST_ELEM is (flowedAnswer)
	out     []byte                // a batch's requests
	seq     uint32                // the last sequence number sent
	last    answer                // what the last datagram read was (FlowedMissNamed)
	big     []byte                // a dump's datagrams (flowedsmall.go), made when first read
	dumped  map[[16]byte]struct{} // a dump's distinct keys (flowedsmall.go)

	hdrs  [flowedBatch]unix.Mmsghdr
	iovs  [flowedBatch]unix.Iovec
	names [flowedBatch]unix.RawSockaddrNetlink
	bufs  [flowedBatch][flowedAnswerLen]byte
}

// newFlowedReader makes m, a lookup of the unspecified address (its key
// zero, the message's last 16 bytes), the template of every request.
func newFlowedReader(m netlink.Message) *flowedReader {
	l := nlmsgAlign(unix.NLMSG_HDRLEN + len(m.Data))
	req := make([]byte, l)
	binary.NativeEndian.PutUint32(req, uint32(l))
	binary.NativeEndian.PutUint16(req[4:], uint16(m.Header.Type))
	binary.NativeEndian.PutUint16(req[6:], uint16(m.Header.Flags))
	copy(req[unix.NLMSG_HDRLEN:], m.Data)
	// The key is NFTA_DATA_VALUE's, in NFTA_SET_ELEM_KEY, in the one
	// NFTA_LIST_ELEM: three attribute headers before it.
	keyOff := unix.NLMSG_HDRLEN + len(m.Data) - 16
	return &flowedReader{req: req, keyOff: keyOff, elemOff: keyOff - 3*unix.NLA_HDRLEN}
}

func nlmsgAlign(n int) int { return (n + unix.NLMSG_ALIGNTO - 1) &^ (unix.NLMSG_ALIGNTO - 1) }

// flowedRecvHook, when set (tests only), is told of each batch of answers
// read: how many datagrams, through which path ("mmsg").
var flowedRecvHook func(path string, n int)

// lookup sends a lookup of each of batch (at most flowedBatch IPv6
// addresses) on c and calls set(i, present) for each answer in order:
// present for batch[i]'s element (a NEWSETELEM of its sequence), absent
// for the kernel's ENOENT to it. The kernel answers a GETSETELEM
// synchronously, one datagram each, queued by the send's return. false,
// with set called for a prefix only, when the send failed, anything else
// came, an answer is missing or a read failed: the caller closes the
// socket and takes the rest as flowed.
func (r *flowedReader) lookup(c *netlink.Conn, batch []netip.Addr, set func(i int, present bool)) bool {
	rc, err := c.SyscallConn()
	if err != nil || len(batch) > flowedBatch {
		return false
	}
	first := r.seq + 1
	r.out = r.out[:0]
	for i, a := range batch {
		r.appendRequest(a, first+uint32(i))
	}
	r.seq += uint32(len(batch))
	var serr error
	if err := rc.Control(func(fd uintptr) {
		var n int
		n, serr = unix.SendmsgN(int(fd), r.out, nil, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}, 0)
		if serr == nil && n != len(r.out) {
			serr = unix.EMSGSIZE
		}
	}); err != nil || serr != nil {
		return false
	}
	return r.answers(rc, first, len(batch), set)
}

// appendRequest adds the lookup of a, of sequence seq, to r.out.
func (r *flowedReader) appendRequest(a netip.Addr, seq uint32) {
	k := len(r.out)
	r.out = append(r.out, r.req...)
	binary.NativeEndian.PutUint32(r.out[k+8:], seq)
	key := a.As16()
	copy(r.out[k+r.keyOff:], key[:])
}

// answers reads the n answers to the requests of sequence first on: see
// lookup.
func (r *flowedReader) answers(rc syscall.RawConn, first uint32, n int, set func(i int, present bool)) bool {
	next := 0
	for next < n {
		want := n - next
		for i := range want {
			r.iovs[i] = unix.Iovec{Base: &r.bufs[i][0]}
			r.iovs[i].SetLen(flowedAnswerLen)
			r.hdrs[i] = unix.Mmsghdr{Hdr: unix.Msghdr{Name: (*byte)(unsafe.Pointer(&r.names[i])), Namelen: unix.SizeofSockaddrNetlink, Iov: &r.iovs[i]}}
			r.hdrs[i].Hdr.SetIovlen(1)
		}
		var got int
		var errno unix.Errno
		if err := rc.Control(func(fd uintptr) {
			k, _, e := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&r.hdrs[0])), uintptr(want), unix.MSG_DONTWAIT, 0, 0)
			got, errno = int(k), e
		}); err != nil || errno != 0 || got <= 0 || got > want {
			return false // EAGAIN too: every answer is queued by the send's return
		}
		if flowedRecvHook != nil {
			flowedRecvHook("mmsg", got)
		}
		for i := range got {
			h := &r.hdrs[i]
			if h.Hdr.Flags&unix.MSG_TRUNC != 0 || h.Len > flowedAnswerLen || r.names[i].Pid != 0 {
				return false // too long for an answer, or not the kernel's
			}
			r.last = flowedVerdict(r.bufs[i][:h.Len], first+uint32(next), uint32(r.elemOff))
			if r.last != answerPresent && r.last != answerAbsent {
				return false
			}
			set(next, r.last == answerPresent)
			next++
		}
	}
	return true
}

// answer is what a datagram is to a lookup (flowedVerdict).
type answer uint8

const (
	answerOther   answer = iota // not an answer to it: fails the batch
	answerPresent               // its element
	answerAbsent                // ENOENT naming the element
	// answerUnnamed is an ENOENT that names no attribute: the element,
	// the set or the table missing, not told. Kernels before Linux
	// 5.19's b53c116642502 (and its stable backports) answer every
	// missing element so: every lookup fails, every address is taken as
	// flowed (FlowedMissNamed tells).
	answerUnnamed
)

// flowedAnswer is flowedVerdict as present and ok (an answer: present
// or absent).
func flowedAnswer(b []byte, seq uint32, elemOff uint32) (present, ok bool) {
	v := flowedVerdict(b, seq, elemOff)
	return v == answerPresent, v == answerPresent || v == answerAbsent
}

// flowedVerdict judges the datagram b as the answer to the lookup of
// sequence seq: one message, a NEWSETELEM (present) or an NLMSG_ERROR of
// ENOENT (absent) of that sequence whose extended acknowledgement names
// the element as the attribute not found (NLMSGERR_ATTR_OFFS at elemOff,
// the offset of the request's NFTA_LIST_ELEM: nf_tables' NL_SET_BAD_ATTR);
// an ENOENT naming no attribute is answerUnnamed; anything else is
// answerOther. The kernel answers ENOENT also for a missing table or set,
// the offset then its name's attribute: not absent
// (TestFlowedLookupWhereNoSet).
func flowedVerdict(b []byte, seq uint32, elemOff uint32) answer {
	if len(b) < unix.NLMSG_HDRLEN {
		return answerOther
	}
	l := int(binary.NativeEndian.Uint32(b))
	if l < unix.NLMSG_HDRLEN || l > len(b) || len(b)-l >= unix.NLMSG_ALIGNTO {
		return answerOther // short, or a second message after it
	}
	if binary.NativeEndian.Uint32(b[8:]) != seq {
		return answerOther
	}
	switch binary.NativeEndian.Uint16(b[4:]) {
	case unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWSETELEM:
		return answerPresent
	case unix.NLMSG_ERROR:
		flags := binary.NativeEndian.Uint16(b[6:])
		p := b[unix.NLMSG_HDRLEN:l]
		if len(p) < 4+unix.NLMSG_HDRLEN || int32(binary.NativeEndian.Uint32(p)) != -int32(unix.ENOENT) {
			return answerOther
		}
		if flags&unix.NLM_F_ACK_TLVS == 0 {
			return answerUnnamed
		}
		quoted := unix.NLMSG_HDRLEN // capped: the request's header only
		if flags&unix.NLM_F_CAPPED == 0 {
			quoted = nlmsgAlign(int(binary.NativeEndian.Uint32(p[4:])))
		}
		if quoted < unix.NLMSG_HDRLEN || 4+quoted > len(p) {
			return answerOther
		}
		tlv := p[4+quoted:]
		for len(tlv) >= 4 {
			n := int(binary.NativeEndian.Uint16(tlv))
			if n < 4 || n > len(tlv) {
				return answerOther
			}
			if binary.NativeEndian.Uint16(tlv[2:])&^(unix.NLA_F_NESTED|unix.NLA_F_NET_BYTEORDER) == unix.NLMSGERR_ATTR_OFFS {
				if n == 8 && binary.NativeEndian.Uint32(tlv[4:]) == elemOff {
					return answerAbsent
				}
				return answerOther
			}
			tlv = tlv[min(nlmsgAlign(n), len(tlv)):]
		}
		if len(tlv) == 0 {
			return answerUnnamed // no offset among the TLVs
		}
	}
	return answerOther
}

// FlowedMissNamed asks the kernel once, now, for an element that cannot
// be in flowed6 (the unspecified address: no flow goes to it) and
// reports whether its ENOENT names the element (NLMSGERR_ATTR_OFFS), as
// FlowedAddrs needs to tell "absent" from "the set or table missing".
// false, nil: the kernel names nothing (before Linux 5.19's
// b53c116642502 and its stable backports): every lookup then fails and
// every IPv6 address is taken as flowed (safe: its connections are
// walked), so every IPv6 delete walks conntrack. An error: no flowed6
// here (attached mode, an older layout) or the lookup got no judged
// answer.
func (b *Backend) FlowedMissNamed() (bool, error) {
	f := &b.flowed
	f.mu.Lock()
	defer f.mu.Unlock()
	if !b.recordsFlows() {
		return false, errors.New("pinhole: flowed6 not in use")
	}
	if f.rd != nil {
		f.rd.last = answerOther
	}
	seen := map[netip.Addr]bool{}
	b.flowedLookup([]netip.Addr{netip.IPv6Unspecified()}, seen)
	switch _, ok := seen[netip.IPv6Unspecified()]; {
	case ok:
		return true, nil
	case f.rd != nil && f.rd.last == answerUnnamed:
		return false, nil
	}
	return false, errors.New("pinhole: the flowed6 lookup got no answer")
}
