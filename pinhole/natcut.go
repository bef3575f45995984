package pinhole

import (
	"errors"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/ctnl"
)

// Standalone, the ruleset also cuts the DNAT-ed flows of a removed IPv4
// NAPT mapping (napt4, napt4_filter) or IPv6 port redirect (redir6,
// redir6_filter), as guard6 cuts an IPv6 pinhole's (cutflows.go). Before,
// guard4's and guard6's "ct state established accept" let such a flow go
// on until the server's conntrack walk, and with pcpd dead after the
// lease's end for as long as it lasted (issue 9); and every reply that
// ended such a mapping waited for the walk (the server's mustWaitFlush).
//
// pcpd's own DNAT rules label the flow they translate with natLabel, on
// the same lookup's hit (an admin's own DNAT-ed flows are never
// labelled; natLabel is the default table's bit, another table's is its
// own, natLabelFor, so that a second pcpd's flows are not re-checked
// against this one's maps):
//
//	ip daddr . meta l4proto . th dport @napt4 ct label set 126 dnat ip to ip daddr . meta l4proto . th dport map @napt4
//
// and a base chain of pcpd's own at prerouting, after conntrack (-200)
// and before the DNAT (dstnat, -100), sends such a flow's established
// packets in its original direction (from the remote) to recheck_nat:
//
//	chain natcut { type filter hook prerouting priority mangle; policy accept;
//		ct label 126 ct direction original ct state established,new goto recheck_nat
//	}
//
// Also "new" ones: a flow no reply has made established yet (a one-way
// UDP stream from the remote) is translated by its binding without the
// NAT chain, and guard4's (guard6's) "ct status dnat accept" passed it;
// the flow's first packet is not labelled yet at -150 (the DNAT rule
// labels it), and "related" ones (ICMP errors) are not re-checked, their
// transport header being ICMP's.
//
// An established packet is translated at the NAT hook, so at -150 it still
// carries the flow's original destination, the external endpoint: the
// key the DNAT rule looked up. recheck_nat runs the four DNAT rules'
// lookups on it (the same keys, the external address included) and
// accepts on a hit, else drops (counted). So a flow is cut exactly when
// no element translates its packet any longer (a PEER of the same
// endpoint keeps its remote's flows), at once: the element's removal
// commits with the delete, or the kernel's timeout (pcpd dead too). The
// entry stays; the server's walk still removes it. A hairpinned flow (a
// client to another client's external endpoint) is keyed by its original
// tuple too: the DNAT-ing mapping's end cuts it. IPv6 pinhole flows
// (flowLabel) never go there, nor redirected flows to recheck6. The key
// is the external endpoint's: an old flow whose endpoint is mapped again
// to another internal endpoint passes (conntrack still delivers it to the
// old one), and the server ends such flows itself before the install
// that retakes the endpoint (server/retarget.go).
//
// Not the outbound flows a NAPT mapping's SNAT companion translated (the
// client's own connections from its mapped port, PMP-11): they are cut
// by the walk alone, and the server still waits for it when a NAPT
// mapping that is not a PEER ends (mustWaitFlush). A re-check of their
// replies against the mappings of their external endpoint would cut what
// the walk spares on purpose: a mapping whose FILTERs narrowed at the
// same endpoint keeps its client's outbound flows to every remote, and
// no set is keyed by the endpoint alone (napt4_filter holds the remote).
//
// Attached, pcpd_cut re-checks them (attcut.go). Not on a kernel
// that refuses labels (labelsRefused) or natcut's map lookups (before
// Linux 6.5: natCutRefusal), nor for a Backend whose Setup
// found pcpd's DNAT rules translating unlabelled (an upgrade from a layout
// before this one, or a rule an admin altered: translatesUnlabelled):
// CutsFlows is false for the DNAT kinds then, and the server waits for
// its walk as before.

// natCutting: the layout holds natcut's rules and the DNAT labels.
// Caller holds b.mu (or is New).
func (b *Backend) natCutting() bool { return b.cutLabels && b.natCut }

// NATLabel is the conntrack label bit this Backend's DNAT rules set on
// the flows they translate (natLabelFor; attached, its own bit), and
// whether its layout sets one (natCutting: not once the kernel refused
// labels or natcut's lookups, and then CutsFlows is false for the DNAT
// kinds for the Backend's life). The rules set it on the same lookup's
// hit as their dnat, so every flow pcpd's DNAT translated carries it; an
// admin's own DNAT (a port forward in another table, which binds first:
// dnatPriority) and another table's pcpd never set it. The server tells
// its own DNAT-ed flows from others' by it (seedNATPrior).
func (b *Backend) NATLabel() (bit int, ok bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.natLabel, b.natCutting()
}

// natCutRefusal: Setup's layout transaction failed (err) with natcut's
// rules in it as on a kernel before 6.5, which refuses a lookup into a
// map without a destination register (EINVAL; TestLayoutLookupsLinux61):
// the DNAT label rules and recheck_nat look the maps up as sets, as nft
// writes them ("@napt4"). A lookup with a destination register would do
// on those kernels, but nft lists one whose value no statement takes as
// nothing at all ("ct label set 126 dnat ...", "accept"), which, read
// back by nft -f, labels every flow, and natcut then drops the host's
// own. Then Setup writes the layout without natcut, for good: the DNAT
// kinds' flows end with the walk, as before. Caller holds b.mu.
func (b *Backend) natCutRefusal(err error) bool { return b.natCutting() && natCutRefusal(err) }

func natCutRefusal(err error) bool {
	var le layoutError
	return errors.As(err, &le) && errors.Is(err, unix.EINVAL)
}

// natCutPriority is natcut's: after conntrack (-200), before dstnat (-100).
const natCutPriority = nftables.ChainPriority(-150)

// natCutKinds are the DNAT maps: their flows are labelled natLabel and
// re-checked by natcut.
var natCutKinds = [...]kind{kindRedirect6, kindRedirect6Filter, kindNAPT4, kindNAPT4Filter}

// natCutRules is natcut's rule and recheck_nat's.
func (b *Backend) natCutRules() (natcut, recheck [][]expr.Any) {
	natcut = [][]expr.Any{rule(x(loadCt(expr.CtKeyLABELS, reg0)), labelSet(b.natLabel),
		x(loadCt(expr.CtKeyDIRECTION, reg0), eq(reg0, 0)),
		x(loadCt(expr.CtKeySTATE, reg0)), bitsSet(reg0, expr.CtStateBitESTABLISHED|expr.CtStateBitNEW),
		x(goTo(b.chainRecheckNAT)))}
	for _, k := range natCutKinds {
		fam, key := byte(unix.NFPROTO_IPV4), []expr.Any(nil)
		if k == kindRedirect6 || k == kindRedirect6Filter {
			fam, key = unix.NFPROTO_IPV6, keyPacket6(k)
		} else {
			key = keyPacket4(k)
		}
		recheck = append(recheck, rule(nfproto(fam), key, x(lookup(b.sets[k], reg0), accept)))
	}
	if b.refuseNATCut {
		// A lookup with a destination register into a plain set: EINVAL
		// on every kernel, as the map lookups above before Linux 6.5.
		recheck = append(recheck, rule(nfproto(unix.NFPROTO_IPV4), x(loadNet(ip4DstOff, 4, reg0),
			&expr.Lookup{SourceRegister: reg0, DestRegister: reg0, IsDestRegSet: true, SetName: b.protected4.Name, SetID: b.protected4.ID}, accept)))
	}
	return natcut, append(recheck, b.recheckEnd()) // disarmed: accept (arm.go)
}

// translatesUnlabelled reports whether pcpd's prerouting chain as it is
// in the kernel, before Setup writes it, has a DNAT rule (a lookup in one
// of natCutKinds' maps) that does not set a label: a table laid out by a
// pcpd before natcut.go (an upgrade), or one an admin altered. The flows
// it translated are unlabelled and natcut never re-checks them, so
// CutsFlows stays false for the DNAT kinds (as admitsUnlabelled for
// guard6). A chain that cannot be read (no table yet) translated nothing.
// Caller holds b.mu.
func (b *Backend) translatesUnlabelled() bool {
	return b.looksUpUnlabelled(b.chainPrerouting, natCutKinds[:])
}

// dnatFlowsUnlabelled reports whether conntrack holds a flow DNAT-ed
// (its reply source is not its original destination) to an address of
// the kernel's protected sets without this table's label: one an
// unlabelled DNAT rule translated (a layout before natcut.go, found by an
// earlier start's Setup, which rewrote it labelled, so translatesUnlabelled
// no longer sees it), which natcut never re-checks. Asked at a Backend's
// first Setup over an existing table (a start): before, the second start
// after an upgrade had CutsFlows true while such a flow lived, and its
// mapping's delete was answered without the walk (review h/revnatcut,
// finding 2, TestNATCutRestartAfterUpgrade). An admin's own DNAT to a
// client keeps the DNAT kinds waiting for the walk as well (safe). One
// dump of the conntrack table, both families, of the entries the kernel
// marked IPS_DST_NAT only, read as it comes and left at the first such
// flow (ctScan; before, every entry of the table was held decoded under
// the Backend's lock: BENCHMARKS.md item 49); true when it cannot be
// read. Caller holds b.mu.
func (b *Backend) dnatFlowsUnlabelled() bool {
	if p := b.preReads; p != nil && p.hasNAT {
		// As pinFlowsUnlabelled.
		b.natVerify = !p.nat && !p.natDecided
		return p.nat
	}
	in, decided, v := b.dnatInputs()
	if decided {
		b.natVerify = false
		return v
	}
	v = in.scan(b)
	b.natVerify = !v
	return v
}

// dnatCheck is what dnatFlowsUnlabelled's dump needs, read under b.mu
// (dnatInputs); its scan needs no lock (PrepareSetup).
type dnatCheck struct {
	prot6, prot4 []intervalRange
	label        int
}

// dnatInputs reads dnatFlowsUnlabelled's inputs; decided when the
// answer needs no dump (v). Caller holds b.mu.
func (b *Backend) dnatInputs() (in dnatCheck, decided, v bool) {
	prot6, err := b.readIntervals(b.protected6)
	if err != nil {
		return in, true, true
	}
	prot4, err := b.readIntervals(b.protected4)
	if err != nil {
		return in, true, true
	}
	if len(prot6) == 0 && len(prot4) == 0 {
		return in, true, false
	}
	return dnatCheck{prot6: prot6, prot4: prot4, label: b.natLabel}, false, false
}

// scan is dnatFlowsUnlabelled's dump. Safe without b.mu.
func (in dnatCheck) scan(b *Backend) bool {
	if testHookSetupRead != nil {
		testHookSetupRead(b, "dnat")
	}
	prot6, prot4 := in.prot6, in.prot4
	found, err := b.ctScan(unix.AF_UNSPEC, ipsDstNAT, ipsDstNAT, func(f *ctnl.Flow) bool {
		if !f.DNATed() || f.Labelled(in.label) {
			return false
		}
		if f.Reply.Src.Is4() {
			return inRanges(prot4, f.Reply.Src)
		}
		return inRanges(prot6, f.Reply.Src)
	})
	return err != nil || found
}
