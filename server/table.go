package server

import (
	"container/heap"
	"net/netip"
	"slices"
	"time"

	"github.com/pcpd/pcpd/store"
)

// tuple is a mapping's internal side. One tuple has one external endpoint
// (endpoint-independent mapping): a MAP and the PEERs on one tuple share it
// (MAP-08).
type tuple struct {
	proto uint8
	addr  netip.Addr
	port  uint16
}

// endpoint is an external address, protocol and port.
type endpoint struct {
	addr  netip.Addr
	proto uint8
	port  uint16
}

// hold records which internal address and port an external endpoint leads
// to, and how many leases share it.
type hold struct {
	addr netip.Addr
	port uint16
	n    int
}

// table is the in-memory lease table. It is owned by the engine loop (under
// Server.mu) and indexed every way a request needs: by key, by owner (for
// quotas), by internal tuple, by external endpoint (allocation, PMP-06), and
// by expiry.
//
// Memory matters (1 000 000 leases in a few hundred MB): each lease is one
// allocation, held by pointer from every index; the tuple index holds a
// small slice (a tuple nearly always has one lease; a map per tuple cost
// ~650 bytes), the expiry heap a pointer and a Unix time (16 bytes, was
// the whole key and a time.Time: 104), and owner IDs are interned (one
// string per owner, not per lease).
type table struct {
	byKey   map[store.Key]*store.Lease
	byOwner map[string]int
	names   map[string]string // owner ID interning
	byTuple map[tuple][]*store.Lease
	byExt   map[endpoint]*hold
	exp     expHeap
}

func newTable() *table {
	return &table{
		byKey:   map[store.Key]*store.Lease{},
		byOwner: map[string]int{},
		names:   map[string]string{},
		byTuple: map[tuple][]*store.Lease{},
		byExt:   map[endpoint]*hold{},
	}
}

// grow sizes an empty table's indexes for n leases (restart): growing a
// map of a million entries step by step rehashes it ~20 times.
func (t *table) grow(n int) {
	if t.len() > 0 || n == 0 {
		return
	}
	t.byKey = make(map[store.Key]*store.Lease, n)
	t.byTuple = make(map[tuple][]*store.Lease, n)
	t.byExt = make(map[endpoint]*hold, n)
	t.exp = make(expHeap, 0, n)
}

func tupleOf(k store.Key) tuple {
	return tuple{proto: k.Protocol, addr: k.InternalAddr, port: k.InternalPort}
}

func endpointOf(l *store.Lease) endpoint {
	return endpoint{addr: l.ExternalAddr, proto: l.Protocol, port: l.ExternalPort}
}

func (t *table) len() int { return len(t.byKey) }

func (t *table) get(k store.Key) (*store.Lease, bool) {
	l, ok := t.byKey[k]
	return l, ok
}

// put inserts or replaces a lease. The table keeps its own copy.
func (t *table) put(l store.Lease) {
	if _, ok := t.byKey[l.Key]; ok {
		t.del(l.Key)
	}
	c := l
	t.insert(&c)
}

// insert indexes c, which the table then owns.
func (t *table) insert(c *store.Lease) {
	if n, ok := t.names[c.Owner]; ok {
		c.Owner = n
	} else {
		t.names[c.Owner] = c.Owner
	}
	t.byKey[c.Key] = c
	t.byOwner[c.Owner]++
	tp := tupleOf(c.Key)
	t.byTuple[tp] = append(t.byTuple[tp], c)
	e := endpointOf(c)
	h := t.byExt[e]
	if h == nil {
		h = &hold{addr: c.InternalAddr, port: c.InternalPort}
		t.byExt[e] = h
	}
	h.n++
	heap.Push(&t.exp, expItem{at: c.Expires.UnixNano(), l: c})
}

// putAll inserts leases (a restart) and keeps them where they are: the
// table points into ls instead of copying each lease into an allocation
// of its own (a million 288-byte allocations at a 1 000 000-lease start).
// ls must not be used by the caller afterwards. Slots of leases that end
// later stay allocated until the whole slice is unreferenced.
func (t *table) putAll(ls []store.Lease) {
	for i := range ls {
		if _, ok := t.byKey[ls[i].Key]; ok {
			t.del(ls[i].Key)
		}
		t.insert(&ls[i])
	}
}

// del removes a lease; it reports whether there was one.
func (t *table) del(k store.Key) bool {
	l, ok := t.byKey[k]
	if !ok {
		return false
	}
	delete(t.byKey, k)
	if t.byOwner[k.Owner]--; t.byOwner[k.Owner] <= 0 {
		delete(t.byOwner, k.Owner)
		delete(t.names, k.Owner)
	}
	tp := tupleOf(k)
	if ls := t.byTuple[tp]; ls != nil {
		if i := slices.Index(ls, l); i >= 0 {
			ls = slices.Delete(ls, i, i+1)
		}
		if len(ls) == 0 {
			delete(t.byTuple, tp)
		} else {
			t.byTuple[tp] = ls
		}
	}
	e := endpointOf(l)
	if h := t.byExt[e]; h != nil {
		if h.n--; h.n <= 0 {
			delete(t.byExt, e)
		}
	}
	// The heap entry is left behind and skipped when it surfaces.
	return true
}

// onTuple returns the leases on an internal tuple.
func (t *table) onTuple(tp tuple) []*store.Lease {
	return slices.Clone(t.byTuple[tp])
}

// holder tells who holds an external endpoint.
func (t *table) holder(e endpoint) (*hold, bool) {
	h, ok := t.byExt[e]
	return h, ok
}

// live reports whether heap entry it still stands for its lease: the lease
// is in the table (not replaced by a newer copy) with that expiry.
func (t *table) live(it expItem) bool {
	cur, ok := t.byKey[it.l.Key]
	return ok && cur == it.l && cur.Expires.UnixNano() == it.at
}

// expired pops every lease whose expiry is at or before now.
func (t *table) expired(now time.Time) []store.Key {
	var out []store.Key
	for t.exp.Len() > 0 {
		it := t.exp[0]
		if it.at > now.UnixNano() {
			break
		}
		heap.Pop(&t.exp)
		if t.live(it) && !it.l.Expires.After(now) {
			out = append(out, it.l.Key)
		}
	}
	// Stale heap entries of renewed or deleted leases would otherwise pile
	// up (and keep those old copies alive); rebuild when they outnumber
	// half the live leases.
	if t.exp.Len() > len(t.byKey)+len(t.byKey)/2+64 {
		t.exp = t.exp[:0]
		for _, l := range t.byKey {
			t.exp = append(t.exp, expItem{at: l.Expires.UnixNano(), l: l})
		}
		heap.Init(&t.exp)
		t.exp = slices.Clip(t.exp)
	}
	return out
}

// next is the earliest expiry, if any.
func (t *table) next() (time.Time, bool) {
	for t.exp.Len() > 0 {
		it := t.exp[0]
		if t.live(it) {
			return it.l.Expires, true
		}
		heap.Pop(&t.exp)
	}
	return time.Time{}, false
}

// expItem is a lease in the expiry heap, with the expiry (Unix ns) it had
// when pushed.
type expItem struct {
	at int64
	l  *store.Lease
}

type expHeap []expItem

func (h expHeap) Len() int           { return len(h) }
func (h expHeap) Less(i, j int) bool { return h[i].at < h[j].at }
func (h expHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *expHeap) Push(x any)        { *h = append(*h, x.(expItem)) }
func (h *expHeap) Pop() any {
	old := *h
	it := old[len(old)-1]
	old[len(old)-1] = expItem{}
	*h = old[:len(old)-1]
	return it
}
