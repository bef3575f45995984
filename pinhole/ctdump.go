package pinhole

import (
	"bytes"
	"fmt"
	"net/netip"
	"slices"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/ctnl"
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
//     the callers look at (ctnl.Flow, its labels aliasing the buffer);
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
	case chain == b.chainRecheck6 && b.cutLabels && !b.unlabelled && !b.pinVerify:
		return ruleComment(flowsCheckedMark)
	case chain == b.chainRecheckNAT && b.natCutting() && !b.natUnlabelled && !b.natVerify:
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

// ipsExpected is IPS_EXPECTED: a helper's expected flow.
const ipsExpected = ctnl.IPSExpected

// ctScan dumps the conntrack entries of family fam (unix.AF_UNSPEC: both)
// in the Backend's namespace whose status has the bits of mask equal to
// val (mask 0: every entry), calling fn on each until fn returns true; it
// reports whether fn did. It holds one read's worth of the dump at a time
// (ctnl.Scan). Safe without mu (it touches nothing of b but netns).
func (b *Backend) ctScan(fam uint8, mask, val uint32, fn func(*ctnl.Flow) bool) (bool, error) {
	found, err := ctnl.Scan(b.netns, fam, mask, val, fn)
	if err != nil {
		err = fmt.Errorf("pinhole: %w", err)
	}
	return found, err
}

// NATEndpoints calls fn with the external endpoint of each NAT-ed
// conntrack flow in the Backend's namespace: the original destination of
// a DNAT-ed one, the reply destination of a SNAT-ed one (protocol,
// address, port; IPv4-mapped addresses unmapped). Two streamed dumps of
// both families, the kernel filtering by status (ctScan: no flow held).
// Safe without mu.
func (b *Backend) NATEndpoints(fn func(proto uint8, ext netip.AddrPort)) error {
	if _, err := b.ctScan(unix.AF_UNSPEC, ipsDstNAT, ipsDstNAT, func(f *ctnl.Flow) bool {
		fn(f.Orig.Proto, netip.AddrPortFrom(f.Orig.Dst.Unmap(), f.Orig.Dport))
		return false
	}); err != nil {
		return err
	}
	_, err := b.ctScan(unix.AF_UNSPEC, ctnl.IPSSrcNAT, ctnl.IPSSrcNAT, func(f *ctnl.Flow) bool {
		if f.Reply.HasAddrs() {
			fn(f.Orig.Proto, netip.AddrPortFrom(f.Reply.Dst.Unmap(), f.Reply.Dport))
		}
		return false
	})
	return err
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
