package server

import (
	"container/heap"
	"net/netip"
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
type table struct {
	byKey   map[store.Key]*store.Lease
	byOwner map[string]int
	byTuple map[tuple]map[store.Key]struct{}
	byExt   map[endpoint]*hold
	exp     expHeap
}

func newTable() *table {
	return &table{
		byKey:   map[store.Key]*store.Lease{},
		byOwner: map[string]int{},
		byTuple: map[tuple]map[store.Key]struct{}{},
		byExt:   map[endpoint]*hold{},
	}
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
	t.byKey[l.Key] = &c
	t.byOwner[l.Owner]++
	tp := tupleOf(l.Key)
	s := t.byTuple[tp]
	if s == nil {
		s = map[store.Key]struct{}{}
		t.byTuple[tp] = s
	}
	s[l.Key] = struct{}{}
	e := endpointOf(&c)
	h := t.byExt[e]
	if h == nil {
		h = &hold{addr: l.InternalAddr, port: l.InternalPort}
		t.byExt[e] = h
	}
	h.n++
	heap.Push(&t.exp, expItem{at: l.Expires, key: l.Key})
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
	}
	tp := tupleOf(k)
	if s := t.byTuple[tp]; s != nil {
		delete(s, k)
		if len(s) == 0 {
			delete(t.byTuple, tp)
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
	s := t.byTuple[tp]
	out := make([]*store.Lease, 0, len(s))
	for k := range s {
		out = append(out, t.byKey[k])
	}
	return out
}

// holder tells who holds an external endpoint.
func (t *table) holder(e endpoint) (*hold, bool) {
	h, ok := t.byExt[e]
	return h, ok
}

// expired pops every lease whose expiry is at or before now.
func (t *table) expired(now time.Time) []store.Key {
	var out []store.Key
	for t.exp.Len() > 0 {
		it := t.exp[0]
		if it.at.After(now) {
			break
		}
		heap.Pop(&t.exp)
		if l, ok := t.byKey[it.key]; ok && !l.Expires.After(now) && l.Expires.Equal(it.at) {
			out = append(out, it.key)
		}
	}
	// Stale heap entries of renewed leases would otherwise pile up under
	// heavy renewal; rebuild when they outnumber live leases.
	if t.exp.Len() > 2*len(t.byKey)+64 {
		t.exp = t.exp[:0]
		for k, l := range t.byKey {
			t.exp = append(t.exp, expItem{at: l.Expires, key: k})
		}
		heap.Init(&t.exp)
	}
	return out
}

// next is the earliest expiry, if any.
func (t *table) next() (time.Time, bool) {
	for t.exp.Len() > 0 {
		it := t.exp[0]
		if l, ok := t.byKey[it.key]; ok && l.Expires.Equal(it.at) {
			return it.at, true
		}
		heap.Pop(&t.exp)
	}
	return time.Time{}, false
}

type expItem struct {
	at  time.Time
	key store.Key
}

type expHeap []expItem

func (h expHeap) Len() int           { return len(h) }
func (h expHeap) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h expHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *expHeap) Push(x any)        { *h = append(*h, x.(expItem)) }
func (h *expHeap) Pop() any {
	old := *h
	it := old[len(old)-1]
	*h = old[:len(old)-1]
	return it
}
