package pinhole

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// The conntrack reads of a Backend's first Setup (dnatFlowsUnlabelled,
// pinFlowsUnlabelled) look for one flow of a kind and need nothing
// else of the table. vishvananda/netlink's ConntrackTableList, which the
// first one used, reads the whole dump (every message kept, then every
// flow decoded into a ConntrackFlow with its net.IP slices) before it
// returns, all under the Backend's lock: at 1 000 000 entries in the
// namespace 6.9 s a Setup, 1 GB allocated, the resident set up by 519 MB,
// at every start (BENCHMARKS.md item 49). ctScan instead
//
//   - asks the kernel to filter by status (CTA_STATUS, CTA_STATUS_MASK:
//     Linux 6.1), so a dump for DNAT-ed flows carries only those (IPS_DST_NAT)
//     and one for the others none of them; the kernel still walks its
//     hash, but sends nothing for an entry the filter skips. A kernel
//     before the filter ignores the attributes and sends every entry; the
//     callers' own checks decide alike, only slower;
//   - reads one datagram at a time into one buffer and decodes only what
//     the callers look at (ctFlow, its labels aliasing the buffer);
//   - stops at the first flow fn wants (closing the socket ends the dump).
//
// There is no label filter in a ctnetlink dump (CTA_LABELS only selects
// for an update), nor an address-prefix one (CTA_FILTER compares whole
// addresses), so those checks stay here.

// A start asks conntrack only when it must (standalone; attached, every
// start reads as before): a Setup whose layout labels and re-checks and
// that knows no flow an unlabelled rule
// admitted (or DNAT-ed) is alive marks the last rule of recheck6 (of
// recheck_nat) with a comment, as nft writes and lists one:
//
//	counter packets 0 bytes 0 drop comment "pcpd: no flow admitted unlabelled"
//
// It knows so when its table was new, when its own first dump found none,
// or when the layout it rewrote carried the mark with the rules labelled
// (every flow since was labelled). A Backend's first Setup over a marked
// layout with labelled rules does not dump (the read is one small chain's
// rules): only the starts after an upgrade, or after a repair of rules
// found unlabelled, dump, until one finds no such flow (BENCHMARKS.md item
// 49). A Setup that found rules or flows unlabelled writes no mark, nor
// does an older pcpd's (it rewrites the chains, or has none). The Setup
// after a Healthy that found the layout damaged reads again whatever the
// marks say (recheckFlows: a flushed guard6 lets flows in unlabelled
// through the forward chain's accept). Healthy
// compares expressions only: the mark is no part of the layout's shape.
// An admin who alters an admission rule and restores it before pcpd
// sees it can leave flows unlabelled under a mark (as translatesUnlabelled
// cannot see a rule already put back).
const (
	flowsCheckedMark = "pcpd: no flow admitted unlabelled"
	natCheckedMark   = "pcpd: no flow DNAT-ed unlabelled"
)

// ruleComment is a rule's userdata holding comment c, as nft writes it
// (libnftnl's NFTNL_UDATA_RULE_COMMENT TLV, NUL-terminated).
func ruleComment(c string) []byte {
	return append(append([]byte{0, byte(len(c) + 1)}, c...), 0)
}

// checkedMark is the userdata of chain's last rule: the mark when chain
// is recheck6 (recheck_nat) and the Backend knows no flow admitted
// (DNAT-ed) unlabelled, else none. Caller holds b.mu.
func (b *Backend) checkedMark(chain string) []byte {
	switch {
	case chain == "" || b.cfg.Attached:
	case chain == b.chainRecheck6 && b.cutLabels && !b.unlabelled:
		return ruleComment(flowsCheckedMark)
	case chain == b.chainRecheckNAT && b.natCutting() && !b.natUnlabelled:
		return ruleComment(natCheckedMark)
	}
	return nil
}

// markedChecked reports whether the kernel's chain has a rule carrying
// mark (checkedMark); false when it cannot be read. Caller holds b.mu.
func (b *Backend) markedChecked(chain, mark string) bool {
	if b.cfg.Attached {
		return false // attached: not marked (checkedMark), every start reads
	}
	rules, err := b.readConn().GetRules(b.table, &nftables.Chain{Table: b.table, Name: chain})
	if err != nil {
		return false
	}
	want := ruleComment(mark)
	for _, r := range rules {
		if bytes.Equal(r.UserData, want) {
			return true
		}
	}
	return false
}

// ipsExpected is IPS_EXPECTED (linux/netfilter/nf_conntrack_common.h):
// a helper's expected flow.
const ipsExpected = 1 << 0

// ipctnlMsgCtGet is IPCTNL_MSG_CT_GET (linux/netfilter/nfnetlink_conntrack.h).
const ipctnlMsgCtGet = 1

// The ctnetlink attributes ctScan reads or sends (enum ctattr_type,
// ctattr_tuple, ctattr_ip, ctattr_l4proto).
const (
	ctaTupleOrig  = 1
	ctaTupleReply = 2
	ctaStatus     = 3
	ctaLabels     = 22
	ctaStatusMask = 26

	ctaTupleIP    = 1
	ctaTupleProto = 2

	ctaIPv4Src = 1
	ctaIPv4Dst = 2
	ctaIPv6Src = 3
	ctaIPv6Dst = 4

	ctaProtoNum     = 1
	ctaProtoSrcPort = 2
	ctaProtoDstPort = 3
)

// ctDumpTimeout bounds each read of a conntrack dump: the kernel answers
// at once, so a read that blocks this long means no answer, and the caller
// takes the safe answer (a variable for tests).
var ctDumpTimeout = 10 * time.Second

// ctFlow is what ctScan decodes of a conntrack entry: the original tuple,
// the reply tuple's source, the status and the label bitmap (which aliases
// the read buffer: valid only during the callback).
type ctFlow struct {
	proto               uint8
	origSrc, origDst    netip.Addr
	origSport           uint16
	origDport           uint16
	replySrc, replyDst  netip.Addr
	replySport          uint16
	replyDport          uint16
	status              uint32
	labels              []byte
	hasOrig, hasReplyIP bool
}

// labelled reports whether the flow's label bitmap has bit label.
func (f *ctFlow) labelled(label int) bool {
	return len(f.labels) > label/8 && f.labels[label/8]&(1<<(label%8)) != 0
}

// dnated reports whether the flow was DNAT-ed: its reply comes from
// elsewhere than its original destination.
func (f *ctFlow) dnated() bool {
	return f.hasReplyIP && (f.origDst != f.replySrc || f.origDport != f.replySport)
}

// ctScan dumps the conntrack entries of family fam (unix.AF_UNSPEC: both)
// in the Backend's namespace whose status has the bits of mask equal to
// val (mask 0: every entry), calling fn on each until fn returns true; it
// reports whether fn did. It holds one read's worth of the dump at a time.
// Safe without mu (it touches nothing of b but netns).
func (b *Backend) ctScan(fam uint8, mask, val uint32, fn func(*ctFlow) bool) (bool, error) {
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: b.netns})
	if err != nil {
		return false, fmt.Errorf("pinhole: conntrack dump: %w", err)
	}
	defer c.Close()
	ae := netlink.NewAttributeEncoder()
	ae.ByteOrder = binary.BigEndian
	if mask != 0 {
		ae.Uint32(ctaStatus, val)
		ae.Uint32(ctaStatusMask, mask)
	}
	attrs, err := ae.Encode()
	if err != nil {
		return false, err
	}
	req := netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_SUBSYS_CTNETLINK<<8 | ipctnlMsgCtGet),
			Flags: netlink.Request | netlink.Dump},
		// struct nfgenmsg: family, version (NFNETLINK_V0), res_id.
		Data: append([]byte{fam, unix.NFNETLINK_V0, 0, 0}, attrs...),
	}
	sent, err := c.Send(req)
	if err != nil {
		return false, fmt.Errorf("pinhole: conntrack dump: %w", err)
	}
	raw, err := c.SyscallConn()
	if err != nil {
		return false, err
	}
	// A dump's datagram holds at most 32 KiB (netlink_dump); the buffer
	// is larger, so none is truncated.
	buf := make([]byte, 64<<10)
	var f ctFlow
	for {
		if err := c.SetReadDeadline(time.Now().Add(ctDumpTimeout)); err != nil {
			return false, err
		}
		var n int
		var rerr error
		if err := raw.Read(func(fd uintptr) bool {
			n, _, rerr = unix.Recvfrom(int(fd), buf, 0)
			return rerr != unix.EAGAIN && rerr != unix.EWOULDBLOCK
		}); err != nil {
			return false, fmt.Errorf("pinhole: conntrack dump: %w", err)
		}
		if rerr != nil {
			// ENOBUFS: the socket overran and the dump lost entries.
			return false, fmt.Errorf("pinhole: conntrack dump: %w", rerr)
		}
		if end, found, err := ctMessages(buf[:n], sent.Header.Sequence, &f, fn); end || err != nil {
			return found, err
		}
	}
}

// ipsSrcNAT is IPS_SRC_NAT (linux/netfilter/nf_conntrack_common.h).
const ipsSrcNAT = 1 << 4

// NATEndpoints calls fn with the external endpoint of each NAT-ed
// conntrack flow in the Backend's namespace: the original destination of
// a DNAT-ed one, the reply destination of a SNAT-ed one (protocol,
// address, port; IPv4-mapped addresses unmapped). Two streamed dumps of
// both families, the kernel filtering by status (ctScan: no flow held).
// Safe without mu.
func (b *Backend) NATEndpoints(fn func(proto uint8, ext netip.AddrPort)) error {
	if _, err := b.ctScan(unix.AF_UNSPEC, ipsDstNAT, ipsDstNAT, func(f *ctFlow) bool {
		fn(f.proto, netip.AddrPortFrom(f.origDst.Unmap(), f.origDport))
		return false
	}); err != nil {
		return err
	}
	_, err := b.ctScan(unix.AF_UNSPEC, ipsSrcNAT, ipsSrcNAT, func(f *ctFlow) bool {
		if f.hasReplyIP {
			fn(f.proto, netip.AddrPortFrom(f.replyDst.Unmap(), f.replyDport))
		}
		return false
	})
	return err
}

// ctMessages decodes one datagram of a conntrack dump of request seq,
// calling fn on each flow until it returns true (found). end: the dump
// ended (NLMSG_DONE, NLMSG_ERROR) or fn wanted a flow. An NLMSG_DONE or
// NLMSG_ERROR carrying an error (the kernel's dump_done_errno: a dump
// that failed part way) is that error, never a dump that found nothing.
func ctMessages(m []byte, seq uint32, f *ctFlow, fn func(*ctFlow) bool) (end, found bool, err error) {
	for len(m) >= unix.NLMSG_HDRLEN {
		l := int(binary.NativeEndian.Uint32(m))
		if l < unix.NLMSG_HDRLEN || l > len(m) {
			return true, false, errors.New("pinhole: conntrack dump: malformed message")
		}
		typ, mseq := binary.NativeEndian.Uint16(m[4:]), binary.NativeEndian.Uint32(m[8:])
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
				return true, false, errors.New("pinhole: conntrack dump: truncated error message")
			}
			if e := -int32(binary.NativeEndian.Uint32(data)); e != 0 {
				return true, false, fmt.Errorf("pinhole: conntrack dump: %w", unix.Errno(e))
			}
			return true, false, nil
		case unix.NLMSG_NOOP, unix.NLMSG_OVERRUN:
			continue
		}
		if len(data) < 4 {
			continue
		}
		*f = ctFlow{}
		decodeCtFlow(f, data[4:])
		if f.hasOrig && fn(f) {
			return true, true, nil
		}
	}
	return false, false, nil
}

func nlAlign(n int) int { return (n + 3) &^ 3 }

// nlaTypeMask is NLA_TYPE_MASK: an attribute type without NLA_F_NESTED
// and NLA_F_NET_BYTEORDER.
const nlaTypeMask = 0x3fff

// ctAttrs calls fn on each attribute of b (type without the nested and
// byte-order flags, value).
func ctAttrs(b []byte, fn func(typ uint16, v []byte)) {
	for len(b) >= 4 {
		l := int(binary.NativeEndian.Uint16(b))
		if l < 4 || l > len(b) {
			return
		}
		fn(binary.NativeEndian.Uint16(b[2:])&nlaTypeMask, b[4:l])
		b = b[min(nlAlign(l), len(b)):]
	}
}

// decodeCtFlow fills f from a conntrack message's attributes.
func decodeCtFlow(f *ctFlow, attrs []byte) {
	ctAttrs(attrs, func(typ uint16, v []byte) {
		switch typ {
		case ctaTupleOrig:
			f.hasOrig = decodeTuple(v, &f.origSrc, &f.origDst, &f.origSport, &f.origDport, &f.proto)
		case ctaTupleReply:
			var proto uint8
			f.hasReplyIP = decodeTuple(v, &f.replySrc, &f.replyDst, &f.replySport, &f.replyDport, &proto)
		case ctaStatus:
			if len(v) >= 4 {
				f.status = binary.BigEndian.Uint32(v)
			}
		case ctaLabels:
			f.labels = v
		}
	})
}

// decodeTuple decodes a CTA_TUPLE_* attribute; it reports whether it had
// both addresses.
func decodeTuple(v []byte, src, dst *netip.Addr, sport, dport *uint16, proto *uint8) bool {
	ok := false
	ctAttrs(v, func(typ uint16, v []byte) {
		switch typ {
		case ctaTupleIP:
			ctAttrs(v, func(typ uint16, v []byte) {
				switch typ {
				case ctaIPv4Src, ctaIPv6Src:
					*src, _ = netip.AddrFromSlice(v)
				case ctaIPv4Dst, ctaIPv6Dst:
					*dst, _ = netip.AddrFromSlice(v)
				}
			})
			ok = src.IsValid() && dst.IsValid()
		case ctaTupleProto:
			ctAttrs(v, func(typ uint16, v []byte) {
				switch {
				case typ == ctaProtoNum && len(v) >= 1:
					*proto = v[0]
				case typ == ctaProtoSrcPort && len(v) >= 2:
					*sport = binary.BigEndian.Uint16(v)
				case typ == ctaProtoDstPort && len(v) >= 2:
					*dport = binary.BigEndian.Uint16(v)
				}
			})
		}
	})
	return ok
}

// inRanges reports whether a lies in one of rs (sorted, disjoint:
// readIntervals).
func inRanges(rs []intervalRange, a netip.Addr) bool {
	_, found := slices.BinarySearchFunc(rs, a, func(r intervalRange, a netip.Addr) int {
		if r.last.Less(a) {
			return -1
		}
		if a.Less(r.first) {
			return 1
		}
		return 0
	})
	return found
}
