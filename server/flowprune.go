package server

import (
	"net/netip"
	"slices"
)

// Pruning flowed6 (pinhole/flowed.go). The ruleset adds the address of
// each flow it admits to flowed6, and the flusher leaves out the filters
// of ended IPv6 pinholes whose address is not in it (skipUnflowed). The
// set did not shrink: once 65 536 distinct addresses had had a flow
// (IPv6 temporary addresses rotate daily, RFC 8981) every further add
// failed, admit6's counter rose and every walk ran again for the table's
// life (review h/revflow, finding 4). Now a walk that succeeded deletes
// from it the addresses its filters named (found in the record) that no
// lease in the table holds any longer and no filter still queued names
// (pruneFlowed).

// on6Add and on6Del keep on6, the number of leases in the table whose
// internal or external address is each IPv6 address (a lease counted once
// an address; zones not told apart: more held, never fewer). Cost: one
// map update a lease with an IPv6 address made or deleted, and a
// pointer-free map entry (≈ 30 B) a distinct address; the only
// per-address index of IPv6 leases (the table has byIn4 for IPv4 only),
// in place of a scan of the table under s.mu.
func (t *table) on6Add(r *rec) {
	if a, ok := as6(r.iaddr); ok {
		t.on6[a]++
	}
	if a, ok := as6(r.eaddr); ok && r.eaddr.a != r.iaddr.a {
		t.on6[a]++
	}
}

func (t *table) on6Del(r *rec) {
	if a, ok := as6(r.iaddr); ok {
		t.on6Dec(a)
	}
	if a, ok := as6(r.eaddr); ok && r.eaddr.a != r.iaddr.a {
		t.on6Dec(a)
	}
}

func (t *table) on6Dec(a [16]byte) {
	if t.on6[a]--; t.on6[a] <= 0 {
		delete(t.on6, a)
	}
}

func as6(c caddr) ([16]byte, bool) { return c.a, c.m&3 == 2 }

// held6 reports whether a lease in the table (live, or expired and not
// swept yet) has a as its internal or external address.
func (t *table) held6(a netip.Addr) bool {
	return t.on6[a.As16()] > 0
}

// flowedOf returns the distinct addresses of fs's filters that skipUnflowed
// kept as flowed (their mapping's flows recorded, their address in the
// record): the candidates of pruneFlowed once fs's walk succeeded.
func flowedOf(fs []ctFilter) []netip.Addr {
	var as []netip.Addr
	seen := map[netip.Addr]struct{}{}
	for i := range fs {
		if _, ok := seen[fs[i].t.addr]; fs[i].flowed && !ok {
			seen[fs[i].t.addr] = struct{}{}
			as = append(as, fs[i].t.addr)
		}
	}
	return as
}

// pruneFlowed deletes from the record (FlowRecorder.ForgetFlowed, in
// transactions of up to 4 096) the addresses as, which a walk that succeeded covered
// (their filters walked: every flow to them no lease admitted as the walk
// decided has ended), but for those a lease in the table holds (table.on6)
// and those a filter queued since (or kept back, undeletedEnds) names.
// The flusher's goroutine (no other walk runs meanwhile). Why a flow never
// goes unrecorded and uncut:
//
//   - A flow to a the walk spared (a lease live when it decided) or one
//     admitted after its dump: admitted through some pinhole of a; its
//     lease is in the table now (held: kept) or ended since, its filter
//     queued (or kept back) under the same hold of s.mu that took it out
//     of the table (tx, flushConntrack): kept. The table is asked
//     first, under s.mu, then the queue (unheldFlowed).
//   - A lease at a made after that decision, before the delete: a flow
//     admitted through it finds a in the set (its add a no-op), and the
//     delete would leave it unrecorded. After the delete the same
//     question is asked again, and what is held or named now is added
//     back (Reflowed: a failure makes the record untrusted). What remains
//     is a flow admitted between the delete and the add back, recorded by
//     its own add anyway (a is gone then), and a lease made and ended in
//     that gap, whose filter is still queued (this goroutine walks next).
//   - Whatever is left unrecorded by a race not seen here is a flow
//     admitted by guard6's admission rules, which set its label before
//     they go to admit6 (pinhole/rules.go): recheck6 cuts it at its next
//     packet once its element is gone; only its entry waits for its
//     timeout (as a flow recorded but admitted after its walk's dump).
//   - A delete that fails: the set keeps a (the safe side); one that
//     went through in part is added back as a whole one is. Nothing is
//     deleted while the record is untrusted or owes its conntrack read
//     (ForgetFlowed).
func (s *Server) pruneFlowed(as []netip.Addr) {
	if len(as) == 0 || s.recorder == nil {
		return
	}
	as = s.unheldFlowed(as, false)
	if len(as) > 0 && pruneFlowedHook != nil {
		pruneFlowedHook(as)
	}
	if len(as) == 0 || !s.recorder.ForgetFlowed(as) {
		return
	}
	if back := s.unheldFlowed(as, true); len(back) > 0 {
		s.recorder.Reflowed(back)
	}
}

// pruneFlowedHook, if set, is called by pruneFlowed with the addresses
// it is about to delete from the record, before its transaction (tests).
var pruneFlowedHook func(as []netip.Addr)

// unheldFlowed returns the addresses of as no lease in the table holds
// and no filter kept back (undeletedEnds, under s.mu) or queued (under
// the flusher's lock, after: a lease that leaves the table once s.mu is
// let go has its filter queued by then) names; with held, the others.
// Past maxPruneScan queued filters, all are taken as named (no prune
// this walk: the scan holds the lock every ended mapping's queueing
// takes, under s.mu).
func (s *Server) unheldFlowed(as []netip.Addr, held bool) []netip.Addr {
	named := make(map[netip.Addr]bool, len(as))
	s.mu.Lock()
	for _, a := range as {
		named[a] = s.tab.held6(a)
	}
	for i := range s.undeletedEnds {
		if _, ok := named[s.undeletedEnds[i].t.addr]; ok {
			named[s.undeletedEnds[i].t.addr] = true
		}
	}
	s.mu.Unlock()
	c := &s.ct
	c.mu.Lock()
	all := len(c.pending) > maxPruneScan
	for i := range c.pending {
		if all {
			break
		}
		if _, ok := named[c.pending[i].t.addr]; ok {
			named[c.pending[i].t.addr] = true
		}
	}
	c.mu.Unlock()
	return slices.DeleteFunc(slices.Clone(as), func(a netip.Addr) bool { return (named[a] || all) != held })
}

// maxPruneScan bounds the queued filters unheldFlowed looks through
// (≈ 20 ns each: ≤ 0.4 ms).
const maxPruneScan = 1 << 14
