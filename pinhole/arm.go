package pinhole

import (
	"errors"
	"fmt"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/ctnl"
)

// An admin's firewall reload ("flush ruleset", systemctl reload nftables)
// removes pcpd's objects, its pinhole sets among them. The repair (the
// server's checkFirewall: Setup, then every lease's pinholes installed
// again, in Apply batches) laid the cut (recheck6, natcut, recheck_nat;
// attached pcpd_cut and its re-checks) out over empty sets, and every
// established flow pcpd had labelled, of mappings that all live, was
// dropped until its element came back: a window as long as the
// re-install (review h/revattcut, finding 3,
// TestAttachedCutReloadWindow, TestCutReloadWindow). A pcpd crash and a
// reload before its restart made the same window at the start's restore.
//
// So a Setup that creates the re-checked sets (the table, or pcpd's sets
// in the admin's table, missing), or finds the cut laid out disarmed by an
// earlier run that never armed it, while conntrack holds a flow with one
// of this Backend's label bits (labelledFlows), lays the cut out
// disarmed: the re-check chains end in "accept" instead of "counter
// drop", so a labelled flow passes as any established one. Everything
// else is as armed (the labels are still set, Healthy checks the disarmed
// rules), and CutsFlows is false: the server waits for its walk. Arm,
// which the server calls once its restore at a start or its re-install
// after a repair has put every lease's element back, rewrites the
// re-check chains armed in one transaction and CutsFlows says true again.
// A Setup over intact sets (a restart: the kernel kept them) lays out
// armed, as does one with no labelled flow alive (a first start): no
// flow to spare, no window.

// cutLaidOut: the layout holds a re-check. Caller holds b.mu.
func (b *Backend) cutLaidOut() bool { return b.cutLabels || b.natCutting() }

// checkDisarm, before Setup's layout: disarmed when the re-checked sets
// are made now or the kernel's cut is disarmed, and labelled flows live.
// Once disarmed, only Arm arms. Caller holds b.mu.
func (b *Backend) checkDisarm() {
	if b.disarmed || !b.cutLaidOut() {
		return
	}
	if b.cutIntact() {
		return
	}
	bits := b.cutBits()
	if p := b.preReads; p != nil && p.hasLabelled && (p.bits == bits || p.prepared) {
		// Read before Setup took b.mu; prepared: not read, disarmed
		// whatever the bits (prepareReads, unreadLocked).
		b.disarmed = p.labelled
		return
	}
	b.disarmed = b.labelledFlows(bits)
}

// cutBits are the label bits this Backend's re-checks look at (-1:
// none).
type cutBits [2]int

// cutBits is the bits as things stand. Caller holds b.mu.
func (b *Backend) cutBits() cutBits {
	bits := cutBits{-1, -1}
	if b.cutLabels {
		bits[0] = b.cutLabelBit()
	}
	if b.natCutting() {
		bits[1] = b.natLabel
	}
	return bits
}

// setupReads are Setup's reads of conntrack made before it took b.mu
// (prepareReads): whether labelled flows live (checkDisarm: labelledFlows,
// with the bits it looked for), and whether flows admitted or DNAT-ed
// unlabelled do (pinFlowsUnlabelled, dnatFlowsUnlabelled), each if Setup
// was to ask as things stood. gen is b.gen then: a Setup, Arm or
// protected-set write since voids them all.
type setupReads struct {
	gen uint64
	// prepared: made by PrepareSetup (before its caller's wait for a
	// lock of its own), not by Setup right before b.mu.
	prepared    bool
	hasLabelled bool
	bits        cutBits
	labelled    bool
	hasPin, pin bool
	hasNAT, nat bool
	// pinDecided, natDecided: answered without a dump (pinInputs,
	// dnatInputs), trusted as it is.
	pinDecided, natDecided bool
}

// prepareReads makes the reads of conntrack the next Setup would make
// under b.mu, without it: what to ask and its inputs (the protected
// sets, the host's addresses) are read in a short hold, the dumps run
// after it. Each read the whole table when no flow matched, and held b.mu
// meanwhile; the server's repair, which calls Setup with its engine lock
// held (and a start), made the engine wait for them too: at 1 000 000
// entries 2.0-2.6 s for the labelled flows' read alone (review h/revarm's
// left item; TestSetupDumpHoldFigure, the server's TestRepairStallFigure;
// BENCHMARKS.md item 49 for the other two: 1.8-2.9 s and 0.6-1.2 s).
// nil when Setup would ask none. Setup decides under b.mu as before and
// takes an answer only where it asks the same question (checkDisarm: the
// same bits; setupLocked's own conditions for the other two) and no
// write of the layout came between (gen). An answer is conntrack's a
// moment earlier than under the lock; either is a moment's of a table
// the kernel changes beside both: a flow labelled after the read was let
// in by an element present then, which Setup keeps (AddSet keeps a set's
// elements) unless it ends, when its flow is to be cut; one admitted
// unlabelled after it came through a layout damaged as it was during the
// Setup before, which rewrites it (the same window, the s.mu wait longer:
// PrepareSetup's are not trusted so, review h/revleft9).
func (b *Backend) prepareReads(prepared bool) *setupReads {
	b.mu.Lock()
	r, pin, nat, askPin, askNAT := b.planReads(prepared)
	b.mu.Unlock()
	if r == nil {
		return nil
	}
	switch {
	case r.hasLabelled && prepared:
		// Not read: the answer would be older than the layout by the
		// caller's wait for its lock, and a flow labelled meanwhile
		// through an element put back (a renewal) whose set a second
		// reload flushed again was dropped by a cut laid out armed
		// until the re-install (review h/revleft9,
		// TestPreparedSetupSparesFlowLabelledDuringWait). Laid out
		// disarmed: the caller (the server's repair) arms after its
		// re-install, as over labelled flows.
		r.labelled = true
	case r.hasLabelled:
		r.labelled = b.labelledFlows(r.bits)
	}
	// A Setup on its own (not prepared) does not read these before the
	// layout: its "none" would be read again after it anyway
	// (VerifySetup, h/left10), so they are read once, then.
	if askPin && prepared {
		r.pin = pin.scan(b)
	}
	if askNAT && prepared {
		r.nat = nat.scan(b)
	}
	return r
}

// planReads is prepareReads' short hold: what the next Setup would ask
// and the inputs of the dumps it would make (askPin, askNAT: a dump
// owed), nothing read yet (r nil: nothing asked). Caller holds b.mu.
func (b *Backend) planReads(prepared bool) (r *setupReads, pin pinCheck, nat dnatCheck, askPin, askNAT bool) {
	r = &setupReads{gen: b.gen, prepared: prepared}
	if !b.disarmed && b.cutLaidOut() && !b.cutIntact() {
		r.hasLabelled, r.bits = true, b.cutBits()
	}
	// setupLocked's conditions, read only.
	if b.cutLabels && !b.unlabelled && (!b.pinAsked || b.recheckFlows) && !b.admitsUnlabelled() &&
		(b.recheckFlows || !b.markTrusted(b.chainRecheck6, flowsCheckedMark)) && b.existing() {
		in, decided, v := b.pinInputs()
		r.hasPin, r.pin, r.pinDecided, pin, askPin = true, v, decided, in, !decided
	}
	if b.natCutting() && !b.natUnlabelled && (!b.natAsked || b.recheckFlows) && !b.translatesUnlabelled() &&
		(b.recheckFlows || !b.markTrusted(b.chainRecheckNAT, natCheckedMark)) && b.existing() {
		in, decided, v := b.dnatInputs()
		r.hasNAT, r.nat, r.natDecided, nat, askNAT = true, v, decided, in, !decided
	}
	if !r.hasLabelled && !r.hasPin && !r.hasNAT {
		return nil, pin, nat, false, false
	}
	return r, pin, nat, askPin, askNAT
}

// unreadLocked stands in for PrepareSetup's answers that a write of the
// layout voided (b.gen moved between PrepareSetup and Setup: another
// Setup, an Arm, a protected-set, served-set, owner-meter or route
// write, as a WireGuard peer's change or an address's makes beside the
// repair), or that asked less than Setup asks now (a Healthy between):
// nothing is read. A cut that is not intact is laid out disarmed, as
// PrepareSetup's Setup lays it out without reading (the caller arms
// after its re-install), and the dumps for flows admitted or DNAT-ed
// unlabelled are left to VerifySetup, as a "none" PrepareSetup read is
// (CutsFlows false for the kind, the re-check chain unmarked, until
// then). Before (h/repair1m), Setup read them again there, its caller's
// lock held: the server's repair dumped the whole table (1 000 000
// entries: 1.6-1.8 s) with the engine waiting, and, when the layout moved
// again before b.mu, read all three under b.mu as well
// (TestPreparedSetupVoidedReadsNothingLocked). Caller holds b.mu.
func (b *Backend) unreadLocked() *setupReads {
	r, _, _, _, _ := b.planReads(true)
	if r != nil && r.hasLabelled {
		r.labelled = true
	}
	return r
}

// PrepareSetup makes the next Setup's reads of conntrack now, without
// the Backend's lock (prepareReads), for a caller that calls Setup under
// a lock of its own: the server's repair holds its engine lock through
// Setup and the re-install. Call it right before Setup: the answers are
// kept for the next Setup only, and only if no write of the layout (a
// Setup, Arm, protected-set, served-set, owner-meter or route write) ran
// in between; else that Setup reads nothing (unreadLocked: disarmed over
// a cut not intact, the unlabelled checks left to VerifySetup). Its
// answers are older than the layout by the caller's wait (review
// h/revleft9), so such a Setup lays a cut that is not intact out
// disarmed without asking for labelled flows (call Arm once every
// pinhole is back), and its "no flow let in unlabelled" is read again
// by VerifySetup (call it after Setup, without the caller's lock).
func (b *Backend) PrepareSetup() {
	r := b.prepareReads(true)
	b.mu.Lock()
	b.preReads, b.prepared = r, true
	b.mu.Unlock()
}

// SetupVerifier's VerifySetup (review h/revleft9): PrepareSetup's reads of
// flows admitted or DNAT-ed unlabelled (asked after a Healthy found
// damage: recheckFlows) are older than the layout Setup writes by the
// caller's wait for its own lock (the server's engine lock), and the
// damaged layout (a flushed guard6 falls through to the forward chain's
// accept) let flows in unlabelled meanwhile: Setup took "none", said
// CutsFlows true and marked the re-check chain checked, and such a flow
// outlived its pinhole's delete, the reply not waiting for the walk
// (TestPreparedSetupSeesUnlabelledFlow). Now a Setup that takes such a
// "none" leaves CutsFlows false for the kind and the chain unmarked
// (pinVerify, natVerify), and VerifySetup reads conntrack again once the
// layout is written (every flow let in unlabelled came before it), without
// the caller's lock.

// VerifySetup reads conntrack again for the flows a Setup that took
// PrepareSetup's answers may have missed, and reports whether CutsFlows
// became true for a kind (the server then walks the retakes a false
// CutsFlows held: cutHeldRetargets). Call it after Setup, without the
// caller's lock; a no-op when nothing is owed. A flow found is as one
// Setup found (CutsFlows false for good). The re-check chains stay
// unmarked: a later start reads conntrack again.
func (b *Backend) VerifySetup() bool {
	for range 3 {
		b.mu.Lock()
		pinOwed, natOwed := b.pinVerify, b.natVerify
		if !pinOwed && !natOwed {
			b.mu.Unlock()
			return false
		}
		gen := b.gen
		var pin pinCheck
		var nat dnatCheck
		var askPin, askNAT, vPin, vNAT bool
		if pinOwed {
			var decided bool
			pin, decided, vPin = b.pinInputs()
			askPin = !decided
		}
		if natOwed {
			var decided bool
			nat, decided, vNAT = b.dnatInputs()
			askNAT = !decided
		}
		b.mu.Unlock()
		if askPin {
			vPin = pin.scan(b)
		}
		if askNAT {
			vNAT = nat.scan(b)
		}
		b.mu.Lock()
		if b.gen != gen {
			// A Setup, Arm or protected-set write came between: read
			// again (a Setup may have answered anew).
			b.mu.Unlock()
			continue
		}
		wasPin, wasNAT := b.cutting.Load(), b.cuttingNAT.Load()
		if pinOwed {
			b.unlabelled = b.unlabelled || vPin
			b.pinVerify = false
		}
		if natOwed {
			b.natUnlabelled = b.natUnlabelled || vNAT
			b.natVerify = false
		}
		if !b.recheckFlows { // else damage since: the next Setup decides
			b.cutting.Store(b.cutLabels && !b.unlabelled && !b.disarmed && !b.pinVerify)
			b.cuttingNAT.Store(b.natCutting() && !b.natUnlabelled && !b.disarmed && !b.natVerify)
			// Read over the written layout: its re-check chains are
			// marked checked now, as a Setup that read under b.mu
			// marked them (a later start need not read; disarmed, Arm
			// writes them so).
			b.markVerified(pinOwed && !vPin, natOwed && !vNAT)
		}
		became := !wasPin && b.cutting.Load() || !wasNAT && b.cuttingNAT.Load()
		b.mu.Unlock()
		return became
	}
	return false
}

// markVerified writes the re-check chains of the kinds VerifySetup found
// no flow let in unlabelled for (pin: recheck6, nat: recheck_nat) again,
// as Setup lays them out, with their checked marks (checkedMark), in one
// transaction; not while disarmed (Arm writes them). A failure only
// leaves them unmarked (a later start reads conntrack). Caller holds b.mu.
func (b *Backend) markVerified(pin, nat bool) {
	if b.disarmed || b.cfg.Attached || !pin && !nat {
		return
	}
	n := 0
	for _, cr := range b.layout() {
		if !(pin && cr.name == b.chainRecheck6 || nat && cr.name == b.chainRecheckNAT) {
			continue
		}
		b.queueRewrite(&nftables.Chain{Table: b.table, Name: cr.name}, cr, true)
		n++
	}
	if n == 0 {
		return
	}
	var err error
	defer b.dropUnsent(&err)
	err = b.flush()
}

// cutIntact: every set a re-check looks up exists, every set holds its
// sentinel, and no re-check chain present ends disarmed. Caller holds
// b.mu.
func (b *Backend) cutIntact() bool {
	present, err := b.presentSets()
	if err != nil {
		return false
	}
	var kinds []kind
	if b.cutLabels {
		kinds = append(kinds, cutKinds[:]...)
	}
	if b.natCutting() {
		kinds = append(kinds, natCutKinds[:]...)
	}
	for _, k := range kinds {
		if !present[b.sets[k].Name] {
			return false
		}
	}
	// A set flushed ("nft flush set", a reload that re-creates it) has
	// lost its sentinel: it is as empty as a set made anew, and the
	// re-install is to come (review h/revarm, finding 5;
	// TestCutSetFlushedWindow). Sets present, the sentinel transaction
	// (Healthy's) tells at a cost that does not grow with their sizes.
	w := b.healthWantLocked()
	if err := w.checkSentinels(kview{conn: b.readConn(), table: &w.table, nl: b.nl}); err != nil {
		return false
	}
	for _, name := range []string{b.chainRecheck6, b.chainRecheckNAT} {
		if name == "" {
			continue
		}
		rules, err := b.readConn().GetRules(b.table, &nftables.Chain{Table: b.table, Name: name})
		if err != nil {
			if errors.Is(err, unix.ENOENT) {
				continue
			}
			return false
		}
		if n := len(rules); n > 0 && !endsInDrop(rules[n-1].Exprs) {
			return false
		}
	}
	return true
}

func endsInDrop(es []expr.Any) bool {
	if len(es) == 0 {
		return false
	}
	v, ok := es[len(es)-1].(*expr.Verdict)
	return ok && v.Kind == expr.VerdictDrop
}

// recheckEnd is a re-check chain's last rule: "counter drop", or
// "accept" disarmed.
func (b *Backend) recheckEnd() []expr.Any {
	if b.disarmed {
		return x(accept)
	}
	return x(&expr.Counter{}, drop)
}

// testHookSetupRead, if set, runs as each of Setup's reads of conntrack
// begins: what is "labelled" (labelledFlows), "pin" (pinFlowsUnlabelled's
// dump) or "dnat" (dnatFlowsUnlabelled's) (tests).
var testHookSetupRead func(b *Backend, what string)

// testHookSetupLayout, if set, runs right before Setup's layout
// transaction is sent (tests: a flow let in by the layout as it was).
var testHookSetupLayout func()

// labelledFlows reports whether conntrack holds a flow with one of bits
// (cutBits; -1: none). True when it cannot be read. Safe without b.mu
// (ctScan): Setup reads it before taking b.mu (scanLabelled).
func (b *Backend) labelledFlows(bits cutBits) bool {
	if testHookSetupRead != nil {
		testHookSetupRead(b, "labelled")
	}
	// Streamed (ctScan): a gateway's conntrack table may hold a million
	// entries.
	found, err := b.ctScan(unix.AF_UNSPEC, 0, 0, func(f *ctnl.Flow) bool {
		for _, bit := range bits {
			if bit >= 0 && f.Labelled(bit) {
				return true
			}
		}
		return false
	})
	return err != nil || found
}

// Armed reports whether the cut is armed (or there is none): false from
// a Setup that laid it out disarmed until Arm.
func (b *Backend) Armed() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return !b.disarmed
}

// Arm arms a cut Setup laid out disarmed: the re-check chains are written
// again ending in "counter drop", in one transaction, and CutsFlows is
// true again for the kinds it was before. Call it once every lease's
// pinholes are installed again (the restore at a start, the re-install
// after a repair): a flow whose element is not back yet is cut from here.
// A no-op when armed.
func (b *Backend) Arm() (err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.disarmed {
		return nil
	}
	defer b.dropUnsent(&err)
	b.gen++
	b.disarmed = false
	for _, cr := range b.layout() {
		if cr.name != b.chainRecheck6 && cr.name != b.chainRecheckNAT {
			continue
		}
		// Marked as Setup writes it; not over damage a Healthy found
		// since (flows may have come in unlabelled meanwhile): a later
		// start then reads conntrack again.
		b.queueRewrite(&nftables.Chain{Table: b.table, Name: cr.name}, cr, !b.recheckFlows)
	}
	if err := b.flush(); err != nil {
		b.disarmed = true
		return fmt.Errorf("pinhole: arming the cut of inet %s: %w", b.cfg.Table, classify(err))
	}
	// Not over damage a Healthy found since the last Setup (noteDamage:
	// recheckFlows): Arm rewrites the re-check chains alone, so the rest
	// of the layout is as the damage left it, and CutsFlows stays false
	// until a Setup writes it again (review h/revarm, finding 2;
	// TestArmAfterDamage).
	b.cutting.Store(b.cutLabels && !b.unlabelled && !b.recheckFlows && !b.pinVerify)
	b.cuttingNAT.Store(b.natCutting() && !b.natUnlabelled && !b.recheckFlows && !b.natVerify)
	return nil
}
