package pinhole

import (
	"cmp"
	"errors"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Standalone, the ruleset also records where the flows it admits go, so
// that the server's conntrack walk (a dump of the machine-wide table,
// ≈ 9 ms of a core whatever the namespace holds: BENCHMARKS.md items 41,
// 64, 69) runs only where a flow of an ended mapping could be. Each of
// guard6's five admission rules goes, on its hit, to admit6:
//
//	ip6 daddr . meta l4proto . th dport @pin6 ct label set 127 goto admit6
//
// whose first rule adds the flow's destination to the dynamic set
// flowed6 and accepts, and whose second accepts, counting:
//
//	ip6 daddr add @flowed6 { ip6 daddr } accept
//	counter accept
//
// The add breaks its rule when it cannot insert (the set full, an atomic
// allocation failed): the flow is still admitted (the second rule), and
// that rule's counter tells the server that a flow may have gone
// unrecorded: from then on FlowedAddrs says nothing (every walk runs, as
// before). Only admitted flows are recorded (a new flow's packets before
// the admission: once a flow, and its retransmissions), so every address
// in flowed6 is a pinhole's address, and a remote cannot fill the set
// with others.
//
// What it is trusted for (FlowedAddrs): a labelled layout in place
// (cutting), written by a Setup that found no flow that may have gone
// unrecorded: no guard6 yet (a fresh table: then only once a read of
// conntrack found no flow let in unguarded, verifyFlowed), or one whose
// admission rules already went to admit6, whose counter was 0 and whose
// flowed6 holds no mark (flowedMark, flowedlife.go); each new IPv6
// prefix protected (SetProtected) is read over the same way. An older
// layout (an upgrade), damage a Healthy found (noteDamage), a counter
// above 0, or flowed6's elements deleted by another process (the watch)
// make it untrusted (unrecorded) until RegainFlowed rebuilds it from
// conntrack (flowedlife.go; the server asks at each firewall check that
// finds the layout intact), and Setup writes the counter at 1 and the
// mark meanwhile, so that a later pcpd over the same table does not
// trust it either: flows admitted before may still be there, unrecorded.
// Attached, there is no flowed6 (the admin's chain accepts established
// flows before pcpd's; attcut.go), and nothing is trusted.

// flowedSize is flowed6's size: IPv6 addresses that had a flow admitted.
// Past it, adds fail and the counter makes every walk run again, until
// RegainFlowed empties the set of all but live flows' addresses.
var flowedSize = 1 << 16 // a var for tests only (SetFlowedSize)

// flowedSet is flowed6, standalone only.
func flowedSet(table *nftables.Table) *nftables.Set {
	return &nftables.Set{Table: table, Name: "flowed6", KeyType: nftables.TypeIP6Addr,
		KeyByteOrder: binaryutil.BigEndian, Dynamic: true, Size: uint32(flowedSize),
		Comment: "pcpd: IPv6 addresses pinholes admitted a flow to"}
}

// recordsFlows: the layout goes to admit6 from the admission rules.
func (b *Backend) recordsFlows() bool { return b.flowed6 != nil && b.cutLabels && !b.cfg.Attached }

// admit6Rules are admit6's two rules; unrecorded writes the counter at 1.
func (b *Backend) admit6Rules() [][]expr.Any {
	var n uint64
	if b.unrecorded {
		n = 1
	}
	return b.admit6RulesAt(n)
}

// admit6RulesAt are admit6's two rules, the counter written at n.
func (b *Backend) admit6RulesAt(n uint64) [][]expr.Any {
	return [][]expr.Any{
		rule(nfproto(unix.NFPROTO_IPV6), x(loadNet(ip6DstOff, 16, reg0),
			&expr.Dynset{SrcRegKey: reg0, SetName: b.flowed6.Name, SetID: b.flowed6.ID, Operation: unix.NFT_DYNSET_OP_ADD},
			accept)),
		x(&expr.Counter{Packets: n, Bytes: counterBase}, accept),
	}
}

// counterBase is what admit6's counter's bytes are written at: a reset of
// the table's rule counters ("nft reset rules", nft 1.0.7 and later,
// Linux 6.3; the kernel tells no one) brings them to 0, which
// admit6Counter reads as "may have gone unrecorded" (h/flowtrust). Its
// packets alone could not tell a reset from no failed add. Each failed
// add's packet adds its length on top.
const counterBase = 1 << 40

// flowsUnrecorded reports whether guard6 and admit6 as they are in the
// kernel, before Setup writes them, may have admitted flows flowed6 does
// not hold: a guard6 whose admission rules do not go to admit6 (an older
// layout, an altered one), an admit6 missing or whose counter is not 0,
// or either unreadable. No guard6 (a fresh table), or one without
// admission rules: none. Caller holds b.mu.
//
// unguarded: no guard6, or one without admission rules (nothing admitted
// by pcpd): flows may have come in through no guard at all meanwhile
// (the table deleted while pcpd was down, a first start over an open
// forward path), unlabelled and unrecorded; the record is trusted only
// once conntrack is read over the written layout (verifyFlowed).
func (b *Backend) flowsUnrecorded() (unrecorded, unguarded bool) {
	c := b.readConn()
	rules, err := b.scanRules(c, b.chainGuard6, cutKinds[:], func(e expr.Any) bool {
		v, ok := e.(*expr.Verdict)
		return ok && v.Kind == expr.VerdictGoto && v.Chain == b.chainAdmit6
	})
	if err != nil {
		return !errors.Is(err, unix.ENOENT), true
	}
	admitting := false
	for _, r := range rules {
		if r.lookup && !r.found {
			return true, false
		}
		admitting = admitting || r.lookup
	}
	if !admitting {
		// No admission rule (as admitsUnlabelled: a guard6 Setup
		// made and has not filled yet): nothing admitted by pcpd.
		return false, true
	}
	n, err := b.admit6Counter(c)
	return err != nil || n > 0 || b.markedUnrecorded(), false
}

// verifyFlowed reads conntrack, over the layout Setup wrote, for a flow
// let in before it by no guard (flowsUnrecorded's unguarded; as
// pinFlowsUnlabelled's dump: an unlabelled IPv6 flow to a protected
// address): one found makes the record untrusted until RegainFlowed
// (noteUnrecorded); none, trusted from here. Undecided (no protected
// prefix yet, the layout or the prefixes written meanwhile), it is asked
// again at the next FlowedAddrs. Before (review h/revflow,
// TestE2EFlowLetInWhileTableGoneEndsWithMapping), a start over a table
// deleted while pcpd was down trusted the fresh, empty record: a
// connection let in meanwhile (unlabelled: the re-check never cuts it)
// outlived its mapping's delete, its walk left out for good. Called
// from FlowedAddrs (under b.flowed.mu, not b.mu): one dump, in place of
// the walk its caller runs anyway while it is owed.
func (b *Backend) verifyFlowed() bool {
	b.mu.Lock()
	gen := b.gen
	in, decided, v := b.pinInputs()
	b.mu.Unlock()
	if decided {
		return false // no protected prefix yet (or unreadable): asked again
	}
	v = in.scan(b)
	b.mu.Lock()
	defer b.mu.Unlock()
	if v {
		b.noteUnrecorded()
		b.writeUnrecorded()
		return false
	}
	if b.gen != gen {
		return false // a Setup or the prefixes meanwhile: asked again
	}
	b.flowed.verify.Store(false)
	return true
}

// VerifyFlowed runs verifyFlowed now if it is owed (a Setup over no guard,
// new protected prefixes), instead of at the next FlowedAddrs: the server
// calls it once before serving (Serve). Lazily, the first walk after a
// start paid it while the engine committed: its conntrack dump holds a CPU
// ≈ 9 ms, and closing the dump's NETLINK_NETFILTER socket waits, under
// the namespace's nftables commit_mutex, for the destroy work of the
// deletes just committed and an RCU grace period, ≈ 25 ms in which every
// nftables transaction of the engine waited (BENCHMARKS.md item 81: the
// churn row's first 40 ms, ≈ 1 % of its requests over 5 ms). Undecided or
// failed, it is owed still and FlowedAddrs asks again, as before.
func (b *Backend) VerifyFlowed() {
	if !b.flowed.verify.Load() || !b.flowed.recorded.Load() || !b.cutting.Load() || b.conn.TestDial != nil {
		return
	}
	f := &b.flowed
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.verify.Load() {
		b.verifyFlowed()
	}
}

// admit6Counter reads the packets of admit6's last rule's counter; its
// bytes below counterBase (reset) read as one packet more.
func (b *Backend) admit6Counter(c *nftables.Conn) (uint64, error) {
	rules, err := c.GetRules(b.table, &nftables.Chain{Table: b.table, Name: b.chainAdmit6})
	if err != nil {
		return 0, err
	}
	if len(rules) == 0 {
		return 0, errors.New("pinhole: admit6 is empty")
	}
	for _, e := range rules[len(rules)-1].Exprs {
		if ctr, ok := e.(*expr.Counter); ok {
			if ctr.Bytes < counterBase {
				// Reset since it was written (or written by a pcpd
				// before h/flowtrust: one rebuild, then trusted).
				return ctr.Packets + 1, nil
			}
			return ctr.Packets, nil
		}
	}
	return 0, errors.New("pinhole: admit6 has no counter")
}

// flowedState is FlowedAddrs' own: its kept connection, under mu.
type flowedState struct {
	mu   sync.Mutex
	conn sideConn
	raw  rawRules      // flowedHas' socket
	rd   *flowedReader // its requests' and answers' buffers (flowedread.go)
	// recorded: Setup trusted flowed6 (flowsUnrecorded false) and no
	// damage or counter since (unrecorded). Read without b.mu.
	recorded atomic.Bool
	// verify: a Setup laid the record out over no guard (unguarded), and
	// conntrack has not been read since (verifyFlowed); until then
	// FlowedAddrs trusts nothing.
	verify atomic.Bool
	// untrusts counts noteUnrecorded's calls (under the Backend's mu):
	// a regain that saw it move does not trust (flowedlife.go).
	untrusts uint64
}

// protects6More: next guards an IPv6 address prev did not (SetProtected:
// flows to it may have come in before through no guard, unrecorded; the
// record is read over again, verifyFlowed). Before (review h/revflow,
// TestFlowedUntrustedAfterPrefixAddedWithFlow), such a flow outlived its
// address's pinhole, its walk left out.
func protects6More(prev, next []netip.Prefix) bool {
	for _, p := range next {
		if !p.Addr().Is6() || p.Addr().Is4In6() {
			continue
		}
		covered := false
		for _, q := range prev {
			if q.Addr().Is6() && q.Bits() <= p.Bits() && q.Contains(p.Addr()) {
				covered = true
				break
			}
		}
		if !covered {
			return true
		}
	}
	return false
}

// writeUnrecorded writes admit6 again, its counter at 1 (admit6Rules):
// a later pcpd over the table, which reads no conntrack over a layout as
// this one (flowsUnrecorded), does not trust the record either while the
// flow found may live; then the mark. A failure of the counter's write
// leaves the witness owed (witnessOwed: written again at the next Healthy
// that finds the layout intact, or Close; flowedlife.go). Caller holds
// b.mu.
func (b *Backend) writeUnrecorded() {
	b.witnessOwed = !b.writeCounterAt1()
	b.writeMark() // flowedlife.go: apart, as the set may be full
}

// writeCounterAt1 is writeUnrecorded's write of admit6, its counter at 1;
// whether it went through. Caller holds b.mu.
func (b *Backend) writeCounterAt1() bool {
	var err error
	defer b.dropUnsent(&err)
	b.gen++ // new handles: a Healthy reading meanwhile reads again
	b.queueRewrite(&nftables.Chain{Table: b.table, Name: b.chainAdmit6}, chainRules{b.chainAdmit6, b.admit6RulesAt(1)}, true)
	err = b.flush()
	return err == nil
}

// writeWitnessOwed writes the witness (writeUnrecorded) if owed and the
// record is still untrusted. Not over damage a Healthy found (the
// repairing Setup writes it in its layout): its rewrite of admit6 would
// mend a flushed admit6 unseen (a Healthy that read before the damage
// and returned after it; TestKeptSocketsTamperMidRead). But at a stop
// (Close) all the same: no check follows that could miss the mend, and
// a stop before the repair went through (none yet, or one that failed)
// left the kernel saying "trusted" to the next pcpd (review h/revtrust,
// TestFlowedWitnessAtStopAfterDamage). Caller holds b.mu.
func (b *Backend) writeWitnessOwed(stopping bool) {
	if !b.witnessOwed || b.recheckFlows && !stopping {
		return
	}
	if !b.recordsFlows() || !b.unrecorded {
		b.witnessOwed = false // no record, or trusted again since (RegainFlowed)
		return
	}
	b.writeUnrecorded()
}

// noteUnrecorded: flows may have been admitted without their address in
// flowed6, now or before (damage, the counter). The kernel's witness is
// owed until a write of it (writeUnrecorded, a Setup's layout) goes
// through. Caller holds b.mu.
func (b *Backend) noteUnrecorded() {
	b.unrecorded = true
	b.witnessOwed = true
	b.flowed.recorded.Store(false)
	b.flowed.untrusts++
}

// FlowedAddrs returns whether an IPv6 pinhole's address may have had a
// flow admitted to it (flowed6 holds it), for a server that walks
// conntrack only where it may find such a flow; ok is false when the
// record cannot be trusted (attached, no labels, an old or damaged
// layout, a flow that may have gone unrecorded, any read failing, a
// fake test connection): then every address may have flows. Only for
// the kinds CutsFlows names and cutKinds holds (RecordsFlows). Not under
// b.mu.
//
// The counter is read first, then the addresses asked (a walk's, given
// up front) are looked up in flowed6, flowedBatch a round trip
// (flowedLookup: the kernel's get of one element each), and any other
// the returned func is asked alone (flowedHas), once a call: a flow of
// a mapping whose filter the caller queued was admitted before the
// filter was, its add done or counted by then. Before (review
// h/revflow, BenchmarkFlowedAddrsFull), the whole set was dumped at each
// walk: the kernel resumes a set's dump by skipping what it sent, so a
// dump is quadratic in the set's size: 6.5 ms and 5.4 MB at 4 096
// addresses, 405 ms and 101 MB at 65 536 (the set's size), against the
// ≈ 9 ms walk it leaves out. An address whose lookup fails is taken as
// flowed (walked).
func (b *Backend) FlowedAddrs(asked ...netip.Addr) (flowed func(netip.Addr) bool, ok bool) {
	if !b.flowed.recorded.Load() || !b.cutting.Load() || b.conn.TestDial != nil {
		return nil, false
	}
	f := &b.flowed
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.verify.Load() && !b.verifyFlowed() {
		return nil, false
	}
	c, err := f.conn.get(b.netns)
	if err != nil {
		return nil, false
	}
	n, err := b.admit6Counter(c)
	if err != nil {
		f.conn.close()
		return nil, false
	}
	if n > 0 {
		b.mu.Lock()
		b.noteUnrecorded()
		b.witnessOwed = false // the counter is the witness
		b.mu.Unlock()
		return nil, false
	}
	if !b.flowed.recorded.Load() || !b.cutting.Load() { // damage noted meanwhile
		return nil, false
	}
	return b.flowedFunc(asked), true
}

// flowedFunc is FlowedAddrs' answer: asked looked up in flowed6 now, any
// other address when asked. When the lookups fail, those left unanswered
// are asked once more together (a new socket), then, still unanswered,
// taken as flowed, as is any other address asked of the func: before
// (review h/revdump), each was asked again alone, a socket dialled and
// closed each (≈ 70 µs: ≈ 65 ms a walk of 900 addresses under
// b.flowed.mu), and a failure that lasts (flowed6 or its table missing,
// or a kernel whose ENOENT does not name the element: before Linux
// 5.19's b53c116642502 and its stable backports, flowedAnswer) failed
// them all, at every walk. Caller holds b.flowed.mu.
func (b *Backend) flowedFunc(asked []netip.Addr) func(netip.Addr) bool {
	f := &b.flowed
	seen := make(map[netip.Addr]bool, len(asked))
	b.flowedFromDump(asked, seen) // a small set read whole (flowedsmall.go)
	b.flowedLookup(asked, seen)
	failed := len(seen) < len(asked) && b.flowedUnanswered(asked, seen)
	if failed {
		b.flowedLookup(asked, seen) // once more, on a new socket
		failed = b.flowedUnanswered(asked, seen)
		for _, a := range asked {
			if _, ok := seen[a]; !ok {
				seen[a] = true // flowed: walked
			}
		}
	}
	return func(a netip.Addr) bool {
		if v, ok := seen[a]; ok {
			return v
		}
		if failed {
			return true // the lookups fail: not asked alone
		}
		f.mu.Lock()
		v := b.flowedHas(a)
		f.mu.Unlock()
		seen[a] = v
		return v
	}
}

// flowedUnanswered reports whether any of asked is not in seen.
func (b *Backend) flowedUnanswered(asked []netip.Addr, seen map[netip.Addr]bool) bool {
	return slices.ContainsFunc(asked, func(a netip.Addr) bool {
		_, ok := seen[a]
		return !ok
	})
}

// flowedHas looks a up in flowed6 (NFT_MSG_GETSETELEM of one key: a hash
// lookup in the kernel, whatever the set holds): false only when the
// kernel says it is not there (ENOENT). Caller holds b.flowed.mu.
func (b *Backend) flowedHas(a netip.Addr) bool {
	seen := map[netip.Addr]bool{}
	b.flowedLookup([]netip.Addr{a}, seen)
	v, ok := seen[a]
	return v || !ok
}

// flowedBatch is how many lookups flowedLookup sends in one sendmsg: their
// answers (one datagram each, ≈ 1 KB of receive buffer with its
// overhead) wait in the socket's buffer until read, and must fit.
const flowedBatch = 64

// flowedLookup looks as up in flowed6 and sets seen[a] for those it got an
// answer for: true (the element) or false (ENOENT). Each is one
// NFT_MSG_GETSETELEM of one key, flowedBatch of them sent in one sendmsg
// and their answers read in order (the kernel handles a datagram's
// requests one after the other, each answered by one message: the
// element, or, no ack asked, the error), sent and read through the
// socket's descriptor (flowedReader: one sendmsg, one recvmmsg). One round
// trip a batch instead of one an address (review h/revflow's ≈ 15 µs
// each; BENCHMARKS.md items 73, 82). An address not IPv6 (or zoned) is
// taken as flowed. Anything else (a failed send, an answer out of order,
// another error) closes the
// socket and leaves the rest unset: the caller takes them as flowed, or
// asks again. Caller holds b.flowed.mu.
func (b *Backend) flowedLookup(as []netip.Addr, seen map[netip.Addr]bool) {
	r := &b.flowed.raw
	var batch []netip.Addr
	for len(as) > 0 {
		batch = batch[:0]
		for len(as) > 0 && len(batch) < flowedBatch {
			a := as[0]
			as = as[1:]
			if _, ok := seen[a]; ok || slices.Contains(batch, a) {
				continue
			}
			if !a.Is6() || a.Is4In6() || a.Zone() != "" {
				seen[a] = true
				continue
			}
			batch = append(batch, a)
		}
		if len(batch) == 0 {
			continue
		}
		c := b.flowedConn()
		if c == nil {
			return
		}
		if !b.flowedReaderOf().lookup(c, batch, func(i int, present bool) { seen[batch[i]] = present }) {
			r.close() // dialled again next time
			return
		}
	}
}

// flowedGet is the NFT_MSG_GETSETELEM of a's element in flowed6 (its
// key the message's last 16 bytes: flowedReader's template).
func (b *Backend) flowedGet(a netip.Addr) netlink.Message {
	key := a.As16()
	ae := netlink.NewAttributeEncoder()
	ae.String(unix.NFTA_SET_ELEM_LIST_TABLE, b.table.Name)
	ae.String(unix.NFTA_SET_ELEM_LIST_SET, b.flowed6.Name)
	ae.Nested(unix.NFTA_SET_ELEM_LIST_ELEMENTS, func(ae *netlink.AttributeEncoder) error {
		ae.Nested(unix.NFTA_LIST_ELEM, func(ae *netlink.AttributeEncoder) error {
			ae.Nested(unix.NFTA_SET_ELEM_KEY, func(ae *netlink.AttributeEncoder) error {
				ae.Bytes(unix.NFTA_DATA_VALUE, key[:])
				return nil
			})
			return nil
		})
		return nil
	})
	attrs, _ := ae.Encode() // fixed-size attributes: cannot fail
	return netlink.Message{
		Header: netlink.Header{
			// No ack asked: a hit's answer is the element alone (with
			// an ack too, Execute read one and left the other to the
			// next lookup), a miss's the error.
			Type:  netlink.HeaderType(unix.NFNL_SUBSYS_NFTABLES<<8 | unix.NFT_MSG_GETSETELEM),
			Flags: netlink.Request,
		},
		Data: append([]byte{byte(b.table.Family), unix.NFNETLINK_V0, 0, 0}, attrs...),
	}
}

// RecordsFlows reports whether p's admitted flows are recorded in
// flowed6 (FlowedAddrs): an IPv6 pinhole of cutKinds (not a redirect,
// whose flows natcut re-checks and guard6 accepts as DNAT-ed), the label
// layout cutting them, the record trusted. Cheap and lock-free.
func (b *Backend) RecordsFlows(p Pinhole) bool {
	if !b.flowed.recorded.Load() || !b.cutting.Load() {
		return false
	}
	n, err := p.normalize()
	if err != nil {
		return false
	}
	return slices.Contains(cutKinds[:], kindOf(n))
}

// ForgetFlowed deletes addrs from flowed6, in one transaction, for a
// server whose conntrack walk ended every flow to them that no live lease
// admits, and in which no lease holds them any longer (Server.pruneFlowed
// argues the races). Without it the set never shrank: once 65 536
// distinct addresses had had a flow (IPv6 temporary addresses rotate
// daily, RFC 8981) the adds failed, the counter rose and every walk ran
// again for the table's life (review h/revflow, finding 4;
// TestE2EFlowedPrunedAfterWalk). It deletes nothing while the record is
// not trusted (untrusted, owed its conntrack read, not cutting, a fake
// connection): then FlowedAddrs says nothing anyway. Deleted in
// transactions of at most flowedTxn addresses, each all or none: false
// when none went through (the set keeps them, the safe side); true when
// some did, the others kept (the caller adds back what a lease or filter
// holds meanwhile whether or not it was deleted: Reflowed is idempotent).
func (b *Backend) ForgetFlowed(addrs []netip.Addr) bool {
	n, err := b.flowedElems(addrs, false)
	return err == nil || n > 0
}

// Reflowed adds addrs back to flowed6 (a lease, or a filter, at them came
// between ForgetFlowed's decision and its delete): a flow admitted to
// them meanwhile is recorded again. Sent whatever the trust (an add is
// the safe side). A failure makes the record untrusted (noteUnrecorded,
// the counter written at 1), as a failed add in the ruleset does.
func (b *Backend) Reflowed(addrs []netip.Addr) {
	if _, err := b.flowedElems(addrs, true); err != nil && !errors.Is(err, errNotTrusted) {
		b.mu.Lock()
		b.noteUnrecorded()
		if b.recordsFlows() {
			b.writeUnrecorded()
		}
		b.mu.Unlock()
	}
}

var errNotTrusted = errors.New("pinhole: flowed6 not trusted")

// flowedElems adds (add) or deletes addrs in flowed6 on FlowedAddrs'
// kept connection, in transactions of at most flowedTxn addresses
// (messages of at most elemChunk), and returns how many addresses the
// transactions that went through held; errNotTrusted when there is no
// record (attached, no labels, a fake connection) or, for a delete, it
// is not trusted now (nothing sent). An add stops at its first failure,
// a delete goes on past one (what it deletes is the safe side kept).
// Before (review h/revrem, TestForgetFlowedMany), one message: past
// ≈ 2 340 addresses its element list's 16-bit length wrapped and the
// kernel took only the start (ForgetFlowed of 3 000 deleted 659 and
// reported success; Reflowed left addresses of leases out of the
// record), past ≈ 7 400 the transaction outgrew the socket's send buffer
// (ForgetFlowed of 10 000 failed whole, Reflowed's failure untrusted the
// record for good).
func (b *Backend) flowedElems(addrs []netip.Addr, add bool) (int, error) {
	f := &b.flowed
	untrusted := func() bool { return !add && (!f.recorded.Load() || f.verify.Load() || !b.cutting.Load()) }
	if untrusted() {
		return 0, errNotTrusted // not waiting for a RegainFlowed (which holds f.mu) to say so
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if b.flowed6 == nil || b.cfg.Attached || b.conn.TestDial != nil || untrusted() {
		return 0, errNotTrusted
	}
	return b.flowedElemsLocked(addrs, add)
}

// flowedElemsLocked is flowedElems' writes, whatever the trust (also
// RegainFlowed's). Caller holds b.flowed.mu.
func (b *Backend) flowedElemsLocked(addrs []netip.Addr, add bool) (int, error) {
	f := &b.flowed
	es := make([]nftables.SetElement, 0, len(addrs))
	for _, a := range addrs {
		if a.Is6() && !a.Is4In6() && a.Zone() == "" {
			k := a.As16()
			es = append(es, nftables.SetElement{Key: k[:]})
		}
	}
	op := (*nftables.Conn).SetDeleteElements
	if add {
		op = (*nftables.Conn).SetAddElements
	}
	done := 0
	var first error
	for len(es) > 0 {
		txn := es[:min(len(es), flowedTxn)]
		es = es[len(txn):]
		c, err := f.conn.get(b.netns)
		if err == nil {
			for m := txn; len(m) > 0 && err == nil; m = m[min(len(m), elemChunk):] {
				err = op(c, b.flowed6, m[:min(len(m), elemChunk)])
			}
		}
		if err == nil {
			err = c.Flush()
		}
		if err == nil {
			done += len(txn)
			continue
		}
		f.conn.close()
		first = cmp.Or(first, err)
		if add {
			break
		}
	}
	return done, first
}

// flowedTxn bounds the addresses of one transaction of flowedElems:
// 16 messages of elemChunk (≈ 115 KiB) fit the netlink socket's default
// send buffer (208 KiB; the whole transaction is one sendmsg).
const flowedTxn = 16 * elemChunk
