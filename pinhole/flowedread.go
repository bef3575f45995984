package pinhole

import (
	"encoding/binary"
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

// flowedReader reads a lookup batch's answers through the socket's
// descriptor, flowedBatch datagrams in one recvmmsg into buffers kept
// from batch to batch. Before (BENCHMARKS.md item 82), each answer was
// one mdlayher/netlink Receive: a page-sized allocation, a peek and a
// read, each read starting a goroutine to watch a context (mdlayher/socket
// rwT), ≈ 7-9 µs of the ≈ 9.7 µs an address (items 73, 79, 81), which
// at ≈ 900 addresses a walk was ≈ 8 ms of the flusher's CPU every 100 ms
// in the churn row. Only what flowedLookup asked is taken as an answer;
// anything else fails the batch (the safe side).
type flowedReader struct {
	hdrs  [flowedBatch]unix.Mmsghdr
	iovs  [flowedBatch]unix.Iovec
	names [flowedBatch]unix.RawSockaddrNetlink
	bufs  [flowedBatch][flowedAnswerLen]byte
}

// flowedRecvHook, when set (tests only), is told of each batch of answers
// read: how many datagrams, through which path ("mmsg").
var flowedRecvHook func(path string, n int)

// answers reads the answers to msgs, sent on c (the kernel queues them
// within the send: a GETSETELEM is answered synchronously, one datagram
// each), and calls set(i, present) for each in order: present for
// msgs[i]'s element (a NEWSETELEM of its sequence), absent for the
// kernel's ENOENT to it. false, with set called for a prefix only, when
// anything else came, an answer is missing or a read failed: the caller
// closes the socket and takes the rest as flowed.
func (r *flowedReader) answers(c *netlink.Conn, msgs []netlink.Message, set func(i int, present bool)) bool {
	rc, err := c.SyscallConn()
	if err != nil {
		return false
	}
	next := 0
	for next < len(msgs) {
		want := len(msgs) - next
		for i := range want {
			r.iovs[i] = unix.Iovec{Base: &r.bufs[i][0]}
			r.iovs[i].SetLen(flowedAnswerLen)
			r.hdrs[i] = unix.Mmsghdr{Hdr: unix.Msghdr{Name: (*byte)(unsafe.Pointer(&r.names[i])), Namelen: unix.SizeofSockaddrNetlink, Iov: &r.iovs[i]}}
			r.hdrs[i].Hdr.SetIovlen(1)
		}
		var got int
		var errno unix.Errno
		if err := rc.Control(func(fd uintptr) {
			n, _, e := unix.RawSyscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&r.hdrs[0])), uintptr(want), unix.MSG_DONTWAIT, 0, 0)
			got, errno = int(n), e
		}); err != nil || errno != 0 || got <= 0 || got > want {
			return false // EAGAIN too: every answer is queued by the send's return
		}
		if flowedRecvHook != nil {
			flowedRecvHook("mmsg", got)
		}
		for i := range got {
			h := &r.hdrs[i]
			if h.Hdr.Flags&unix.MSG_TRUNC != 0 || r.names[i].Pid != 0 {
				return false // too long for an answer, or not the kernel's
			}
			present, ok := flowedAnswer(r.bufs[i][:h.Len], msgs[next].Header.Sequence)
			if !ok {
				return false
			}
			set(next, present)
			next++
		}
	}
	return true
}

// flowedAnswer judges the datagram b as the answer to the lookup of
// sequence seq: one message, a NEWSETELEM (present) or an NLMSG_ERROR of
// ENOENT (absent) of that sequence; ok false for anything else.
func flowedAnswer(b []byte, seq uint32) (present, ok bool) {
	if len(b) < unix.NLMSG_HDRLEN {
		return false, false
	}
	l := int(binary.NativeEndian.Uint32(b))
	if l < unix.NLMSG_HDRLEN || l > len(b) || len(b)-l >= unix.NLMSG_ALIGNTO {
		return false, false // short, or a second message after it
	}
	if binary.NativeEndian.Uint32(b[8:]) != seq {
		return false, false
	}
	switch binary.NativeEndian.Uint16(b[4:]) {
	case unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_NEWSETELEM:
		return true, true
	case unix.NLMSG_ERROR:
		if l >= unix.NLMSG_HDRLEN+4 && int32(binary.NativeEndian.Uint32(b[unix.NLMSG_HDRLEN:])) == -int32(unix.ENOENT) {
			return false, true
		}
	}
	return false, false
}
