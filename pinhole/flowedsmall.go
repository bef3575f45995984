package pinhole

import (
	"encoding/binary"
	"net/netip"
	"syscall"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// A small flowed6 read whole (h/flushone, BENCHMARKS.md item 86). A walk
// asks about many addresses (≈ 900 in the churn row's flusher every
// 100 ms), each one GETSETELEM (flowedLookup: ≈ 2.5-4 µs, mostly the
// kernel's lookup and an answer's skb: ≈ 2.3 ms a walk, item 82), while
// flowed6 often holds few addresses: only those a flow was admitted to
// since the last prune. Then one dump of the set answers them all. A
// dump cannot be cut short (the kernel resumes it by skipping what it
// sent: quadratic, 405 ms at 65 536 addresses, item 71; closing the
// socket instead waits on nftables' commit_mutex, item 81), so it is
// taken only when the set's own count (NFTA_SET_COUNT, Linux 6.16's
// "export set count and backend name to userspace"; no such attribute on
// older kernels: the lookups as before) says it is small.
//
// What a dump tells: the kernel walks the set once per datagram it
// fills, resuming by count (the walk's skip). Only the first walk is
// trusted to be whole: a later one skips by a count that a resize or an
// add meanwhile makes wrong. So the dump answers "absent" only when
// every element came in its first datagram (nothing after it but the
// end); an address present in any datagram is present (walked, the safe
// side); anything else leaves the addresses unanswered, for the lookups.
// Nothing after the first datagram does not tell that the first walk
// reached the end, though: one that filled its datagram leaves the rest
// to the next walk, which, when elements left the set meanwhile (another
// writer's delete; an aborted add), counts no more than it skips and
// sends nothing (review h/revfo, TestFlowedDumpShrunkBetweenWalks: 1 100
// addresses in the set all along, 200 others coming and going, some of
// the 1 100 answered absent). So the set is asked again after the dump:
// the first datagram was the whole set only if no commit came meanwhile
// (the generation, the answers' nfgenmsg res_id, the same: a commit
// moves it before it changes anything) and the set counts no more
// elements than that datagram held distinct (an aborted add, which
// moves no generation, was counted while it was in the set: a walk cut
// short leaves at least one element unseen that is still counted).

// flowedDumpMax is the most elements flowed6 may count for a walk to read
// it whole (≈ 28 bytes an element: ≈ 1 150 fit the 32 KiB datagram the
// kernel fills for a reader whose buffer is that large). A var for tests
// only (SetFlowedDumpMax; negative: never).
var flowedDumpMax = 512

// flowedDumpMin is the fewest distinct addresses a walk asks about for
// the count and the dump (two round trips) to be worth trying in place
// of the lookups (one round trip each flowedBatch).
const flowedDumpMin = flowedBatch

// flowedDumpPer: the dump is read only while the set counts at most this
// many elements an address asked (a dumped element costs the kernel a
// copy where an asked address costs a lookup and an answer's skb).
const flowedDumpPer = 4

// nftaSetCount is NFTA_SET_COUNT (Linux 6.16): a set's element count.
const nftaSetCount = 20

// flowedDumpBuf is the dump's read buffer: netlink sizes a dump's
// datagrams by the largest read buffer its socket has seen, up to 32 KiB
// (netlink_recvmsg's max_recvmsg_len); the count's read primes it.
const flowedDumpBuf = 32 << 10

// flowedFromDump answers asked from one dump of flowed6 if the set counts
// few elements (flowedDumpMax, flowedDumpPer): seen[a] set for every
// IPv6 address of asked (true in the set, false not) when the dump was
// whole in its first datagram, for the present ones only otherwise;
// nothing when not tried or anything failed (the socket closed, as
// flowedLookup does). Caller holds b.flowed.mu.
func (b *Backend) flowedFromDump(asked []netip.Addr, seen map[netip.Addr]bool) {
	want := make(map[netip.Addr]struct{}, len(asked))
	for _, a := range asked {
		if _, ok := seen[a]; !ok && a.Is6() && !a.Is4In6() && a.Zone() == "" {
			want[a] = struct{}{}
		}
	}
	if len(want) < flowedDumpMin {
		return
	}
	c := b.flowedConn()
	if c == nil {
		return
	}
	rd := b.flowedReaderOf()
	rc, err := c.SyscallConn()
	if err != nil {
		return
	}
	countReq := b.flowedSetRequest(unix.NFT_MSG_GETSET, unix.NFTA_SET_TABLE, unix.NFTA_SET_NAME, 0)
	n, gen, ok := rd.setCount(rc, countReq)
	if !ok {
		b.flowed.raw.close()
		return
	}
	if n < 0 || n > flowedDumpMax || n > flowedDumpPer*len(want) {
		return // no count (an older kernel), or too many: the lookups
	}
	if rd.dumped == nil {
		rd.dumped = make(map[[16]byte]struct{}, n)
	}
	clear(rd.dumped)
	whole, ok := rd.dumpElems(rc, b.flowedSetRequest(unix.NFT_MSG_GETSETELEM, unix.NFTA_SET_ELEM_LIST_TABLE, unix.NFTA_SET_ELEM_LIST_SET, unix.NLM_F_DUMP),
		func(key [16]byte) {
			rd.dumped[key] = struct{}{}
			if a := netip.AddrFrom16(key); a.IsValid() {
				if _, ok := want[a]; ok {
					seen[a] = true
				}
			}
		})
	if !ok {
		b.flowed.raw.close()
		return
	}
	if whole {
		// Nothing left the set while the dump ran (see above).
		n2, gen2, ok := rd.setCount(rc, countReq)
		if !ok {
			b.flowed.raw.close()
			return
		}
		whole = gen2 == gen && n2 >= 0 && n2 <= len(rd.dumped)
	}
	if flowedDumpHook != nil {
		flowedDumpHook(n, whole)
	}
	if whole {
		for a := range want {
			if _, ok := seen[a]; !ok {
				seen[a] = false
			}
		}
	}
}

// flowedDumpHook, when set (tests only), is told of each dump read: the
// count it was taken at, and whether it came whole in its first datagram.
var flowedDumpHook func(count int, whole bool)

// flowedConn is FlowedAddrs' lookup socket, dialled if need be (nil when
// that fails). Caller holds b.flowed.mu.
func (b *Backend) flowedConn() *netlink.Conn {
	r := &b.flowed.raw
	if r.c == nil {
		c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: b.netns})
		if err != nil {
			return nil
		}
		// An ENOENT's acknowledgement names the attribute not
		// found: the element, or the table or set (flowedAnswer).
		if err := c.SetOption(netlink.ExtendedAcknowledge, true); err != nil {
			c.Close()
			return nil
		}
		r.c = c
	}
	return r.c
}

// flowedReaderOf is the lookups' reader, made if need be. Caller holds
// b.flowed.mu.
func (b *Backend) flowedReaderOf() *flowedReader {
	if b.flowed.rd == nil {
		b.flowed.rd = newFlowedReader(b.flowedGet(netip.IPv6Unspecified()))
	}
	return b.flowed.rd
}

// flowedSetRequest is a request of type typ (NFT_MSG_GETSET or
// GETSETELEM) naming flowed6's table and set by the attributes
// tableAttr and setAttr, with flags besides NLM_F_REQUEST; its sequence
// number 0 (written at send).
func (b *Backend) flowedSetRequest(typ, tableAttr, setAttr uint16, flags uint16) []byte {
	ae := netlink.NewAttributeEncoder()
	ae.String(tableAttr, b.table.Name)
	ae.String(setAttr, b.flowed6.Name)
	attrs, _ := ae.Encode() // strings: cannot fail
	data := append([]byte{byte(b.table.Family), unix.NFNETLINK_V0, 0, 0}, attrs...)
	l := nlmsgAlign(unix.NLMSG_HDRLEN + len(data))
	req := make([]byte, l)
	binary.NativeEndian.PutUint32(req, uint32(l))
	binary.NativeEndian.PutUint16(req[4:], unix.NFNL_SUBSYS_NFTABLES<<8|typ)
	binary.NativeEndian.PutUint16(req[6:], unix.NLM_F_REQUEST|flags)
	copy(req[unix.NLMSG_HDRLEN:], data)
	return req
}

// send writes req, its sequence number the next, on rc; the number sent.
func (r *flowedReader) send(rc syscall.RawConn, req []byte) (uint32, bool) {
	r.seq++
	binary.NativeEndian.PutUint32(req[8:], r.seq)
	var serr error
	if err := rc.Control(func(fd uintptr) {
		var n int
		n, serr = unix.SendmsgN(int(fd), req, nil, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}, 0)
		if serr == nil && n != len(req) {
			serr = unix.EMSGSIZE
		}
	}); err != nil || serr != nil {
		return 0, false
	}
	return r.seq, true
}

// recvBig reads one datagram of the kernel's (queued by the request's
// send: MSG_DONTWAIT) into r.big, which is flowedDumpBuf long.
func (r *flowedReader) recvBig(rc syscall.RawConn) ([]byte, bool) {
	if r.big == nil {
		r.big = make([]byte, flowedDumpBuf)
	}
	var n int
	var from unix.Sockaddr
	var rerr error
	var flags int
	if err := rc.Control(func(fd uintptr) {
		n, _, flags, from, rerr = unix.Recvmsg(int(fd), r.big, nil, unix.MSG_DONTWAIT)
	}); err != nil || rerr != nil || flags&unix.MSG_TRUNC != 0 {
		return nil, false
	}
	if sa, ok := from.(*unix.SockaddrNetlink); !ok || sa.Pid != 0 {
		return nil, false
	}
	return r.big[:n], true
}

// setCount sends req (a GETSET of flowed6) and reads its answer: the
// set's NFTA_SET_COUNT, -1 when the kernel gives none (before Linux
// 6.16), and the ruleset's generation as the answer tells it (its
// nfgenmsg res_id: the low 16 bits of nf_tables' base_seq, which every
// commit moves before it changes anything). false for anything but one
// NEWSET of its sequence.
func (r *flowedReader) setCount(rc syscall.RawConn, req []byte) (int, uint16, bool) {
	seq, ok := r.send(rc, req)
	if !ok {
		return 0, 0, false
	}
	d, ok := r.recvBig(rc)
	if !ok {
		return 0, 0, false
	}
	typ, _, payload, rest, ok := nlMessage(d, seq)
	if !ok || len(rest) != 0 || typ != unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWSET || len(payload) < 4 {
		return 0, 0, false
	}
	gen := binary.BigEndian.Uint16(payload[2:])
	n := -1
	ok = nlAttrs(payload[4:], func(t uint16, v []byte) bool {
		if t == nftaSetCount {
			if len(v) != 4 {
				return false
			}
			n = int(binary.BigEndian.Uint32(v))
		}
		return true
	})
	return n, gen, ok
}

// dumpElems sends req (a GETSETELEM dump of flowed6) and reads the dump
// to its end, each element's 16-byte key given to key. whole: every
// element came in the first datagram (see above). false for anything
// else than NEWSETELEMs of its sequence and the end (an error, a read
// that finds nothing queued: the kernel fills the next datagram within
// the read before).
func (r *flowedReader) dumpElems(rc syscall.RawConn, req []byte, key func([16]byte)) (whole, ok bool) {
	seq, ok := r.send(rc, req)
	if !ok {
		return false, false
	}
	whole = true
	for part := 0; ; part++ {
		d, ok := r.recvBig(rc)
		if !ok {
			return false, false
		}
		done, partWhole, ok := dumpDatagram(d, seq, part, key)
		if !ok {
			return false, false
		}
		whole = whole && partWhole
		if done {
			return whole, true
		}
	}
}

// dumpDatagram reads d, datagram number part (from 0) of the dump of
// sequence seq (dumpElems), each element's key given to key. done: it
// ended the dump (NLMSG_DONE, nothing after it). whole: it held no
// element, or is the first. false for anything but NEWSETELEMs of seq
// and the end.
func dumpDatagram(d []byte, seq uint32, part int, key func([16]byte)) (done, whole, ok bool) {
	whole = true
	for len(d) > 0 {
		typ, flags, payload, rest, ok := nlMessage(d, seq)
		if !ok {
			return false, false, false
		}
		d = rest
		switch {
		case typ == unix.NLMSG_DONE:
			if len(payload) < 4 || binary.NativeEndian.Uint32(payload) != 0 || len(d) != 0 {
				return false, false, false
			}
			return true, whole, true
		case typ != unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWSETELEM || flags&unix.NLM_F_MULTI == 0 || len(payload) < 4:
			return false, false, false
		}
		elems := 0
		if !nlAttrs(payload[4:], func(t uint16, v []byte) bool {
			if t != unix.NFTA_SET_ELEM_LIST_ELEMENTS {
				return true
			}
			return nlAttrs(v, func(t uint16, v []byte) bool {
				if t != unix.NFTA_LIST_ELEM {
					return false
				}
				elems++
				keys := 0
				return nlAttrs(v, func(t uint16, v []byte) bool {
					if t != unix.NFTA_SET_ELEM_KEY {
						return true
					}
					return nlAttrs(v, func(t uint16, v []byte) bool {
						if t != unix.NFTA_DATA_VALUE || len(v) != 16 || keys > 0 {
							return false
						}
						keys++
						key([16]byte(v))
						return true
					})
				}) && keys == 1
			})
		}) {
			return false, false, false
		}
		if elems > 0 && part > 0 {
			whole = false
		}
	}
	return false, whole, true
}

// nlMessage splits the first netlink message of d, which must be of
// sequence seq: its type, flags, payload and what follows it.
func nlMessage(d []byte, seq uint32) (typ, flags uint16, payload, rest []byte, ok bool) {
	if len(d) < unix.NLMSG_HDRLEN {
		return 0, 0, nil, nil, false
	}
	l := int(binary.NativeEndian.Uint32(d))
	if l < unix.NLMSG_HDRLEN || l > len(d) || binary.NativeEndian.Uint32(d[8:]) != seq {
		return 0, 0, nil, nil, false
	}
	typ = binary.NativeEndian.Uint16(d[4:])
	flags = binary.NativeEndian.Uint16(d[6:])
	return typ, flags, d[unix.NLMSG_HDRLEN:l], d[min(nlmsgAlign(l), len(d)):], true
}

// nlAttrs calls fn with each attribute of b (its type without the nested
// and byte-order flags, its value) until fn returns false; false then,
// or when b is not a well-formed run of attributes.
func nlAttrs(b []byte, fn func(typ uint16, v []byte) bool) bool {
	for len(b) > 0 {
		if len(b) < unix.NLA_HDRLEN {
			return false
		}
		n := int(binary.NativeEndian.Uint16(b))
		if n < unix.NLA_HDRLEN || n > len(b) {
			return false
		}
		t := binary.NativeEndian.Uint16(b[2:]) &^ (unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
		if !fn(t, b[unix.NLA_HDRLEN:n]) {
			return false
		}
		b = b[min(nlmsgAlign(n), len(b)):]
	}
	return true
}
