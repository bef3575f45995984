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
	b.disarmed = b.labelledFlows()
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

// labelledFlows reports whether conntrack holds a flow with a label bit
// this Backend's re-checks look at. True when it cannot be read. Caller
// holds b.mu.
func (b *Backend) labelledFlows() bool {
	var bits []int
	if b.cutLabels {
		bits = append(bits, b.cutLabelBit())
	}
	if b.natCutting() {
		bits = append(bits, b.natLabel)
	}
	// Streamed (ctScan): a gateway's conntrack table may hold a million
	// entries, and this runs under b.mu.
	found, err := b.ctScan(unix.AF_UNSPEC, 0, 0, func(f *ctnl.Flow) bool {
		for _, bit := range bits {
			if f.Labelled(bit) {
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
		c := &nftables.Chain{Table: b.table, Name: cr.name}
		b.conn.FlushChain(c)
		for i, exprs := range cr.rules {
			r := &nftables.Rule{Table: b.table, Chain: c, Exprs: exprs}
			if i == len(cr.rules)-1 && !b.recheckFlows {
				// As Setup writes it; not over damage a Healthy found
				// since (flows may have come in unlabelled meanwhile):
				// a later start then reads conntrack again.
				r.UserData = b.checkedMark(cr.name)
			}
			b.conn.AddRule(r)
		}
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
	b.cutting.Store(b.cutLabels && !b.unlabelled && !b.recheckFlows)
	b.cuttingNAT.Store(b.natCutting() && !b.natUnlabelled && !b.recheckFlows)
	return nil
}
