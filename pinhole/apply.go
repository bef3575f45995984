package pinhole

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// MaxBatch is the most ops one Apply takes. A transaction must fit in one
// sendmsg on the netlink socket (default send buffer: 208 KiB); 256 ops of
// the largest shape (filtered mappings, about 450 bytes per op) fit with
// room to spare. Larger changes go as several transactions.
const MaxBatch = 256

// encodedOp is a validated Op with its set and element.
type encodedOp struct {
	index int // in the caller's batch
	orig  Op  // as the caller gave it, for OpError
	op    Op  // normalized
	k     kind
	elem  nftables.SetElement // without timeout
	id    string              // set and key: equal ids touch the same element
	sid   string              // the same for the SNAT companion, if any
}

func encode(op Op) (encodedOp, error) {
	v, err := op.validate()
	if err != nil {
		return encodedOp{}, err
	}
	k := kindOf(v.Pinhole)
	e := element(k, v.Pinhole)
	name := specs[k].name
	if v.Pinhole.Odd() {
		name = v.Pinhole.odd.Value().setName() // a SNAT map's element: not k's set
	}
	enc := encodedOp{orig: op, op: v, k: k, elem: e, id: name + "|" + string(e.Key) + "|" + string(e.KeyEnd)}
	if i, se, ok := snatElement(k, v.Pinhole); ok {
		// Two NAPT elements of one internal endpoint (a mapping moved to
		// another external port) share their companion's key.
		enc.sid = snatSpecs[i].name + "|" + string(se.Key) + "|" + string(se.KeyEnd)
	}
	return enc, nil
}

// Apply sends ops to the kernel in one netlink transaction: all of them
// take effect, or none. When one fails, the error is an *OpError naming it
// (found by replaying prefixes of the batch in transactions that are
// always rolled back). Ops are validated before anything is sent.
// Except: a catch-all element's Delete (an odd Pinhole of no key) goes
// first, each on a transaction of its own (deleteCatchAll); one failing,
// the error names it and nothing after is sent; the rest failing, the
// catch-alls deleted before stay deleted (a retry finds none: nothing to
// do). Only foreign elements go that way (pcpd never writes a catch-all).
//
// Install and Refresh set the entry's timeout to op.Timeout. Where the
// kernel updates elements in place (Setup's probe, probe.go), the element
// is added twice, with a nudged and then with the exact timeout, because
// the kernel keeps the old expiry when an element is re-added with an
// unchanged timeout: it ends with op.Timeout or at most refreshNudge less
// (see queuePhase). Elsewhere it is added, deleted and added again, which
// re-creates it with exactly op.Timeout. Delete first adds the element, then removes it, so an entry the kernel
// already expired does not fail the batch. Both work whatever the kernel
// holds, so retrying a batch is always safe.
func (b *Backend) Apply(ops []Op) (err error) {
	if len(ops) > MaxBatch {
		return fmt.Errorf("pinhole: batch of %d ops exceeds MaxBatch (%d): %w", len(ops), MaxBatch, ErrInvalid)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	defer b.dropUnsent(&err)
	// The encoded batch reuses the last one's slice (under mu).
	enc := b.enc[:0]
	defer func() { clear(enc); b.enc = enc[:0] }()
	for i, op := range ops {
		e, err := encode(op)
		if err != nil {
			return &OpError{Index: i, Op: op, Err: err}
		}
		e.index = i
		enc = append(enc, e)
	}
	if b.conn.TestDial == nil {
		// A catch-all element's Delete goes first, each on a transaction
		// of its own (deleteCatchAll): google/nftables cannot send it.
		// One failing, the rest is not sent (a retry deletes again: no
		// catch-all there is nothing to do).
		for _, e := range enc {
			if isCatchAll(e) {
				if err := b.deleteCatchAll(b.catchAllSet(e.op.Pinhole.odd.Value())); err != nil {
					return &OpError{Index: e.index, Op: e.orig, Err: err}
				}
			}
		}
		enc = slices.DeleteFunc(enc, isCatchAll)
	}
	for len(enc) > 0 {
		err := b.flushOps(enc)
		if err == nil {
			return nil
		}
		err = b.blame(enc, err)
		var oe *OpError
		if !errors.As(err, &oe) || oe.Index < 0 {
			return err
		}
		pos := slices.IndexFunc(enc, func(e encodedOp) bool { return e.index == oe.Index })
		if gone, cerr := b.absentDelete(enc[pos], oe.Err); cerr != nil || !gone {
			return err
		}
		// The op deletes an element that is not there: nothing to do, so
		// the rest of the batch goes without it.
		enc = slices.Delete(enc, pos, pos+1)
	}
	return nil
}

// absentDelete reports whether a Delete failed only because its element is
// absent and overlaps another element of a concatenated-range set: the
// kernel then refuses the add that precedes the delete (EEXIST), though there
// is nothing to delete. A present element with other mapping data is a
// real conflict.
func (b *Backend) absentDelete(e encodedOp, err error) (bool, error) {
	set, elem, interval := b.sets[e.k], e.elem, specs[e.k].interval
	if e.op.Pinhole.OddSNAT() {
		// An element of a SNAT map (by hand), deleted exactly.
		i := snatOf(e.k)
		set, interval = b.snat[i], snatSpecs[i].interval
	}
	if e.op.Companion {
		// Its SNAT companion alone (validate: a NAPT mapping).
		i, se, _ := snatElement(e.k, e.op.Pinhole)
		set, elem, interval = b.snat[i], se, snatSpecs[i].interval
	}
	if e.op.Kind != Delete || !interval || !errors.Is(err, unix.EEXIST) {
		return false, nil
	}
	elems, gerr := b.readConn().GetSetElements(set)
	if gerr != nil {
		b.resetConn() // a dump cut short may leave parts of it queued
		return false, gerr
	}
	for _, x := range elems {
		if bytes.Equal(x.Key, elem.Key) && bytes.Equal(x.KeyEnd, elem.KeyEnd) {
			return false, nil
		}
	}
	return true, nil
}

func (b *Backend) flushOps(enc []encodedOp) error {
	if err := b.queueOps(enc); err != nil {
		return err
	}
	return b.flush()
}

// queueOps queues enc as few netlink messages as it can. Within a phase no
// two ops touch the same element, so the phase can go as three grouped
// steps (make sure it exists; delete; add with the new timeout) without
// changing the outcome; a repeated element starts a new phase, and so does
// an op marked After (overlapping ranges: Op).
func (b *Backend) queueOps(enc []encodedOp) error {
	if b.seen == nil {
		b.seen = make(map[string]struct{}, len(enc))
	}
	seen := b.seen
	clear(seen)
	start := 0
	for i, e := range enc {
		_, dup := seen[e.id]
		if !dup && e.sid != "" {
			_, dup = seen[e.sid]
		}
		if dup || (e.op.After && i > start) {
			if err := b.queuePhase(enc[start:i]); err != nil {
				return err
			}
			clear(seen)
			start = i
		}
		seen[e.id] = struct{}{}
		if e.sid != "" {
			seen[e.sid] = struct{}{}
		}
	}
	return b.queuePhase(enc[start:])
}

// deleteGuardTimeout is the timeout of the element Delete adds just before
// removing it; it never outlives the transaction.
const deleteGuardTimeout = time.Second

// refreshNudge is how much shorter than its timeout an element is first
// added by Install and Refresh. Adding an element that exists (without
// NLM_F_EXCL) updates its timeout and restarts its countdown only when the
// timeout differs from the one it holds, compared in jiffies (Linux ≥
// 6.10, probed by Setup; verified on 6.18 by TestRefreshInPlace): of the
// two adds, at least one differs by a jiffy or more, and the later one
// that differs wins. A jiffy is at most 41.7 ms (HZ 24, the lowest any
// architecture offers; 10 ms at HZ 100, the lowest on x86 and arm64), so
// the nudge of 50 ms is more than a jiffy at every HZ. The element ends
// with op.Timeout, or, when it already held exactly that, op.Timeout less
// the nudge: never longer than asked, at most 50 ms shorter. Without the
// kernel feature (and for timeouts too short to nudge) an Install or
// Refresh is an add, a delete and an add (a new element) per entry.
const refreshNudge = 50 * time.Millisecond

// Apply's steps, each one message per set: first adds (the delete guard,
// or the nudged timeout), deletes, then adds with the exact timeout. Slots
// numKinds.. hold the SNAT companions of NAPT elements: they go through
// the same steps as the element they belong to.
const (
	stepEnsure = iota
	stepDelete
	stepAdd
	numSteps
	numSlots = int(numKinds) + numSNAT
)

func (b *Backend) queuePhase(phase []encodedOp) error {
	for st := range b.steps {
		for slot := range b.steps[st] {
			b.steps[st][slot] = b.steps[st][slot][:0]
		}
	}
	ensure, del, add := &b.steps[stepEnsure], &b.steps[stepDelete], &b.steps[stepAdd]
	queue := func(slot int, elem nftables.SetElement, op Op) {
		el := elem
		t := ceilMillis(op.Timeout)
		switch {
		case op.Kind == Delete:
			el.Timeout = deleteGuardTimeout
			ensure[slot] = append(ensure[slot], el)
			del[slot] = append(del[slot], elem)
			return
		case !b.inPlace || t <= 2*refreshNudge:
			// The kernel cannot update in place, or the timeout is too
			// short to nudge: re-create the element (it then holds exactly
			// t whatever it held).
			el.Timeout = t
			ensure[slot] = append(ensure[slot], el)
			del[slot] = append(del[slot], elem)
		default:
			el.Timeout = t - refreshNudge
			ensure[slot] = append(ensure[slot], el)
			el.Timeout = t
		}
		add[slot] = append(add[slot], el)
	}
	for _, e := range phase {
		switch {
		case e.op.Pinhole.OddSNAT():
			// An element of a SNAT map (by hand): its own slot, exactly
			// (snatElement computes no companion for it).
			queue(int(numKinds)+snatOf(e.k), e.elem, e.op)
		case !e.op.Companion:
			queue(int(e.k), e.elem, e.op)
		}
		if i, el, ok := snatElement(e.k, e.op.Pinhole); ok {
			queue(int(numKinds)+i, el, e.op)
		}
	}
	set := func(slot int) *nftables.Set {
		if slot < int(numKinds) {
			return b.sets[slot]
		}
		return b.snat[slot-int(numKinds)]
	}
	for slot := range del {
		if len(del[slot]) == 0 && len(add[slot]) > 0 {
			// Nothing to delete in this set: its two adds go as one
			// message, the nudged elements before the exact ones, in
			// the order the two messages would have had. The kernel
			// handles a message's elements one by one, as it handles
			// consecutive messages of a transaction, and each message
			// costs an acknowledgement to read (two recvmsg and a page
			// of buffer in mdlayher/netlink): a batch of new MAPs or
			// in-place refreshes in one set then needs one message, not
			// two (BENCHMARKS.md item 25).
			ensure[slot] = append(ensure[slot], add[slot]...)
			add[slot] = add[slot][:0]
		}
	}
	for st := range b.steps {
		queue := b.conn.SetAddElements
		if st == stepDelete {
			queue = b.conn.SetDeleteElements
		}
		for slot, elems := range b.steps[st] {
			// In messages of at most elemChunk elements: a merged phase of
			// MaxBatch redir6_filter ops lists 512 (75 KiB), past what the
			// element list's 16-bit length holds (backend.go, elemChunk).
			if err := b.queueElements(set(slot), queue, elems); err != nil {
				return fmt.Errorf("pinhole: encode %s: %w", set(slot).Name, err)
			}
		}
	}
	return nil
}

// ceilMillis rounds up: the kernel counts element timeouts in milliseconds
// and a sub-millisecond remainder must not turn into "no timeout".
func ceilMillis(d time.Duration) time.Duration {
	return (d + time.Millisecond - 1).Truncate(time.Millisecond)
}

// blame finds which op made the batch fail. The kernel aborts a failed
// transaction as a whole and reports each failing message, but the
// nftables library does not say which message an error belongs to. So
// prefixes of the batch are replayed, each followed by a message that always
// fails (deleting an element with a key of the wrong length), which makes
// the kernel roll the probe back: the shortest failing prefix ends at the
// culprit.
func (b *Backend) blame(enc []encodedOp, orig error) error {
	if errors.Is(orig, os.ErrPermission) || errors.Is(orig, unix.ENOBUFS) ||
		errors.Is(orig, unix.EPERM) || errors.Is(orig, unix.EMSGSIZE) ||
		errors.Is(orig, unix.ENOMEM) || errors.Is(orig, os.ErrDeadlineExceeded) ||
		errors.Is(orig, errBatchEnded) {
		// Not about any one op: the batch never reached nftables, or the
		// kernel answered for the whole batch (ENOMEM aborts it with one
		// reply, which ends flush's read: replies.go; as does any error
		// reply with none after it, errBatchEnded) or not at all
		// (replies missing at flushDeadline); replaying prefixes would
		// only meet the same.
		return &OpError{Index: -1, Err: classify(orig)}
	}
	probe := func(n int) ([]error, error) {
		if err := b.queueOps(enc[:n]); err != nil {
			return nil, err
		}
		if err := b.conn.SetDeleteElements(b.sets[kindAddr], []nftables.SetElement{{Key: []byte{0}}}); err != nil {
			return nil, err
		}
		errs := leafErrors(b.flush())
		if len(errs) == 0 {
			return nil, fmt.Errorf("pinhole: probe transaction was not rolled back: %w", ErrUnhealthy)
		}
		return errs[:len(errs)-1], nil // the last one is the sentinel's
	}
	// The shortest failing prefix has length in [lo, hi]; culprit holds the
	// errors of the prefix of length hi.
	lo, hi := 1, len(enc)
	culprit, err := probe(hi)
	if err != nil {
		return &OpError{Index: -1, Err: errors.Join(classify(orig), err)}
	}
	if len(culprit) == 0 {
		// The kernel's state changed between the attempt and the probe
		// (an element expired): the batch may go through now.
		if err := b.flushOps(enc); err != nil {
			return &OpError{Index: -1, Err: classify(err)}
		}
		return nil
	}
	for lo < hi {
		mid := (lo + hi) / 2
		errs, err := probe(mid)
		if err != nil {
			return &OpError{Index: -1, Err: errors.Join(classify(orig), err)}
		}
		if len(errs) > 0 {
			hi, culprit = mid, errs
		} else {
			lo = mid + 1
		}
	}
	e := enc[hi-1]
	return &OpError{Index: e.index, Op: e.orig, Err: classify(culprit[0])}
}

// leafErrors lists the per-message errors of a failed Flush (which joins
// them), or the error itself when it is not a joined one.
func leafErrors(err error) []error {
	if err == nil {
		return nil
	}
	for e := err; e != nil; e = errors.Unwrap(e) {
		if m, ok := e.(interface{ Unwrap() []error }); ok {
			return m.Unwrap()
		}
	}
	return []error{err}
}

// List returns every entry in pcpd's sets, with the time the kernel will
// keep it. After a restart the daemon compares this with its leases. An
// element pcpd never writes (by hand) is an odd Pinhole (Pinhole.Odd):
// equal to no lease's, its Delete removes exactly that element. The SNAT
// maps are read too: their companions of NAPT mappings are not returned
// (the mapping is, from its map element), their other elements are, as
// odd Pinholes (Pinhole.OddSNAT: a catch-all, a port range, a mapping to
// 0.0.0.0:0, by hand; a companion of no mapping read:
// Pinhole.SNATCompanionOf), so that the audit deletes them. Before
// (h/oddsnat), no SNAT map was read: such an element, added while the
// watch was off or deaf or whose undo failed, sent a client's new
// outbound flows from wherever it said, for ever.
//
// The dump is slow for large sets (the kernel restarts its hash walk for
// every dump message: ~2-7 s for 100 000 entries, growing quadratically),
// so it runs on a netlink socket of its own and does not hold the Backend's
// lock: Apply goes on meanwhile. A dump that overlaps changes may miss or
// repeat entries changed during it; callers compare with care.
//
// That socket is kept from call to call (listConn), and dialled again
// after an error. A transient connection, as before, dialled and closed
// a socket per set, 8 a call, and each close waits for the namespace's
// nftables commit lock and an RCU grace period, holding Apply's
// transactions meanwhile (BENCHMARKS.md item 42). A List that overlaps
// another uses a socket of its own for its call.
func (b *Backend) List() ([]Entry, error) {
	return b.ListContext(context.Background())
}

// ListContext is List, given up when ctx ends: the dump's socket gets a
// read deadline in the past, so its next read (one per dump message of
// the kernel's, milliseconds each at 100 000 elements) fails, and the
// socket, left mid-dump, is closed; ctx's error is returned, never a part
// of the dump. Before (h/auditend), the audit's List could not be
// stopped: pcpd's shutdown (SIGTERM, systemctl stop) waited out the rest
// of a dump, 4.9-6.2 s of 4.5-10 s at 100 000 IPv4 mappings and growing
// faster than linearly (BENCHMARKS.md item 77). A read deadline is what
// the socket's runtime poller checks before every read and wakes a
// blocked one for (mdlayher/socket's rwT through os's RawConn; netlink's
// Close would too, but the kept socket is closed by its user only).
func (b *Backend) ListContext(ctx context.Context) ([]Entry, error) {
	b.mu.Lock()
	var sets listedSets
	for k := range numKinds {
		sets.pin[k] = *b.sets[k]
	}
	for i := range numSNAT {
		sets.snat[i] = *b.snat[i]
	}
	if b.conn.TestDial != nil {
		// A fake-dialled test connection, used as it is, under the lock.
		defer b.mu.Unlock()
		return listSets(b.conn, &sets)
	}
	b.mu.Unlock()
	if !b.listMu.TryLock() {
		c, nl, err := dialSide(b.netns)
		if err != nil {
			return nil, fmt.Errorf("pinhole: list: %w", err)
		}
		defer c.CloseLasting()
		return listUntil(ctx, c, nl, &sets)
	}
	defer b.listMu.Unlock()
	c, err := b.listConn.get(b.netns)
	if err != nil {
		return nil, fmt.Errorf("pinhole: list: %w", err)
	}
	out, err := listUntil(ctx, c, b.listConn.nl, &sets)
	if err != nil {
		b.listConn.close()
	}
	return out, err
}

// listSetHook, if set, is called by listSets before it reads each
// pinhole set (tests only: ListSetHookForTest).
var listSetHook func(kind int)

// listCutHook, if set, is called once listUntil has set the deadline
// that cuts a dump (tests only: ListCutHookForTest).
var listCutHook func()

// listUntil is listSets through conn (whose socket is nl) until ctx
// ends: then ctx's error (ListContext).
func listUntil(ctx context.Context, conn *nftables.Conn, nl *netlink.Conn, sets *listedSets) ([]Entry, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("pinhole: list: %w", err)
	}
	cut := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(cut)
		_ = nl.SetReadDeadline(time.Unix(1, 0))
		if listCutHook != nil {
			listCutHook()
		}
	})
	out, err := listSets(conn, sets)
	if !stop() {
		// ctx ended: the deadline is set or being set. Waited for, so
		// that nothing of the dump outlives the call (the caller closes
		// the socket next). Before (h/auditlife), the goroutine setting
		// it could still run after the return
		// (TestListContextWaitsForCut). Whatever listSets read is
		// dropped.
		<-cut
		return nil, fmt.Errorf("pinhole: list: %w", ctx.Err())
	}
	return out, err
}

// listedSets are the sets List reads (copies, read outside b.mu).
type listedSets struct {
	pin  [numKinds]nftables.Set
	snat [numSNAT]nftables.Set
}

// listSets is List's reading of sets through conn.
func listSets(conn *nftables.Conn, sets *listedSets) ([]Entry, error) {
	var out []Entry
	// The NAPT mappings read from their maps (true: their companion
	// read): a companion of one is not returned, one of none is (odd); a
	// mapping whose companion is not read is NoCompanion.
	mapped := make(map[naptID]bool)
	companions := make(map[naptID]time.Duration) // their remaining time
	for k := range numKinds {
		if listSetHook != nil {
			listSetHook(int(k))
		}
		elems, err := conn.GetSetElements(&sets.pin[k])
		if err != nil {
			return nil, fmt.Errorf("pinhole: read set %s: %w", sets.pin[k].Name, classify(err))
		}
		for _, e := range elems {
			if isSentinel(k, e) || isProbe(k, e) {
				continue
			}
			p, err := decode(k, e)
			if err != nil {
				return nil, fmt.Errorf("pinhole: set %s holds an element pcpd did not write: %w", sets.pin[k].Name, err)
			}
			out = append(out, Entry{Pinhole: p, Remaining: e.Expires})
			if (k == kindNAPT4 || k == kindNAPT4Filter) && !p.Odd() {
				mapped[naptIDOf(p)] = false // its companion not read yet
			}
		}
	}
	for i := range numSNAT {
		elems, err := conn.GetSetElements(&sets.snat[i])
		if err != nil {
			return nil, fmt.Errorf("pinhole: read map %s: %w", sets.snat[i].Name, classify(err))
		}
		for _, e := range elems {
			if isSNATSentinel(i, e) {
				continue
			}
			p, ok := decodeSNAT(i, e)
			if !ok {
				return nil, fmt.Errorf("pinhole: map %s holds an element pcpd did not write: short element: %w", sets.snat[i].Name, ErrInvalid)
			}
			if !p.Odd() {
				id := naptIDOf(p)
				if _, ok := mapped[id]; ok {
					mapped[id] = true
					left := e.Expires
					if e.Timeout == 0 && left == 0 {
						left = NoTimeout
					}
					companions[id] = left
					continue // the companion of a mapping read
				}
				// A companion of no mapping read (by hand; or its map
				// element deleted by hand): odd, so that the audit
				// deletes it unless a live lease holds the mapping
				// (SNATCompanionOf).
				p = snatOdd(i, e, p)
			}
			out = append(out, Entry{Pinhole: p, Remaining: e.Expires})
		}
	}
	for i := range out {
		if p := out[i].Pinhole; !p.Odd() && p.InternalAddr.Is4() {
			id := naptIDOf(p)
			out[i].NoCompanion = !mapped[id]
			out[i].CompanionRemaining = companions[id]
		}
	}
	return out, nil
}
