// Package ctnl talks ctnetlink (the kernel's conntrack over netlink) for
// pcpd's dumps and filters: the constants, the attributes of a dump's
// kernel-side filters and of a delete, a tuple's decoding, and a
// streamed, status-filtered dump (Scan). It does what vishvananda/netlink
// cannot: its ConntrackTableList reads and decodes the whole table before
// it returns (at 1 000 000 entries ≈ 1 GB allocated: BENCHMARKS.md item
// 49) and sends no filter; its ConntrackDeleteFilters walks the table in
// user space. Both pinhole and server use it; it imports nothing of pcpd.
package ctnl

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Message types (enum cntl_msg_types, linux/netfilter/nfnetlink_conntrack.h).
const (
	MsgNew    = 0 // IPCTNL_MSG_CT_NEW
	MsgGet    = 1 // IPCTNL_MSG_CT_GET
	MsgDelete = 2 // IPCTNL_MSG_CT_DELETE
)

// Attributes (enum ctattr_type, ctattr_tuple, ctattr_ip, ctattr_l4proto,
// ctattr_filter).
const (
	TupleOrig  = 1  // CTA_TUPLE_ORIG
	TupleReply = 2  // CTA_TUPLE_REPLY
	Status     = 3  // CTA_STATUS
	ID         = 12 // CTA_ID
	Zone       = 18 // CTA_ZONE
	Labels     = 22 // CTA_LABELS
	Filter     = 25 // CTA_FILTER (Linux 5.8)
	StatusMask = 26 // CTA_STATUS_MASK (Linux 6.1)

	TupleIP    = 1 // CTA_TUPLE_IP
	TupleProto = 2 // CTA_TUPLE_PROTO

	IPv4Src = 1 // CTA_IP_V4_SRC
	IPv4Dst = 2 // CTA_IP_V4_DST
	IPv6Src = 3 // CTA_IP_V6_SRC
	IPv6Dst = 4 // CTA_IP_V6_DST

	ProtoNum     = 1 // CTA_PROTO_NUM
	ProtoSrcPort = 2 // CTA_PROTO_SRC_PORT
	ProtoDstPort = 3 // CTA_PROTO_DST_PORT

	FilterOrigFlags  = 1 // CTA_FILTER_ORIG_FLAGS
	FilterReplyFlags = 2 // CTA_FILTER_REPLY_FLAGS
	// CTA_FILTER_F_* (nf_conntrack_netlink.c): which fields of the
	// original (or reply) tuple must match.
	FilterIPDst    = 1 << 1
	FilterProtoNum = 1 << 3
	FilterDstPort  = 1 << 5
)

// Status bits (enum ip_conntrack_status, linux/netfilter/nf_conntrack_common.h).
const (
	IPSExpected = 1 << 0 // IPS_EXPECTED: a helper's expected flow
	IPSSrcNAT   = 1 << 4 // IPS_SRC_NAT
	IPSDstNAT   = 1 << 5 // IPS_DST_NAT
)

// Request is a ctnetlink request msg of family (unix.AF_*; AF_UNSPEC:
// both) with flags and attrs (struct nfgenmsg: family, NFNETLINK_V0,
// res_id 0).
func Request(msg uint16, flags netlink.HeaderFlags, family uint8, attrs []byte) netlink.Message {
	return netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_SUBSYS_CTNETLINK<<8 | msg), Flags: flags},
		Data:   append([]byte{family, unix.NFNETLINK_V0, 0, 0}, attrs...),
	}
}

// StatusFilter is a dump's attributes asking the kernel for the entries
// whose status has the bits of mask equal to val (CTA_STATUS,
// CTA_STATUS_MASK: Linux 6.1; an older kernel ignores them and sends
// every entry); none for mask 0.
func StatusFilter(mask, val uint32) ([]byte, error) {
	if mask == 0 {
		return nil, nil
	}
	ae := netlink.NewAttributeEncoder()
	ae.ByteOrder = binary.BigEndian
	ae.Uint32(Status, val)
	ae.Uint32(StatusMask, mask)
	return ae.Encode()
}

// DstFilter is a dump's attributes asking the kernel (CTA_FILTER: Linux
// 5.8; an older kernel ignores it and sends every entry) for the flows
// whose tuple dir (TupleOrig, TupleReply) has destination address addr
// (attribute ipDst: IPv4Dst, IPv6Dst), protocol proto and destination
// port, of which the fields origFlags and replyFlags name (Filter*) must
// match.
func DstFilter(dir, ipDst uint16, addr []byte, proto uint8, port uint16, origFlags, replyFlags uint32) ([]byte, error) {
	ae := netlink.NewAttributeEncoder()
	ae.Nested(dir, func(ae *netlink.AttributeEncoder) error {
		ae.Nested(TupleIP, func(ae *netlink.AttributeEncoder) error {
			ae.Bytes(ipDst, addr)
			return nil
		})
		ae.Nested(TupleProto, func(ae *netlink.AttributeEncoder) error {
			ae.Uint8(ProtoNum, proto)
			ae.Bytes(ProtoDstPort, binary.BigEndian.AppendUint16(nil, port))
			return nil
		})
		return nil
	})
	ae.Nested(Filter, func(ae *netlink.AttributeEncoder) error {
		ae.Uint32(FilterOrigFlags, origFlags)
		ae.Uint32(FilterReplyFlags, replyFlags)
		return nil
	})
	return ae.Encode()
}

// DeleteMsg is the delete, without NLM_F_ACK, of the flow of family
// that a dump gave with tuple as its CTA_TUPLE_REPLY payload (dir
// TupleReply) or CTA_TUPLE_ORIG payload (TupleOrig), in zone (its
// CTA_ZONE payload, if any) and with id (its CTA_ID payload, if any).
//
// Sent some time after the dump, a delete must not end a flow made since
// that the dump's reader never judged (review h/revctnl). The kernel
// finds the entry by the tuple given and then compares the id, which
// hashes the entry's original tuple and its address (nf_ct_get_id), so
// the address of a freed entry taken again by one with the same original
// tuple gives the same id. Hence the reply tuple with the id: an entry
// made since with the same original tuple but delivered elsewhere (DNAT
// to another target) has another reply tuple and is not found; one with
// the same reply tuple but another original (another external endpoint
// DNAT-ed to the same target) has another id. What is ended is then an
// entry with the dumped flow's tuples both ways: the same flow as far as
// any judgement of it goes. (By the original tuple alone, the remote's
// next connection from the same port, DNAT-ed to a mapping's new target,
// was ended: TestCtDeleteSparesRemadeFlow.)
//
// An empty tuple or another dir is refused (false): a delete without a
// tuple the kernel knows is its flush of the whole table.
func DeleteMsg(family uint8, dir uint16, tuple, zone, id []byte) (netlink.Message, bool) {
	if len(tuple) == 0 || dir != TupleOrig && dir != TupleReply {
		return netlink.Message{}, false
	}
	del := netlink.NewAttributeEncoder()
	del.Bytes(dir|netlink.Nested, tuple)
	if zone != nil {
		del.Bytes(Zone, zone)
	}
	if id != nil {
		del.Bytes(ID, id)
	}
	b, err := del.Encode()
	if err != nil {
		return netlink.Message{}, false
	}
	return Request(MsgDelete, netlink.Request, family, b), true
}

// Tuple is what DecodeTuple reads of a CTA_TUPLE_ORIG or CTA_TUPLE_REPLY
// payload. An address is invalid if missing; the OK fields say which of
// protocol and ports were there (ICMP, GRE, ...: no ports).
type Tuple struct {
	Src, Dst                  netip.Addr
	Sport, Dport              uint16
	Proto                     uint8
	ProtoOK, SportOK, DportOK bool
}

// HasAddrs reports whether t has both addresses.
func (t *Tuple) HasAddrs() bool { return t.Src.IsValid() && t.Dst.IsValid() }

// DecodeTuple fills t from a tuple's payload b; false if an attribute
// was malformed (what came before it is read).
func DecodeTuple(b []byte, t *Tuple) bool {
	ok := true
	if !Attrs(b, func(typ uint16, v []byte) {
		switch typ {
		case TupleIP:
			ok = Attrs(v, func(typ uint16, v []byte) {
				switch typ {
				case IPv4Src, IPv6Src:
					t.Src, _ = netip.AddrFromSlice(v)
				case IPv4Dst, IPv6Dst:
					t.Dst, _ = netip.AddrFromSlice(v)
				}
			}) && ok
		case TupleProto:
			ok = Attrs(v, func(typ uint16, v []byte) {
				switch typ {
				case ProtoNum:
					if t.ProtoOK = len(v) == 1; t.ProtoOK {
						t.Proto = v[0]
					}
				case ProtoSrcPort:
					if t.SportOK = len(v) == 2; t.SportOK {
						t.Sport = binary.BigEndian.Uint16(v)
					}
				case ProtoDstPort:
					if t.DportOK = len(v) == 2; t.DportOK {
						t.Dport = binary.BigEndian.Uint16(v)
					}
				}
			}) && ok
		}
	}) {
		return false
	}
	return ok
}

// nlaTypeMask is NLA_TYPE_MASK: an attribute type without NLA_F_NESTED
// and NLA_F_NET_BYTEORDER.
const nlaTypeMask = 0x3fff

func nlAlign(n int) int { return (n + 3) &^ 3 }

// Attrs calls fn on each attribute of b (type without the nested and
// byte-order flags, value aliasing b); false if one was malformed (the
// walk stops there; trailing bytes too few for a header are ignored). Unlike netlink.AttributeDecoder it allocates
// nothing: Scan decodes a million entries with it.
func Attrs(b []byte, fn func(typ uint16, v []byte)) bool {
	for len(b) >= 4 {
		l := int(binary.NativeEndian.Uint16(b))
		if l < 4 || l > len(b) {
			return false
		}
		fn(binary.NativeEndian.Uint16(b[2:])&nlaTypeMask, b[4:l])
		b = b[min(nlAlign(l), len(b)):]
	}
	return true
}

// Flow is what Scan decodes of a conntrack entry: its tuples, status and
// label bitmap (which aliases the read buffer: valid only during the
// callback).
type Flow struct {
	Orig, Reply Tuple
	Status      uint32
	Labels      []byte
	// Family is the entry's address family (nfgenmsg), Attrs its
	// attributes undecoded (aliasing the read buffer: valid only during
	// the callback), Interrupted whether its message was marked
	// NLM_F_DUMP_INTR (the dump may be inconsistent).
	Family      uint8
	Attrs       []byte
	Interrupted bool
}

// Labelled reports whether the flow's label bitmap has bit label.
func (f *Flow) Labelled(label int) bool {
	return len(f.Labels) > label/8 && f.Labels[label/8]&(1<<(label%8)) != 0
}

// DNATed reports whether the flow was DNAT-ed: its reply comes from
// elsewhere than its original destination.
func (f *Flow) DNATed() bool {
	return f.Reply.HasAddrs() && (f.Orig.Dst != f.Reply.Src || f.Orig.Dport != f.Reply.Sport)
}

// decodeFlow fills f from a conntrack message's attributes.
func decodeFlow(f *Flow, attrs []byte) {
	Attrs(attrs, func(typ uint16, v []byte) {
		switch typ {
		case TupleOrig:
			DecodeTuple(v, &f.Orig)
		case TupleReply:
			DecodeTuple(v, &f.Reply)
		case Status:
			if len(v) >= 4 {
				f.Status = binary.BigEndian.Uint32(v)
			}
		case Labels:
			f.Labels = v
		}
	})
}

// DumpTimeout bounds each read of Scan's dump: the kernel answers at
// once, so a read that blocks this long means no answer, and the caller
// takes the safe answer (a variable for tests).
var DumpTimeout = 10 * time.Second

// kernelFilter: Scan asks the kernel to filter by status (tests turn it
// off to see what a kernel before 6.1 sends).
var kernelFilter = true

// ErrResized: the conntrack hash table was resized during a dump (Scan),
// which may have skipped entries.
var ErrResized = errors.New("the conntrack hash table was resized during the dump; it may have skipped entries")

// bucketsFile holds the size of the conntrack hash table
// (nf_conntrack_htable_size, the same for every namespace; readable in
// each). A variable for tests.
var bucketsFile = "/proc/sys/net/netfilter/nf_conntrack_buckets"

// HashSize is the conntrack hash table's size, or "" when it cannot be
// read (no resize is seen then: as before): a dump that walked the table
// while it changed may have skipped entries (ErrResized).
func HashSize() string {
	b, err := os.ReadFile(bucketsFile)
	if err != nil {
		return ""
	}
	return string(b)
}

// Scan dumps the conntrack entries of family fam (unix.AF_UNSPEC: both)
// in the network namespace netns (a file descriptor; 0: the caller's)
// whose status has the bits of mask equal to val (mask 0: every entry),
// calling fn on each with an original tuple until fn returns true; it
// reports whether fn did. The kernel filters (StatusFilter: Linux 6.1)
// and Scan checks again, so fn never sees another entry: a kernel
// before 6.1 ignores the filter and sends every entry (review
// h/revctnl: before, fn got them all there). It holds one read's worth
// of the dump at a time (one 64 KiB buffer, one Flow), and closing its
// socket as it returns ends the dump.
//
// A dump that reached its end without fn wanting a flow fails with
// ErrResized when the conntrack hash table's size changed meanwhile
// (nf_conntrack_buckets: an admin's resize moves the entries while the
// dump walks the buckets by index, so it may skip some): "none found"
// would not be true of the table. A flow fn wanted is there whatever a
// resize did.
func Scan(netns int, fam uint8, mask, val uint32, fn func(*Flow) bool) (found bool, err error) {
	buckets := HashSize()
	defer func() {
		if err == nil && !found && HashSize() != buckets {
			err = fmt.Errorf("conntrack dump: %w", ErrResized)
		}
	}()
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: netns})
	if err != nil {
		return false, fmt.Errorf("conntrack dump: %w", err)
	}
	defer c.Close()
	var attrs []byte
	if kernelFilter {
		if attrs, err = StatusFilter(mask, val); err != nil {
			return false, err
		}
	}
	if mask != 0 {
		all := fn
		fn = func(f *Flow) bool { return f.Status&mask == val && all(f) }
	}
	return Dump(c, fam, attrs, fn)
}

// Dump sends on c a dump request of family fam (unix.AF_UNSPEC: both)
// with attrs (a kernel-side filter, or none) and calls fn on each entry
// with an original tuple until fn returns true; it reports whether fn
// did. It holds one read's worth of the dump at a time (one 64 KiB
// buffer, one Flow: what fn is given is valid during the call only);
// what it reads with another sequence number (left on c by an earlier
// exchange) is skipped. A dump left part way (fn wanted a flow, an error)
// leaves the rest queued on c: only closing c ends it. Each read is
// bounded by DumpTimeout; c's read deadline is cleared on return.
func Dump(c *netlink.Conn, fam uint8, attrs []byte, fn func(*Flow) bool) (found bool, err error) {
	sent, err := c.Send(Request(MsgGet, netlink.Request|netlink.Dump, fam, attrs))
	if err != nil {
		return false, fmt.Errorf("conntrack dump: %w", err)
	}
	raw, err := c.SyscallConn()
	if err != nil {
		return false, err
	}
	defer c.SetReadDeadline(time.Time{})
	// A dump's datagram holds at most 32 KiB (netlink_dump); the buffer
	// is larger, so none is truncated.
	buf := make([]byte, 64<<10)
	var f Flow
	for {
		if err := c.SetReadDeadline(time.Now().Add(DumpTimeout)); err != nil {
			return false, err
		}
		var n int
		var rerr error
		if err := raw.Read(func(fd uintptr) bool {
			n, _, rerr = unix.Recvfrom(int(fd), buf, 0)
			return rerr != unix.EAGAIN && rerr != unix.EWOULDBLOCK
		}); err != nil {
			return false, fmt.Errorf("conntrack dump: %w", err)
		}
		if rerr != nil {
			// ENOBUFS: the socket overran and the dump lost entries.
			return false, fmt.Errorf("conntrack dump: %w", rerr)
		}
		if end, found, err := Messages(buf[:n], sent.Header.Sequence, &f, fn); end || err != nil {
			return found, err
		}
	}
}

// Messages decodes one datagram m of a conntrack dump of request seq
// into f, calling fn on each flow with an original tuple until it
// returns true (found). end: the dump ended (NLMSG_DONE, NLMSG_ERROR) or
// fn wanted a flow. An NLMSG_DONE or NLMSG_ERROR carrying an error (the
// kernel's dump_done_errno: a dump that failed part way) is that error,
// never a dump that found nothing.
func Messages(m []byte, seq uint32, f *Flow, fn func(*Flow) bool) (end, found bool, err error) {
	for len(m) >= unix.NLMSG_HDRLEN {
		l := int(binary.NativeEndian.Uint32(m))
		if l < unix.NLMSG_HDRLEN || l > len(m) {
			return true, false, errors.New("conntrack dump: malformed message")
		}
		typ, flags, mseq := binary.NativeEndian.Uint16(m[4:]), binary.NativeEndian.Uint16(m[6:]), binary.NativeEndian.Uint32(m[8:])
		data := m[unix.NLMSG_HDRLEN:l]
		m = m[min(nlAlign(l), len(m)):]
		if mseq != seq {
			continue
		}
		switch typ {
		case unix.NLMSG_DONE, unix.NLMSG_ERROR:
			if len(data) < 4 {
				if typ == unix.NLMSG_DONE {
					return true, false, nil // an older kernel's bare DONE
				}
				return true, false, errors.New("conntrack dump: truncated error message")
			}
			if e := -int32(binary.NativeEndian.Uint32(data)); e != 0 {
				return true, false, fmt.Errorf("conntrack dump: %w", unix.Errno(e))
			}
			return true, false, nil
		case unix.NLMSG_NOOP, unix.NLMSG_OVERRUN:
			continue
		}
		if len(data) < 4 {
			continue
		}
		*f = Flow{Family: data[0], Attrs: data[4:], Interrupted: flags&unix.NLM_F_DUMP_INTR != 0}
		decodeFlow(f, data[4:])
		if f.Orig.HasAddrs() && fn(f) {
			return true, true, nil
		}
	}
	return false, false, nil
}
