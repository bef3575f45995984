package pinhole

import (
	"errors"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/ctnl"
)

// A label bit is hashed from names (attachedLabel, natLabelFor: both
// 64-125), and a base chain that re-checks it (pcpd_cut, natcut) sees
// every packet the host receives: a flow another pcpd labels with the same
// bit (an attached one with another table or chain, a standalone one of
// another table), or an admin's own rule does, is re-checked against this
// Backend's sets and dropped. A standalone natcut does not even ask "ct
// status dnat", so it dropped an attached pcpd's IPv6 pinhole flows too
// (review h/revattcut, finding 1, TestAttachedCutBitSharedElsewhere:
// table filter chain pcpd_wan and table natpmp share bit 121). So a
// Backend's first Setup looks for the bit in every rule that is not its
// own (bitTaken): found, it lays out without the cut, for good (attached:
// the layout without labels, as labelsRefused; standalone: without
// natcut, as natCutRefusal), and its cut chains of an earlier run go
// (queueStaleCutRemoval). CutsFlows is false then, and the server waits
// for its walk. The first pcpd to lay out keeps the bit; a later one
// yields, and keeps yielding at its restarts while the first holds it.

// ownChainNames are the chains of pcpd's in its table (attached: the
// admin's table, whose other chains are the admin's).
func (b *Backend) ownChainNames() map[string]bool {
	m := map[string]bool{}
	for _, n := range []string{b.chainEntry, b.chainGuard6, b.chainGuard4, b.chainPrerouting, b.chainPostrouting,
		b.chainLocalOut, b.chainRecheck6, b.chainNATCut, b.chainRecheckNAT} {
		if n != "" {
			m[n] = true
		}
	}
	return m
}

// bitTaken reports whether a rule outside this Backend's own chains reads
// or sets conntrack label bit: a 16-byte value with the bit set in a rule
// that loads or sets the label. Caller holds b.mu.
func (b *Backend) bitTaken(bit int) (bool, error) {
	conn := b.readConn()
	chains, err := conn.ListChains()
	if err != nil {
		return false, err
	}
	own := b.ownChainNames()
	for _, c := range chains {
		if c.Table.Name == b.cfg.Table && c.Table.Family == nftables.TableFamilyINet && (!b.cfg.Attached || own[c.Name]) {
			continue
		}
		rules, err := conn.GetRules(c.Table, c)
		if err != nil {
			if errors.Is(err, unix.ENOENT) {
				continue // gone meanwhile
			}
			return false, err
		}
		for _, r := range rules {
			if ruleUsesLabel(r.Exprs, bit) {
				return true, nil
			}
		}
	}
	return false, nil
}

// ruleUsesLabel: es sets the label with bit among its value ("ct label
// set": an immediate, then the ct set, which the library lists as a ct
// load into register 0) or matches it (a ct label load, then a bitwise
// mask or a comparison of that register holding the bit). Other 16-byte
// values (an IPv6 address) do not count.
func ruleUsesLabel(es []expr.Any, bit int) bool {
	has := func(d []byte) bool { return len(d) == 16 && d[bit/8]&(1<<(bit%8)) != 0 }
	loaded, reg := false, uint32(0)
	for i, e := range es {
		switch e := e.(type) {
		case *expr.Ct:
			if e.Key != expr.CtKeyLABELS {
				loaded = false
				continue
			}
			if e.SourceRegister || e.Register == 0 {
				if im, ok := prevImmediate(es, i); ok && has(im.Data) {
					return true
				}
				continue
			}
			loaded, reg = true, e.Register
		case *expr.Bitwise:
			if loaded && e.SourceRegister == reg && has(e.Mask) {
				return true
			}
		case *expr.Cmp:
			if loaded && e.Register == reg && has(e.Data) {
				return true
			}
			loaded = false // the match ends with its comparison
		default:
			loaded = false
		}
	}
	return false
}

func prevImmediate(es []expr.Any, i int) (*expr.Immediate, bool) {
	if i == 0 {
		return nil, false
	}
	im, ok := es[i-1].(*expr.Immediate)
	return im, ok
}

// checkLabelBit, at a Backend's first Setup: the cut off when its bit is
// taken (bitTaken). Caller holds b.mu.
func (b *Backend) checkLabelBit() error {
	if b.bitAsked || !(b.attCut() || b.natCutting()) {
		return nil
	}
	// A ruleset that cannot be read counts as taken: without the cut the
	// deletes only wait for the walk, and pcpd still starts.
	taken, err := b.bitTaken(b.natLabel)
	taken = taken || err != nil
	b.bitAsked = true
	if taken {
		if b.cfg.Attached {
			b.cutLabels = false
		} else {
			b.natCut = false
		}
	}
	return nil
}

// queueStaleCutRemoval queues the removal of the cut chains an earlier
// run laid out that this layout has not (a bit taken since), base chain
// first: a chain something jumps to cannot be deleted. Caller holds b.mu.
func (b *Backend) queueStaleCutRemoval() error {
	var names []string
	switch {
	case b.cfg.Attached && !b.attCut():
		names = []string{b.chainNATCut, b.chainRecheck6, b.chainRecheckNAT}
	case !b.cfg.Attached && !b.natCutting():
		names = []string{b.chainNATCut, b.chainRecheckNAT}
	case b.cfg.Attached && !b.natCutting():
		names = []string{b.chainRecheckNAT}
	default:
		return nil
	}
	ok, err := b.tableExists()
	if err != nil || !ok {
		return err
	}
	present, err := b.presentChains()
	if err != nil {
		return err
	}
	// pcpd_cut kept (natcut refused) may still goto pcpd_recheck_nat: it
	// is flushed too, and its rules written again later in this
	// transaction.
	for _, n := range append([]string{b.chainNATCut}, names...) {
		if present[n] {
			b.conn.FlushChain(&nftables.Chain{Table: b.table, Name: n})
		}
	}
	for _, n := range names {
		if present[n] {
			b.conn.DelChain(&nftables.Chain{Table: b.table, Name: n})
		}
	}
	return nil
}

// pinFlowsUnlabelled reports whether conntrack holds an IPv6 flow to an
// address of the kernel's protected6, not DNAT-ed, not ICMPv6, without
// this Backend's bit (cutLabelBit): one an admission rule admitted
// unlabelled (a layout before the labels, which an earlier start's Setup
// rewrote labelled, so admitsUnlabelled no longer sees it), which the
// re-check never drops. Asked at a Backend's first Setup over an existing
// layout (a start): before, the second start after an upgrade had
// CutsFlows true while such a flow lived, its pinhole's delete was
// answered without the walk and the flow carried data after it (review
// h/revattcut, finding 2, TestCutRestartAfterUpgradePinholeFlow; the
// DNAT kinds' is dnatFlowsUnlabelled). Not the host's own connections
// (from one of its addresses: TestCutRestartHostOwnFlow). An admin's own
// flow to a client (attached: an open port before "jump pcpd", a LAN
// host's) keeps the pinhole kinds waiting for the walk as well (safe).
// Nor a flow to one of the host's addresses (its LAN address may lie in a
// client's prefix: TestCutsFlowsRestartSparesOtherFlows), nor a helper's
// expected flow (IPS_EXPECTED: its first packet is "related", accepted
// with the established ones). Replied or not: a client's reply can make an
// unreplied one established unlabelled. One dump of the IPv6 entries
// without IPS_DST_NAT or IPS_EXPECTED (the kernel's status filter), read
// as it comes and left at the first such flow (ctScan, ctdump.go), and
// only over a layout not marked checked (checkedMark). True when
// conntrack cannot be read. Caller holds b.mu.
func (b *Backend) pinFlowsUnlabelled() bool {
	if p := b.preReads; p != nil && p.hasPin {
		// Read before Setup took b.mu (PrepareSetup), or not read (a
		// Setup on its own): a "none" is read again, or first, over
		// the written layout (VerifySetup).
		b.pinVerify = !p.pin && !p.pinDecided
		return p.pin
	}
	in, decided, v := b.pinInputs()
	if decided {
		b.pinVerify = false
		return v
	}
	// Read before the layout is written: a flow let in after the dump
	// passed its bucket is missed; "none" is read again after it.
	v = in.scan(b)
	b.pinVerify = !v
	return v
}

// pinCheck is what pinFlowsUnlabelled's dump needs, read under b.mu
// (pinInputs); its scan needs no lock (PrepareSetup).
type pinCheck struct {
	prot  []intervalRange
	local map[netip.Addr]struct{}
	bit   int
}

// pinInputs reads pinFlowsUnlabelled's inputs; decided when the answer
// needs no dump (v). Caller holds b.mu.
func (b *Backend) pinInputs() (in pinCheck, decided, v bool) {
	prot, err := b.readIntervals(b.protected6)
	if err != nil {
		return in, true, true
	}
	if len(prot) == 0 {
		return in, true, false
	}
	local, err := b.localAddrs6()
	if err != nil {
		return in, true, true
	}
	return pinCheck{prot: prot, local: local, bit: b.cutLabelBit()}, false, false
}

// scan is pinFlowsUnlabelled's dump. Safe without b.mu.
func (in pinCheck) scan(b *Backend) bool {
	if testHookSetupRead != nil {
		testHookSetupRead(b, "pin")
	}
	found, err := b.ctScan(unix.AF_INET6, ipsDstNAT|ipsExpected, 0, in.unguarded)
	return err != nil || found
}

// unguarded reports whether f is a flow scan looks for: an IPv6 flow to
// a protected address no admission rule labelled (let in through no
// guard), but for echo and errors, DNAT-ed flows (dnatFlowsUnlabelled's),
// helpers' expected flows and the host's own connections.
func (in pinCheck) unguarded(f *ctnl.Flow) bool {
	if f.Orig.Proto == unix.IPPROTO_ICMPV6 || f.Status&(ipsDstNAT|ipsExpected) != 0 || f.DNATed() || f.Labelled(in.bit) {
		return false // echo and errors, DNAT-ed (dnatFlowsUnlabelled's), helpers' expected flows, labelled
	}
	if !inRanges(in.prot, f.Orig.Dst) {
		return false
	}
	_, fromHost := in.local[f.Orig.Src]
	_, toHost := in.local[f.Orig.Dst]
	return !fromHost && !toHost // the host's own connections, to or from a client
}
