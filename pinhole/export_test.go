package pinhole

import (
	"errors"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
)

// CmpOdd lets cmp compare Pinholes (their odd element).
var CmpOdd = cmpOdd

// SetUpdatesInPlace overrides what Setup's probe found, so a test on a
// kernel with in-place updates can exercise the add, delete, add sequence
// older kernels need.
func SetUpdatesInPlace(b *Backend, v bool) {
	b.mu.Lock()
	b.inPlace = v
	b.mu.Unlock()
}

// BreakProtectedSet points the Backend's protected set of family (4 or 6)
// at a set the kernel does not have, so that writing it fails, until
// restore is called.
func BreakProtectedSet(b *Backend, family int) (restore func()) {
	b.mu.Lock()
	defer b.mu.Unlock()
	p := &b.protected6
	if family == 4 {
		p = &b.protected4
	}
	s := *p
	broken := *s
	broken.Name += "-missing"
	*p = &broken
	return func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		*p = s
	}
}

// FailProtectedWrites makes every transaction writing protected set name
// fail unwritten (after the first skip ones), until restore is called.
func FailProtectedWrites(b *Backend, name string, skip int) (restore func()) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.protectedFault = func(set string) error {
		if set != name {
			return nil
		}
		if skip > 0 {
			skip--
			return nil
		}
		return ErrInjected
	}
	return func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		b.protectedFault = nil
	}
}

// ErrInjected is what FailProtectedWrites' failures wrap.
var ErrInjected = errors.New("pinhole: injected failure")

// ListAsWritten makes the Backend expect the kernel to list the owner
// chains' expressions exactly as written (no register renumbering), as a
// kernel or nftables library that lists them otherwise than this one
// would look to it, until restore is called.
func ListAsWritten() (restore func()) {
	listedForm = func(e expr.Any) expr.Any { return e }
	return func() { listedForm = asListed }
}

// RouteDumps is how many dumps of the policy rules and routes r (from
// NetlinkRoutes or NetlinkRoutesAt) has taken.
func RouteDumps(r any) uint64 {
	n := r.(*netlinkRoutes)
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.dumps
}

// UnwatchedRoutes is NetlinkRoutes' lookups through h, with no watch: every
// FollowRoutes asks (the tests that change routes and follow at once, not
// waiting for a notification).
func UnwatchedRoutes(h *netlink.Handle) Routes { return &netlinkRoutes{h: h} }

// CheckRulesReplacedMidway runs Healthy's check under the lock with its
// expression counts dumped before tamper runs and its rules read after
// (review8 L3: a rule replaced between Healthy's two dumps).
func CheckRulesReplacedMidway(b *Backend, tamper func()) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	w := b.healthWantLocked()
	v := kview{conn: b.conn, table: &w.table, raw: &b.raw}
	counts, err := v.raw.exprCounts(b.conn.NetNS, v.table, "")
	if err != nil {
		return err
	}
	v.counts = counts
	tamper()
	_, err = w.check(v)
	return err
}

// RefreshNudge is how much shorter than asked an element refreshed in
// place may end up (refreshNudge).
const RefreshNudge = refreshNudge

// SetReplyBuffer sets the receive buffer Backends dial their connections
// with from now on (the kernel doubles it), until restore is called; tests
// using it must not run in parallel.
func SetReplyBuffer(n int) (restore func()) {
	old := replyBuffer
	replyBuffer = n
	return func() { replyBuffer = old }
}

// QueueOversizedSet makes the Backend's next flush queue, before sending,
// a NEWSET of a set of 0xfffffff0 elements (the kernel fails it with
// ENOMEM: nfnetlink then answers the whole batch with that one error and
// aborts it) followed by a harmless re-add of the table, so that the
// failing message sits in the middle of the batch (h/nftdeadline).
func QueueOversizedSet(b *Backend) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.flushHook = func(c *nftables.Conn) {
		b.flushHook = nil
		_ = c.AddSet(&nftables.Set{Table: b.table, Name: "nftdeadline_oversized", KeyType: nftables.TypeIPAddr,
			Size: 0xfffffff0}, nil)
		c.AddTable(b.table)
	}
}

// ConnOf is the connection the Backend writes over now (resetConn
// replaces it).
func ConnOf(b *Backend) *nftables.Conn {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.conn
}

// SetFlushDeadline sets flush's read deadline until restore is called;
// tests using it must not run in parallel.
func SetFlushDeadline(d time.Duration) (restore func()) {
	old := flushDeadline
	flushDeadline = d
	return func() { flushDeadline = old }
}

// QueueOversizedSentinelSet makes the next sentinel check (Healthy) queue
// QueueOversizedSet's ENOMEM NEWSET and table re-add into its transaction
// (review h/revdeadline); restore undoes it. Not for parallel tests.
func QueueOversizedSentinelSet(b *Backend) (restore func()) {
	b.mu.Lock()
	table := b.table
	b.mu.Unlock()
	sentinelHook = func(c *nftables.Conn) {
		sentinelHook = nil
		_ = c.AddSet(&nftables.Set{Table: table, Name: "nftdeadline_oversized", KeyType: nftables.TypeIPAddr,
			Size: 0xfffffff0}, nil)
		c.AddTable(table)
	}
	return func() { sentinelHook = nil }
}

// QueueCommitFailure makes the Backend's next flush queue, before sending,
// an anonymous set no rule binds: every message of the batch passes, and
// the kernel's commit then refuses the batch (nf_tables_commit: "ruleset
// with unbound set", EINVAL), so nfnetlink answers with that error for the
// batch and an acknowledgement per message: one reply more than messages
// sent (h/nftenomem).
func QueueCommitFailure(b *Backend) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.flushHook = func(c *nftables.Conn) {
		b.flushHook = nil
		_ = c.AddSet(&nftables.Set{Table: b.table, Name: "__set%d", ID: 4711, Anonymous: true, Constant: true,
			KeyType: nftables.TypeIPAddr}, nil)
	}
}

// CutReads makes every read on the Backend's connection fail at once (a
// read deadline in the past), its request sent and the kernel's reply
// queued unread, as a read error after the send leaves it (a dump cut
// short: ENOBUFS when the kernel cannot allocate its next part); restore
// clears the deadline on that socket (h/nftenomem).
func CutReads(b *Backend) (restore func()) {
	b.mu.Lock()
	defer b.mu.Unlock()
	nl := b.nl
	_ = nl.SetReadDeadline(time.Unix(1, 0))
	return func() { _ = nl.SetReadDeadline(time.Time{}) }
}

// RefuseNATCut makes natcut's rules ones every kernel refuses (EINVAL),
// as kernels before 6.5 refuse its map lookups.
func RefuseNATCut(b *Backend) {
	b.mu.Lock()
	b.refuseNATCut = true
	b.mu.Unlock()
}

// RefuseLabels makes the Backend's next Setup write label rules the
// kernel refuses (EOPNOTSUPP), as a kernel without conntrack labels does.
func RefuseLabels(b *Backend) {
	b.mu.Lock()
	b.refuseLabels = true
	b.mu.Unlock()
}

// CountReads counts the reads (readConn: one per view) on the Backend's
// connection from now on (h/revenomem).
func CountReads(b *Backend) (count func() int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	b.readHook = func() { n++ }
	return func() int {
		b.mu.Lock()
		defer b.mu.Unlock()
		b.readHook = nil
		return n
	}
}

// CutReadAt makes the k-th read (readConn, counted from now) on the
// Backend's connection and every one after it fail at once, as CutReads
// does; restore clears the deadline and the hook (h/revenomem).
func CutReadAt(b *Backend, k int) (restore func()) {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	b.readHook = func() {
		if n++; n >= k {
			_ = b.nl.SetReadDeadline(time.Unix(1, 0))
		}
	}
	return func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		b.readHook = nil
		if b.nl != nil {
			_ = b.nl.SetReadDeadline(time.Time{})
		}
	}
}

// CountSent records how many messages each batch read through flushConn
// sent (h/revenomem); restore unsets it.
func CountSent() (last func() int, restore func()) {
	n := 0
	sentHook = func(m int) { n = m }
	return func() int { return n }, func() { sentHook = nil }
}
