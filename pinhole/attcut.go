package pinhole

import (
	"hash/fnv"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// Attached, the ruleset cuts an ended mapping's flows too, pcpd dead as
// well (issue 9). Standalone's re-checks (cutflows.go, natcut.go) sit in
// pcpd's own forward chain (guard6) and its own natcut base chain; in
// the admin's table the admin's forward chain usually accepts
// "ct state established,related" before it jumps to pcpd's chain, so a
// re-check in pcpd_guard6 would never run, and before this an
// established connection through an expired IPv6 pinhole or an ended
// DNAT mapping passed until the server's conntrack walk, for as long as
// it lasted with pcpd dead. Attached mode already makes base chains of
// its own in the admin's table (the NAT ones), so it adds one more, at
// prerouting, after conntrack (-200) and before any DNAT (-100), as
// natcut:
//
//	chain pcpd_cut { type filter hook prerouting priority mangle; policy accept;
//		ct label 90 ct direction original ct status dnat ct state established,new goto pcpd_recheck_nat
//		ct label 90 ct direction original ct state established goto pcpd_recheck6
//	}
//
// pcpd_recheck6 and pcpd_recheck_nat are standalone's recheck6 and
// recheck_nat, on pcpd's prefixed sets. pcpd_guard6's admission rules
// and pcpd_prerouting's DNAT rules set the label (the same rules as
// standalone, with this Backend's bit). One base chain for both: an
// IPv6 pinhole's packet carries its original tuple at prerouting as at
// forward (nothing translates it), so it can be re-checked there, one
// hook traversal for every packet the host receives instead of two for
// forwarded ones, and dropped before routing. The two kinds of flow are
// told apart by "ct status dnat": a flow pcpd's DNAT translated has it,
// and a flow a pinhole admitted never has (guard6 accepts "ct status
// dnat" before its admission rules), so one label bit does for both.
// As standalone, "new" only for the DNAT-ed flows (a one-way stream a
// binding translates, which pcpd_guard4's "ct status dnat accept" passes
// without a NAT chain); a labelled pinhole flow's "new" packets go to
// pcpd_guard6's admission rules as any new flow's, and when none admits
// them any more, back to the admin's chain.
//
// The admin's policy: pcpd_cut only ever drops a packet of a flow that
// carries this Backend's label bit, in its original direction (from the
// remote), once no element of pcpd's admits its original tuple any
// longer; every other packet leaves it with "accept", a base chain's
// verdict that ends only that chain, so the admin's own chains at the
// hook still run and decide as before. The flows pcpd labels are those
// pcpd itself admitted (an IPv6 pinhole in pcpd_guard6) or translated
// (pcpd_prerouting's DNAT): so an admin's own established flows (a LAN
// host's, a flow the admin's own rules accepted before "jump pcpd") pass
// as before, and a flow pcpd admitted is cut when its mapping ends even
// if a later rule of the admin's would have accepted it as new: a new
// connection is then judged by the admin's rules. The priority is not
// about the admin's chains: an accept in one base chain does not skip
// another's, so the cut runs whatever they do, and a drop of theirs
// before it wins.
//
// The label bit (attachedLabel): not standalone's 127 or 126, nor a bit
// of the low range connlabel.conf numbers from 0, but one of 64-125
// hashed from the table's and the entry chain's names, for both kinds:
// pcpd_cut sees every packet the host receives, so a bit shared with a
// second pcpd (standalone beside it, or attached with another chain)
// would have it drop the other's flows (as natLabelFor, review
// h/revnatcut). A standalone pcpd of the default table (126, 127) never
// collides; another table's or attached chain's bit may (1 in 62), as
// may an admin's own rule: a Backend's first Setup that finds its bit in
// a rule not its own lays out without the cut (labelbit.go, review
// h/revattcut). The default attached names ("filter", "pcpd") give bit 90.
//
// Fallbacks as standalone: a kernel refusing labels (labelsRefused) gets
// the attached layout of before, without pcpd_cut; one refusing
// natcut's map lookups (before 6.5: natCutRefusal) a pcpd_cut of the
// pinhole rule alone, and no DNAT label; a Setup over pcpd_guard6's or
// pcpd_prerouting's rules unlabelled (an upgrade: admitsUnlabelled,
// translatesUnlabelled, dnatFlowsUnlabelled) leaves CutsFlows false for
// those kinds for the Backend's life. Teardown deletes the three chains
// with pcpd's others.

// attachedLabel is the label bit an attached Backend (table, entry chain)
// sets and re-checks: a bit of 64-125 hashed from both names.
func attachedLabel(table, chain string) int {
	h := fnv.New32a()
	h.Write([]byte("attached\x00" + table + "\x00" + chain))
	return 64 + int(h.Sum32()%62)
}

// attCut: the attached layout holds pcpd_cut (and the labels). Caller
// holds b.mu (or is New).
func (b *Backend) attCut() bool { return b.cfg.Attached && b.cutLabels }

// cutLabelBit is the bit guard6's admission rules set: flowLabel
// standalone, the attached bit attached.
func (b *Backend) cutLabelBit() int {
	if b.cfg.Attached {
		return b.natLabel
	}
	return flowLabel
}

// attCutNames sets an attached Backend's cut chains and label. Called
// by New.
func (b *Backend) attCutNames(prefix string) {
	b.chainNATCut, b.chainRecheck6, b.chainRecheckNAT = prefix+"cut", prefix+"recheck6", prefix+"recheck_nat"
	b.cutLabels, b.natCut = true, true
	b.natLabel = attachedLabel(b.cfg.Table, b.cfg.Chain)
}

// attCutChain is pcpd_cut, the base chain.
func (b *Backend) attCutChain() *nftables.Chain {
	accept := nftables.ChainPolicyAccept
	return &nftables.Chain{Table: b.table, Name: b.chainNATCut, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRef(natCutPriority), Policy: &accept}
}

// attCutLayout is pcpd_cut's rules and pcpd_recheck_nat's (when the
// natcut part is in: natCutting); pcpd_recheck6's are guard6's (layout).
func (b *Backend) attCutLayout() []chainRules {
	origin := rule(x(loadCt(expr.CtKeyLABELS, reg0)), labelSet(b.natLabel), x(loadCt(expr.CtKeyDIRECTION, reg0), eq(reg0, 0)))
	var cut [][]expr.Any
	var out []chainRules
	if b.natCutting() {
		_, recheck := b.natCutRules()
		cut = append(cut, rule(origin, x(loadCt(expr.CtKeySTATUS, reg0)), bitsSet(reg0, ipsDstNAT),
			x(loadCt(expr.CtKeySTATE, reg0)), bitsSet(reg0, expr.CtStateBitESTABLISHED|expr.CtStateBitNEW),
			x(goTo(b.chainRecheckNAT))))
		out = append(out, chainRules{b.chainRecheckNAT, recheck})
	}
	cut = append(cut, rule(origin, x(loadCt(expr.CtKeySTATE, reg0)), bitsSet(reg0, expr.CtStateBitESTABLISHED),
		x(goTo(b.chainRecheck6))))
	return append([]chainRules{{b.chainNATCut, cut}}, out...)
}

// attCutChainNames are the chains Teardown deletes, the base chain first
// (its gotos hold the others).
func (b *Backend) attCutChainNames() []string {
	if !b.cfg.Attached {
		return nil
	}
	return []string{b.chainNATCut, b.chainRecheck6, b.chainRecheckNAT}
}

// laidOut: pcpd's layout exists, so flows its rules admitted or
// translated may live (a first Setup asks conntrack for unlabelled ones
// then: dnatFlowsUnlabelled). Standalone, the table; attached, pcpd's
// own prerouting chain: the admin's table always exists, and a first
// start in it asked, could not read pcpd's protected sets, not made yet,
// and took that for unlabelled flows, so CutsFlows was false for the
// DNAT kinds at every fresh attached start (TestAttachedCutLayout's
// "fresh" row). Caller holds b.mu.
func (b *Backend) laidOut() (bool, error) {
	if !b.cfg.Attached {
		return b.tableExists()
	}
	present, err := b.presentChains()
	return present[b.chainPrerouting], err
}
