package pinhole

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/ctnl"
)

// The record's life (h/flowedlife). Before, once untrusted (an upgrade,
// admit6's counter above 0 once, damage a Healthy found) the record was
// untrusted for the Backend's life, and Setup wrote the counter at 1 so
// that every later pcpd over the table distrusted it too: one overflow of
// flowed6 put every later delete back on the full conntrack walk until
// someone deleted the table by hand. Addresses whose last lease ended
// while untrusted never left the set (pruning follows walks of recorded
// filters only), so it drifted to full; and a flush of flowed6 by hand
// went unseen.
//
// RegainFlowed rebuilds the record and trusts it again. In one
// transaction: flowed6 flushed, the mark (flowedMark) added, admit6
// written with its counter at 0. Then, flowedSettle later, conntrack is
// read once and the destination of every IPv6 flow carrying this
// Backend's label (admitted by a pinhole through admit6, its prefix
// protected or since unprotected: what the ruleset records) is added to
// flowed6; then the counter is read: 0, and nothing untrusted the record
// meanwhile (untrusts), the mark is deleted and the record trusted.
//
// Only labelled flows (h/flowtrust). An unlabelled IPv6 flow to a
// protected address is one of: let in through no guard (the rebuild does
// not trust while one lives: below), an echo or ICMPv6 error (AllowEcho,
// guard6's icmp rule), DNAT-ed (a redirect's), a helper's expected flow
// (ct state related) or the host's own. None was admitted by a pinhole,
// and the ruleset never records one (admit6 is reached only from the
// admission rules, after "ct label set"): a record trusted between
// rebuilds lacks them too. No walk left out has to end one: a pinhole's
// delete does not govern a flow that passes without it (an echo is let
// in again at its next packet, with AllowEcho: without it an unlabelled
// echo was let in through no guard and its address is recorded, review
// h/revtrust, unguardedEcho; a related flow passes "ct state related"
// whatever the pinholes: the kernel does not end it with its master); a DNAT-ed flow's walk is its redirect's,
// never left out (RecordsFlows: not for redirects; natcut re-checks it);
// the walk spares the host's own anyway (the server's ctDeleter.host).
// Before, the rebuild recorded every IPv6 flow to a protected address:
// echo requests to 65 535 addresses of a client's prefix (anyone on the
// Internet, with AllowEcho; conntrack keeps each 30 s) made every
// rebuild meanwhile fail ("more than flowed6 holds"), and every delete
// walked conntrack again (TestRegainIgnoresEcho).
//
// Why nothing is missed:
//
//   - A flow admitted after the transaction: its add recorded it, or
//     failed and the counter (read after every add of ours) is above 0.
//   - A flow admitted before it: in conntrack, labelled, when the dump
//     passes its bucket, so added, unless it ended (nothing to walk). A packet
//     admitted before the commit and not yet confirmed (the same pass
//     through the stack, microseconds) when the dump passed its bucket
//     is missed: flowedSettle waits for it. Such a flow is labelled
//     (admit6 is reached only after "ct label set"): recheck6 drops its
//     packets once its pinhole is gone; only its entry would wait for its
//     timeout.
//   - A flow let in through no guard after the dump (protected6 damaged,
//     the table gone): not while the layout is intact (RegainFlowed runs
//     only while the layout cuts, no conntrack read owed: cutting,
//     !pinVerify) and every such event (noteDamage) untrusts again.
//     Damage noticed is not lost to a rebuild (h/flowtrust): noticed
//     before it, the rebuild does not start (noteDamage clears cutting
//     or sets pinVerify, until a Setup that read conntrack for flows let
//     in unlabelled, or VerifySetup); noticed during it, untrusts has
//     moved and it does not trust (a Healthy overlapping it reads again:
//     regainStart's gen); a repairing Setup meanwhile writes the counter
//     at 1 (b.unrecorded), which the rebuild's read of it sees. Damage
//     not yet noticed, begun before the dump: its flows are in
//     conntrack, unlabelled, and the rebuild refuses (unguarded, below).
//     Begun after the check's Healthy, with a flow let in after the dump
//     passed: trusted until the next check, as a trusted record is
//     without any rebuild; that check sees the damage (noteDamage) and
//     walks the filters left out meanwhile (the server keeps each until
//     a check started after it finds the layout intact: skipUnflowed),
//     so their walks come late, not never. Damage undone before any
//     check saw it goes unseen with or without a rebuild, but its flows
//     make the next rebuild refuse.
//   - A flow let in through no guard (unlabelled, to a protected
//     address: the table gone while pcpd was down; pinCheck.unguarded,
//     verifyFlowed's finding): the rebuild does not trust while one
//     lives. Recorded, its address could leave flowed6 at a prune (a walk
//     of another port of it, no lease left at it) while it lived, and a
//     mapping of its port made and ended later would leave its walk out
//     (review h/revlife, TestE2ERegainRefusesUnguardedFlow).
//   - A pcpd stopped part way: the mark is in flowed6 (with the counter
//     at 0), and a Setup over the table reads it (flowsUnrecorded) as
//     unrecorded. An older pcpd, which knows no mark, trusts a counter
//     at 0: a downgrade is a table delete anyway (README). A rebuild
//     that does not trust writes the counter at 1 again (review
//     h/revlife): only a pcpd stopped during one leaves it at 0.
//
// The witness (h/flowtrust). What tells a later pcpd over the table that
// this one knew the record incomplete is admit6's counter at 1 (also
// read by a pcpd that knows no mark, and kept by a flush of flowed6 by
// hand while pcpd is down) and the mark: every untrust (noteUnrecorded)
// owes it (witnessOwed) until a write of the counter goes through
// (writeUnrecorded; a Setup's layout; the counter above 0 already). A
// write that fails (ENOMEM, a commit refused) is tried again at each
// Healthy that finds the layout intact and at Close. Before,
// flowedTampered wrote the mark alone, once, and writeUnrecorded's
// failures were dropped: the kernel said "trusted" (counter at 0, no
// mark) and a restart trusted a record the last pcpd knew incomplete
// (TestFlowedWitnessAfterFailedWrite). Left: a pcpd killed between the
// failed write and the next check (one check's interval; both writes
// failed). While a rebuild runs the mark, written with the counter at 0
// in one transaction, is the witness (the counter at 1 would only fail
// it).
//
// It also ends the drift: what it leaves in flowed6 is the addresses of
// live flows, so a rebuild now and then (the server: hourly) drops the
// leftovers; and the watch (judge) tells a change of flowed6 by another
// process (nft flush set: one NFT_MSG_DELSETELEM an element on 6.18) and
// a lost watch as untrusting (flowedTampered), regained the same way.
// A reset of admit6's counter tells no one either (no notification, no
// new generation). "nft reset counters" resets named counter objects only
// (nft 1.0.6: admit6's stays); "nft reset rules" (nft 1.0.7 and later,
// Linux 6.3) resets rules' counters: its packets at 0 again would hide a
// failed add. Its bytes are written at counterBase (h/flowtrust), so a
// reset reads as untrusting (TestFlowedCounterReset). A table a pcpd
// before h/flowtrust wrote (bytes at 0) is rebuilt once.

// flowedMark is flowed6's element that says "untrusted" to a later pcpd
// over the table: never a flow's destination.
var flowedMark = netip.IPv6Unspecified()

// flowedSettle is how long RegainFlowed waits between its transaction and
// its read of conntrack (a packet admitted before the commit confirmed).
const flowedSettle = 20 * time.Millisecond

// ErrRegainNotNow: RegainFlowed cannot trust the record now (no record,
// the layout not cutting, a read of conntrack owed); asked again later.
var ErrRegainNotNow = errors.New("pinhole: flowed6: no regain now")

func markElems() []nftables.SetElement {
	k := flowedMark.As16()
	return []nftables.SetElement{{Key: k[:]}}
}

// writeMark adds flowedMark to flowed6, alone (the set full: the counter
// written at 1 says it). Caller holds b.mu.
func (b *Backend) writeMark() {
	var err error
	defer b.dropUnsent(&err)
	if err = b.conn.SetAddElements(b.flowed6, markElems()); err == nil {
		err = b.flush()
	}
}

// markedUnrecorded reports whether flowed6 holds flowedMark (or cannot
// tell). Its own socket: the caller holds b.mu, not b.flowed.mu.
func (b *Backend) markedUnrecorded() bool {
	r := rawRules{}
	defer r.close()
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: b.netns})
	if err != nil {
		return true
	}
	r.c = c
	msgs, err := c.SendMessages([]netlink.Message{b.flowedGet(flowedMark)})
	if err != nil {
		return true
	}
	got, err := c.Receive()
	switch {
	case err == nil && len(got) == 1 && got[0].Header.Sequence == msgs[0].Header.Sequence:
		return true
	case err != nil && errors.Is(err, unix.ENOENT):
		return false
	}
	return true
}

// RegainFlowed rebuilds flowed6 from conntrack and trusts it again (the
// procedure above) when it is untrusted, or rebuild asks it anyway (the
// leftovers); a read owed (verify) is done by the rebuild too. trusted: the
// record is trusted on return. ErrRegainNotNow: nothing done. Another
// error: the record stays untrusted (the caller backs off). Walks meanwhile
// run in full (FlowedAddrs says nothing).
func (b *Backend) RegainFlowed(rebuild bool) (trusted bool, err error) {
	if b.conn.TestDial != nil {
		return false, ErrRegainNotNow
	}
	f := &b.flowed
	f.mu.Lock()
	defer f.mu.Unlock()
	b.mu.Lock()
	if !b.recordsFlows() || !b.cutting.Load() || b.pinVerify || b.disarmed {
		b.mu.Unlock()
		return false, ErrRegainNotNow
	}
	if !b.unrecorded && !rebuild {
		// Trusted (a conntrack read owed, verify, is FlowedAddrs'
		// verifyFlowed's, as before).
		b.mu.Unlock()
		return true, nil
	}
	wasVerify := f.verify.Swap(false)
	b.noteUnrecorded()
	epoch := f.untrusts
	in, err := b.regainStart()
	started := err == nil
	if started {
		// The mark, in the same transaction as the counter at 0, is
		// the witness while the rebuild runs: the counter at 1 written
		// meanwhile would only fail it.
		b.witnessOwed = false
	}
	b.mu.Unlock()
	defer func() {
		if trusted {
			return
		}
		if wasVerify {
			f.verify.Store(true)
		}
		if started {
			// The transaction wrote admit6's counter at 0 beside
			// the mark: at 1 again, as Setup writes it for an
			// unrecorded record, so that a pcpd that knows no mark
			// does not trust the emptied set either (review
			// h/revlife).
			b.mu.Lock()
			if b.recordsFlows() && b.unrecorded {
				b.writeUnrecorded()
			}
			b.mu.Unlock()
		}
	}()
	if err != nil {
		return false, err
	}
	time.Sleep(flowedSettle)
	live, err := b.liveDests(in)
	if err != nil {
		return false, err
	}
	if _, err := b.flowedElemsLocked(live, true); err != nil {
		return false, fmt.Errorf("pinhole: flowed6 rebuild: %w", err)
	}
	c, err := f.conn.get(b.netns)
	if err != nil {
		return false, err
	}
	if n, err := b.admit6Counter(c); err != nil || n > 0 {
		f.conn.close()
		return false, fmt.Errorf("pinhole: flowed6 rebuild: admit6's counter %d after the read (%v)", n, err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if f.untrusts != epoch || !b.recordsFlows() || !b.cutting.Load() || b.pinVerify || b.disarmed {
		return false, fmt.Errorf("pinhole: flowed6 rebuild: %w (untrusted meanwhile)", ErrRegainNotNow)
	}
	if _, err := b.flowedElemsLocked([]netip.Addr{flowedMark}, false); err != nil {
		return false, fmt.Errorf("pinhole: flowed6 rebuild: the mark: %w", err)
	}
	b.unrecorded = false
	f.recorded.Store(true)
	return true, nil
}

// regainStart is RegainFlowed's transaction (flowed6 flushed, the mark
// added, admit6's counter written at 0), then its read of what the dump
// needs. Caller holds b.mu.
func (b *Backend) regainStart() (in pinCheck, err error) {
	defer b.dropUnsent(&err)
	b.gen++ // new handles: a Healthy reading meanwhile reads again
	b.conn.FlushSet(b.flowed6)
	if err = b.conn.SetAddElements(b.flowed6, markElems()); err != nil {
		return in, err
	}
	b.queueRewrite(&nftables.Chain{Table: b.table, Name: b.chainAdmit6}, chainRules{b.chainAdmit6, b.admit6RulesAt(0)}, true)
	if err = b.flush(); err != nil {
		return in, fmt.Errorf("pinhole: flowed6 rebuild: %w", err)
	}
	in, decided, v := b.pinInputs()
	if decided && v {
		return in, errors.New("pinhole: flowed6 rebuild: protected6 or the host's addresses unreadable")
	}
	if decided { // no protected prefix: the labelled flows only
		in.bit = b.cutLabelBit()
	}
	return in, nil
}

// liveDests is RegainFlowed's read of conntrack: the distinct destinations
// of the IPv6 flows labelled with in.bit (a pinhole's: only labelled,
// above). More than flowed6 holds (the mark's place kept), or a flow let
// in through no guard: an error.
func (b *Backend) liveDests(in pinCheck) ([]netip.Addr, error) {
	seen := map[netip.Addr]struct{}{}
	var out []netip.Addr
	intr := false
	var unguarded netip.Addr // a flow's destination (its Flow is the dump's buffer)
	stopped, err := b.ctScan(unix.AF_INET6, 0, 0, func(fl *ctnl.Flow) bool {
		intr = intr || fl.Interrupted
		if in.unguarded(fl) {
			unguarded = fl.Orig.Dst
			return true
		}
		d := fl.Orig.Dst.WithZone("")
		if _, ok := seen[d]; ok || !d.Is6() || !fl.Labelled(in.bit) && !b.unguardedEcho(in, fl) {
			return false // not a pinhole's (as admit6 records: recordedOnly)
		}
		seen[d] = struct{}{}
		out = append(out, d)
		return len(out) >= flowedSize-1
	})
	switch {
	case err != nil:
		return nil, fmt.Errorf("pinhole: flowed6 rebuild: %w", err)
	case unguarded.IsValid():
		// verifyFlowed's finding (review h/revlife): recorded, its
		// address could leave flowed6 at a prune (a walk of another
		// port of it, no lease left there) while it lives, and a
		// mapping of its port made and ended later would leave its
		// walk out.
		return nil, fmt.Errorf("pinhole: flowed6 rebuild: a flow to %v let in through no guard (unlabelled): not trusted while it lives", unguarded)
	case stopped:
		return nil, fmt.Errorf("pinhole: flowed6 rebuild: %d or more addresses with flows: more than flowed6 holds", len(out))
	case intr:
		return nil, errors.New("pinhole: flowed6 rebuild: conntrack's dump interrupted")
	}
	return out, nil
}

// unguardedEcho: f is an unlabelled ICMPv6 flow (an echo) to a protected
// address while echo is not allowed: let in through no guard (without
// AllowEcho only an all-protocols pinhole admits an echo, labelled), it
// goes on as established whatever the pinholes and only a walk ends it.
// The rebuild records its address (review h/revtrust,
// TestRegainRecordsUnguardedEcho): unguarded exempts ICMPv6 (AllowEcho's
// echo and the errors), and h/flowtrust's "labelled only" left it out.
func (b *Backend) unguardedEcho(in pinCheck, f *ctnl.Flow) bool {
	return !b.cfg.AllowEcho && f.Orig.Proto == unix.IPPROTO_ICMPV6 && f.Status&(ipsDstNAT|ipsExpected) == 0 &&
		!f.DNATed() && inRanges(in.prot, f.Orig.Dst)
}

// flowedTampered: flowed6 changed by another process, or the watch lost
// what it was told (Watch): flows admitted before may be unrecorded. The
// record is untrusted, the mark written (a later pcpd too), until
// RegainFlowed.
func (b *Backend) flowedTampered() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.recordsFlows() {
		return
	}
	b.noteUnrecorded()
	b.writeUnrecorded() // the counter too (the witness, above)
}

// flowedChanged reports whether msgs tell elements of flowed6 deleted by
// a socket not the Backend's own (nft flush set, nft delete element).
// Adds are not: a larger record is only walked more.
func (b *Backend) flowedChanged(msgs []netlink.Message) bool {
	if b.flowed6 == nil || b.cfg.Attached {
		return false
	}
	for _, m := range msgs {
		typ := int(m.Header.Type & 0xff)
		if m.Header.Type>>8 != unix.NFNL_SUBSYS_NFTABLES || len(m.Data) < 4 || m.Header.PID == 0 ||
			typ != unix.NFT_MSG_DELSETELEM && typ != nftMsgDestroySetElem || b.ports.has(m.Header.PID) {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			continue
		}
		var table, set string
		for ad.Next() {
			switch ad.Type() {
			case unix.NFTA_SET_ELEM_LIST_TABLE:
				table = ad.String()
			case unix.NFTA_SET_ELEM_LIST_SET:
				set = ad.String()
			}
		}
		if ad.Err() == nil && b.ours(table) && set == b.flowed6.Name {
			return true
		}
	}
	return false
}

// FlowedTrusted reports whether FlowedAddrs would trust the record now
// (a read owed, verify, aside). Lock-free.
func (b *Backend) FlowedTrusted() bool {
	return b.flowed.recorded.Load() && b.cutting.Load()
}
