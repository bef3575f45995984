package server

import (
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/store"
)

// tx collects the state changes of one batch of requests: the lease table
// is changed at once (later requests of the batch see earlier ones), the
// kernel and the store only at commit, together: one Firewall.Apply and one
// Store.Commit for the whole batch (group commit). If either fails, the
// table is rolled back and the kernel restored, so an error changes nothing
// (HDR-06, choice (g)).
type tx struct {
	s    *Server
	now  time.Time
	ops  []pinhole.Op
	inv  []pinhole.Op // undo for ops, applied in reverse if the store fails
	fin  map[store.Key]*store.Lease
	undo []undoRec
	qund []quarUndo
	// retry: the request is handled again alone after its batch failed.
	retry bool
	// ended are leases removed on purpose (delete, revocation): their
	// connections are flushed after the commit.
	ended []store.Lease
}

type undoRec struct {
	key  store.Key
	prev *store.Lease
}

type quarUndo struct {
	e    endpoint
	prev quarantine
	had  bool
}

func (s *Server) begin(now time.Time) *tx {
	return &tx{s: s, now: now, fin: map[store.Key]*store.Lease{}}
}

// mark is a position in the undo log: a request changed state iff the mark
// moved while it was handled.
func (t *tx) mark() int { return len(t.undo) }

func (t *tx) empty() bool { return len(t.undo) == 0 }

// set moves the lease at key from its current state to next (nil: deleted).
// The kernel always follows, expiry included: its element normally lapsed
// at the same moment, but one restored with a longer timeout (a restart
// with the clock behind) or re-added must not outlive the lease (LIFE-04);
// deleting an absent element is a no-op. ended says the lease ends on
// purpose (delete, revocation), so its connections are flushed too.
func (t *tx) set(key store.Key, next *store.Lease, ended bool) {
	prev, _ := t.s.tab.get(key)
	var prevCopy *store.Lease
	if prev != nil {
		c := *prev
		prevCopy = &c
	}
	t.diff(key, prevCopy, next)
	t.undo = append(t.undo, undoRec{key: key, prev: prevCopy})
	if next == nil {
		t.s.tab.del(key)
		if prevCopy != nil {
			t.freed(prevCopy)
			if ended {
				t.ended = append(t.ended, *prevCopy)
			}
		}
		t.fin[key] = nil
	} else {
		c := *next
		t.s.tab.put(c)
		t.fin[key] = &c
	}
}

// freed quarantines an IPv4 external port that no lease holds any more
// (MAP-22): for the protocol's idle time only the same client may reclaim it.
func (t *tx) freed(l *store.Lease) {
	if !l.ExternalAddr.Is4() {
		return
	}
	e := endpointOf(l)
	if _, held := t.s.tab.holder(e); held {
		return
	}
	idle := 2 * time.Minute
	if l.Protocol == protoTCP {
		idle = 124 * time.Minute
	}
	prev, had := t.s.quar[e]
	t.qund = append(t.qund, quarUndo{e: e, prev: prev, had: had})
	t.s.quar[e] = quarantine{addr: l.InternalAddr, port: l.InternalPort, nonce: l.Nonce, until: t.now.Add(idle)}
}

// diff queues the kernel operations that turn prev's pinholes into next's
// (both the lease at key). Leases on one internal tuple can share a kernel
// element (a PEER to R:p and a MAP with FILTER R/128:p): an element stays
// while any live lease holds it, with the latest expiry among them, so
// ending or shortening one lease never cuts another's pinhole.
func (t *tx) diff(key store.Key, prev, next *store.Lease) {
	var old, neu []pinhole.Pinhole
	if prev != nil {
		old = pinholesOf(prev)
	}
	if next != nil {
		neu = pinholesOf(next)
	}
	if len(old) == 0 && len(neu) == 0 {
		return
	}
	var others []*store.Lease
	for _, l := range t.s.tab.onTuple(tupleOf(key)) {
		if l.Key != key && l.Expires.After(t.now) {
			others = append(others, l)
		}
	}
	// held returns the latest expiry of another live lease holding p.
	held := func(p pinhole.Pinhole) (time.Time, bool) {
		var at time.Time
		ok := false
		for _, l := range others {
			if l.Expires.After(at) && slices.Contains(pinholesOf(l), p) {
				at, ok = l.Expires, true
			}
		}
		return at, ok
	}
	later := func(a time.Time, l *store.Lease) time.Time {
		if l.Expires.After(a) {
			return l.Expires
		}
		return a
	}
	left := func(at time.Time) time.Duration { return max(at.Sub(t.now), time.Millisecond) }
	for _, p := range old {
		if slices.Contains(neu, p) {
			continue
		}
		at, ok := held(p)
		before := later(at, prev)
		switch {
		case !ok:
			t.ops = append(t.ops, pinhole.Op{Kind: pinhole.Delete, Pinhole: p})
			t.inv = append(t.inv, pinhole.Op{Kind: pinhole.Install, Pinhole: p, Timeout: left(before)})
		case !at.Equal(before):
			t.ops = append(t.ops, pinhole.Op{Kind: pinhole.Refresh, Pinhole: p, Timeout: left(at)})
			t.inv = append(t.inv, pinhole.Op{Kind: pinhole.Refresh, Pinhole: p, Timeout: left(before)})
		}
	}
	for _, p := range neu {
		at, ok := held(p)
		after := later(at, next)
		switch {
		case slices.Contains(old, p) || ok:
			before := at
			if slices.Contains(old, p) {
				before = later(at, prev)
			}
			if !after.Equal(before) {
				t.ops = append(t.ops, pinhole.Op{Kind: pinhole.Refresh, Pinhole: p, Timeout: left(after)})
				t.inv = append(t.inv, pinhole.Op{Kind: pinhole.Refresh, Pinhole: p, Timeout: left(before)})
			}
		default:
			t.ops = append(t.ops, pinhole.Op{Kind: pinhole.Install, Pinhole: p, Timeout: left(after)})
			t.inv = append(t.inv, pinhole.Op{Kind: pinhole.Delete, Pinhole: p})
		}
	}
}

// rollback restores the table and quarantine to the state before the tx.
func (t *tx) rollback() {
	for i := len(t.undo) - 1; i >= 0; i-- {
		u := t.undo[i]
		if u.prev == nil {
			t.s.tab.del(u.key)
		} else {
			t.s.tab.put(*u.prev)
		}
	}
	for i := len(t.qund) - 1; i >= 0; i-- {
		q := t.qund[i]
		if q.had {
			t.s.quar[q.e] = q.prev
		} else {
			delete(t.s.quar, q.e)
		}
	}
	t.undo, t.qund, t.ops, t.inv, t.ended = nil, nil, nil, nil, nil
	clear(t.fin)
}

// commit makes the tx durable: kernel first, then the store. A crash
// between the two leaves a pinhole without a lease or a lease without its
// new timeout, both repaired by the reconcile at the next start; a SUCCESS
// is only ever sent after both.
func (t *tx) commit() error {
	if len(t.undo) == 0 {
		return nil
	}
	var put []store.Lease
	var del []store.Key
	for k, l := range t.fin {
		if l == nil {
			del = append(del, k)
		} else {
			put = append(put, *l)
		}
	}
	start := time.Now()
	if err := t.s.applyAtomic(t.ops, t.inv); err != nil {
		t.s.m.kernelErrors.Inc()
		return fmt.Errorf("server: kernel: %w", err)
	}
	kdone := time.Now()
	if err := t.s.st.Commit(put, del); err != nil {
		t.s.m.storeErrors.Inc()
		if err := t.s.applyAll(reversed(t.inv)); err != nil {
			t.s.log.Error("cannot undo kernel changes after a store failure; the next reconcile repairs them", zapErr(err))
		}
		return fmt.Errorf("server: store: %w", err)
	}
	t.s.flushConntrack(t.ended)
	t.s.m.kernelSeconds.Observe(kdone.Sub(start).Seconds())
	t.s.m.storeSeconds.Observe(time.Since(kdone).Seconds())
	return nil
}

const (
	protoTCP = 6
	protoUDP = 17
)

// pinholesOf translates a lease into kernel pinholes: one per FILTER (or
// one for any remote without filters), one for a PEER's remote peer.
func pinholesOf(l *store.Lease) []pinhole.Pinhole {
	base := pinhole.Pinhole{
		Protocol:     l.Protocol,
		InternalAddr: l.InternalAddr,
		InternalPort: l.InternalPort,
		ExternalAddr: l.ExternalAddr,
		ExternalPort: l.ExternalPort,
	}
	if l.Kind == store.KindPeer {
		r := l.Remote.Addr().Unmap()
		base.RemotePrefix = netip.PrefixFrom(r, r.BitLen())
		base.RemotePort = l.Remote.Port()
		return []pinhole.Pinhole{base}
	}
	if len(l.Filters) == 0 {
		return []pinhole.Pinhole{base}
	}
	out := make([]pinhole.Pinhole, 0, len(l.Filters))
	for _, f := range l.Filters {
		p := base
		p.RemotePrefix = f.Prefix.Masked()
		p.RemotePort = f.Port
		if !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out
}

// applyAtomic applies ops as one kernel transaction when they fit in one
// (the engine keeps batches that small); larger ones go as several, and if
// a later one fails the earlier ones are undone with inv (inv[i] undoes
// ops[i]).
func (s *Server) applyAtomic(ops, inv []pinhole.Op) error {
	for i := 0; i < len(ops); i += pinhole.MaxBatch {
		j := min(i+pinhole.MaxBatch, len(ops))
		if err := s.fw.Apply(ops[i:j]); err != nil {
			if i > 0 {
				if uerr := s.applyAll(reversed(inv[:i])); uerr != nil {
					s.log.Error("cannot undo a partly applied change; the tamper check repairs it", zapErr(uerr))
				}
			}
			return err
		}
	}
	return nil
}

// applyAll applies ops in transactions of at most pinhole.MaxBatch, for
// repairs that need no rollback; it goes on after a failed chunk and
// returns the first error.
func (s *Server) applyAll(ops []pinhole.Op) error {
	var first error
	for i := 0; i < len(ops); i += pinhole.MaxBatch {
		if err := s.fw.Apply(ops[i:min(i+pinhole.MaxBatch, len(ops))]); err != nil && first == nil {
			first = err
		}
	}
	return first
}

func reversed(ops []pinhole.Op) []pinhole.Op {
	out := slices.Clone(ops)
	slices.Reverse(out)
	return out
}
