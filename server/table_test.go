package server

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"runtime"
	"slices"
	"testing"
	"time"
	"unsafe"

	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/store"
)

// checkTable verifies every structural invariant of t: each live slot is
// in the key index once and found by its key; each tuple and endpoint chain
// holds exactly the live leases with that tuple or endpoint; the heap is a
// min-heap whose entries know their positions and carry their slot's
// expiry; free slots are exactly the non-live ones; owner counts and side
// tables match the slots.
func checkTable(t testing.TB, tab *table) {
	t.Helper()
	live := 0
	owners := map[string]int{}
	for ref := uint32(1); ref <= tab.top; ref++ {
		r := tab.rec(ref)
		if r.flags&fLive == 0 {
			continue
		}
		live++
		var l store.Lease
		tab.decode(ref, &l)
		owners[l.Owner]++
		if got := tab.lookup(l.Key); got != ref {
			t.Fatalf("slot %d (%v): key index finds %d", ref, l.Key, got)
		}
		if int(r.hpos) >= len(tab.exp) || tab.exp[r.hpos].ref != ref || tab.exp[r.hpos].at != r.exp {
			t.Fatalf("slot %d: heap position %d wrong", ref, r.hpos)
		}
		if _, ok := tab.extra[ref]; ok != (r.flags&fExtra != 0) {
			t.Fatalf("slot %d: extra %v, flag %v", ref, ok, r.flags&fExtra != 0)
		}
		for _, kind := range []int{ixTup, ixExt} {
			i := tab.find(kind, r)
			if i < 0 {
				t.Fatalf("slot %d: not in index %d", ref, kind)
			}
			found := false
			for c := tab.ix(kind).ref(i); c != 0; c = *tab.rec(c).next(kind) {
				if !same(kind, tab.rec(c), r) || tab.rec(c).flags&fLive == 0 {
					t.Fatalf("index %d: chain of slot %d holds slot %d of another key or free", kind, ref, c)
				}
				found = found || c == ref
			}
			if !found {
				t.Fatalf("slot %d: not on its chain in index %d", ref, kind)
			}
		}
	}
	checkPool4(t, tab)
	// on6 (flowprune.go): each IPv6 address's live leases, internal or
	// external, once a lease.
	on6 := map[[16]byte]int32{}
	for ref := uint32(1); ref <= tab.top; ref++ {
		r := tab.rec(ref)
		if r.flags&fLive == 0 {
			continue
		}
		for i, c := range []caddr{r.iaddr, r.eaddr} {
			if c.m&3 == 2 && (i == 0 || c.a != r.iaddr.a) {
				on6[c.a]++
			}
		}
	}
	if !maps.Equal(on6, tab.on6) {
		t.Fatalf("on6 %v, want %v", tab.on6, on6)
	}
	if live != tab.n {
		t.Fatalf("%d live slots, n = %d", live, tab.n)
	}
	if tab.byKey.n != live || len(tab.exp) != live {
		t.Fatalf("key index %d, heap %d, live %d", tab.byKey.n, len(tab.exp), live)
	}
	for _, kind := range []int{ixKey, ixTup, ixExt} {
		x := tab.ix(kind)
		n := 0
		for i, b := range x.b {
			if b == 0 {
				continue
			}
			ref := b & refMask
			if b&^refMask != tagOf(tab.hash(kind, tab.rec(ref))) {
				t.Fatalf("index %d: bucket %d has the wrong tag", kind, i)
			}
			n++
			// Every entry is reachable from its home bucket without
			// crossing an empty one (backward-shift deletion).
			mask := len(x.b) - 1
			for j := int(tab.hash(kind, tab.rec(ref))) & mask; j != i; j = (j + 1) & mask {
				if x.b[j] == 0 {
					t.Fatalf("index %d: entry %d at %d cut off from its home", kind, ref, i)
				}
			}
			// A chain head is in the index once: no other bucket has its key.
			if j := tab.find(kind, tab.rec(ref)); j != i {
				t.Fatalf("index %d: key of slot %d in buckets %d and %d", kind, ref, i, j)
			}
		}
		if n != x.n {
			t.Fatalf("index %d: %d entries, n = %d", kind, n, x.n)
		}
		if x.n*4 > len(x.b)*3 {
			t.Fatalf("index %d: load %d/%d over 3/4", kind, x.n, len(x.b))
		}
	}
	for i := 1; i < len(tab.exp); i++ {
		if p := (i - 1) / 4; tab.exp[p].at > tab.exp[i].at {
			t.Fatalf("heap: parent %d (%d) after child %d (%d)", p, tab.exp[p].at, i, tab.exp[i].at)
		}
	}
	free := 0
	for ref := tab.free; ref != 0; ref = tab.rec(ref).nextTup {
		if tab.rec(ref).flags&fLive != 0 {
			t.Fatalf("live slot %d on the free list", ref)
		}
		if free++; free > int(tab.top) {
			t.Fatal("free list loops")
		}
	}
	if free+live+len(tab.pend) != int(tab.top) {
		t.Fatalf("%d free + %d live + %d pinned != %d slots", free, live, len(tab.pend), tab.top)
	}
	if tab.pins == 0 && (len(tab.pend) > 0 || len(tab.pendOwners) > 0) {
		t.Fatalf("no pin, %d slots and %d owners waiting", len(tab.pend), len(tab.pendOwners))
	}
	if !reflect.DeepEqual(owners, tab.byOwner) && !(len(owners) == 0 && len(tab.byOwner) == 0) {
		t.Fatalf("owner counts %v, want %v", tab.byOwner, owners)
	}
	if len(tab.ownerNo) != len(owners) {
		t.Fatalf("%d interned owners, %d holding leases", len(tab.ownerNo), len(owners))
	}
	if taken := len(tab.owners) - len(tab.ownFree); taken != len(owners)+len(tab.pendOwners) {
		t.Fatalf("%d owner numbers taken, %d owners + %d waiting", taken, len(owners), len(tab.pendOwners))
	}
	if len(tab.extra) > live+len(tab.pend) {
		t.Fatalf("%d extras for %d leases and %d held-back slots", len(tab.extra), live, len(tab.pend))
	}
}

var (
	tNow  = time.Unix(1_800_000_000, 0).UTC()
	v6a   = netip.MustParseAddr("2001:db8::a")
	v6b   = netip.MustParseAddr("2001:db8::b")
	v4a   = netip.MustParseAddr("10.0.0.2")
	tExt4 = netip.MustParseAddr("192.0.2.1")
	srv6  = netip.MustParseAddrPort("[2001:db8::1]:5351")
	peerR = netip.MustParseAddrPort("[2001:db8:9::1]:4000")
)

func lease(owner string, in netip.Addr, proto uint8, port uint16, ext netip.Addr, eport uint16, exp time.Duration) store.Lease {
	return store.Lease{
		Key:          store.Key{Owner: owner, Protocol: proto, InternalAddr: in, InternalPort: port},
		ExternalAddr: ext, ExternalPort: eport, Kind: store.KindMap,
		ClientAddr: netip.AddrPortFrom(in, 5350), ServerAddr: srv6,
		Created: tNow, Expires: tNow.Add(exp), Nonce: [12]byte{1, 2, 3},
	}
}

func peerOf(l store.Lease, r netip.AddrPort) store.Lease {
	l.Remote, l.Kind = r, store.KindPeer
	return l
}

func keysOf(ls []*store.Lease) []store.Key {
	var out []store.Key
	for _, l := range ls {
		out = append(out, l.Key)
	}
	return out
}

// TestTableOps drives the table through scripted steps, checking every
// invariant and the results each step promises.
func TestTableOps(t *testing.T) {
	mapA := lease("a", v6a, 6, 443, v6a, 443, time.Hour)
	peerA := peerOf(lease("a", v6a, 6, 443, v6a, 443, 2*time.Hour), peerR)
	mapB := lease("b", v6b, 17, 53, v6b, 53, 30*time.Minute)
	map4 := lease("c", v4a, 6, 80, tExt4, 1024, 10*time.Minute)
	withExtra := mapA
	withExtra.Filters = []store.Filter{{Prefix: netip.MustParsePrefix("2001:db8:5::/48"), Port: 22}}
	withExtra.Description = "printer"
	zoned := lease("z", v6a, 6, 8080, v6a, 8080, time.Hour)
	zoned.ClientAddr = netip.MustParseAddrPort("[fe80::1%lan0]:5350")
	zoned.ServerAddr = netip.MustParseAddrPort("[fe80::2%lan0]:5351")
	zoned.Created = time.Time{}

	type step struct {
		put, del   *store.Lease
		wantDel    bool
		len        int  // checked when not 0
		empty      bool // len must be 0
		owners     map[string]int
		tuple      tuple
		onTuple    []store.Key
		ext        endpoint
		holder     *hold
		expireAt   time.Duration
		expired    []store.Key
		next       time.Duration // 0: none
		reuses     bool          // the put takes a freed slot
		roundTrips *store.Lease  // get returns exactly this
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"put and get round-trip", []step{
			{put: &mapA, len: 1, owners: map[string]int{"a": 1}, roundTrips: &mapA, next: time.Hour},
			{put: &map4, len: 2, owners: map[string]int{"a": 1, "c": 1}, roundTrips: &map4, next: 10 * time.Minute},
			{put: &zoned, len: 3, roundTrips: &zoned},
			{put: &withExtra, len: 3, owners: map[string]int{"a": 1, "c": 1, "z": 1}, roundTrips: &withExtra},
		}},
		{"replace keeps one lease and updates its expiry", []step{
			{put: &mapA, len: 1, next: time.Hour},
			{put: &withExtra, len: 1, roundTrips: &withExtra, owners: map[string]int{"a": 1}},
			{put: &mapA, len: 1, roundTrips: &mapA},
		}},
		{"a MAP and a PEER share a tuple and an endpoint", []step{
			{put: &mapA},
			{put: &peerA, len: 2, owners: map[string]int{"a": 2},
				tuple: tupleOf(mapA.Key), onTuple: []store.Key{mapA.Key, peerA.Key},
				ext: endpointOf(&mapA), holder: &hold{addr: v6a, port: 443, n: 2}},
			{del: &mapA, wantDel: true, len: 1, tuple: tupleOf(mapA.Key), onTuple: []store.Key{peerA.Key},
				ext: endpointOf(&mapA), holder: &hold{addr: v6a, port: 443, n: 1}, next: 2 * time.Hour},
			{del: &peerA, wantDel: true, empty: true, owners: map[string]int{}, tuple: tupleOf(mapA.Key),
				ext: endpointOf(&mapA)},
		}},
		{"deleting the chain head keeps the rest findable", []step{
			{put: &peerA}, {put: &mapA},
			{del: &peerA, wantDel: true, tuple: tupleOf(mapA.Key), onTuple: []store.Key{mapA.Key},
				ext: endpointOf(&mapA), holder: &hold{addr: v6a, port: 443, n: 1}},
		}},
		{"delete of an absent key", []step{
			{del: &mapB, wantDel: false, empty: true},
			{put: &mapA}, {del: &mapB, wantDel: false, len: 1},
		}},
		{"expiry order and next", []step{
			{put: &mapA}, {put: &mapB}, {put: &map4},
			{expireAt: 5 * time.Minute, expired: nil, next: 10 * time.Minute},
			{expireAt: 30 * time.Minute, expired: []store.Key{map4.Key, mapB.Key}},
			{expireAt: 2 * time.Hour, expired: []store.Key{map4.Key, mapB.Key, mapA.Key}},
			{del: &map4, wantDel: true, next: 30 * time.Minute},
			{del: &mapB, wantDel: true, next: time.Hour},
			{del: &mapA, wantDel: true, expireAt: 2 * time.Hour, expired: nil},
		}},
		{"a renewal moves the lease in expiry order", []step{
			{put: &map4}, {put: &mapA},
			{put: func() *store.Lease { l := map4; l.Expires = tNow.Add(3 * time.Hour); return &l }(), next: time.Hour},
			{expireAt: 2 * time.Hour, expired: []store.Key{mapA.Key}},
		}},
		{"freed slots are reused", []step{
			{put: &mapA}, {put: &mapB}, {del: &mapA, wantDel: true},
			{put: &map4, reuses: true, len: 2},
		}},
		{"owner counts follow puts and deletes", []step{
			{put: &mapA, owners: map[string]int{"a": 1}},
			{put: &peerA, owners: map[string]int{"a": 2}},
			{put: &mapB, owners: map[string]int{"a": 2, "b": 1}},
			{del: &peerA, wantDel: true, owners: map[string]int{"a": 1, "b": 1}},
			{del: &mapA, wantDel: true, owners: map[string]int{"b": 1}},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tab := newTable()
			for i, s := range tc.steps {
				top := tab.top
				if s.put != nil {
					tab.put(*s.put)
					if s.reuses && tab.top != top {
						t.Fatalf("step %d: put took a new slot (%d→%d)", i, top, tab.top)
					}
				}
				if s.del != nil {
					if got := tab.del(s.del.Key); got != s.wantDel {
						t.Fatalf("step %d: del = %v, want %v", i, got, s.wantDel)
					}
					if _, ok := tab.get(s.del.Key); ok {
						t.Fatalf("step %d: deleted lease still there", i)
					}
				}
				checkTable(t, tab)
				if s.len != 0 || s.empty {
					if tab.len() != s.len {
						t.Fatalf("step %d: len %d, want %d", i, tab.len(), s.len)
					}
				}
				if s.owners != nil && !(len(s.owners) == 0 && len(tab.byOwner) == 0) && !reflect.DeepEqual(tab.byOwner, s.owners) {
					t.Fatalf("step %d: owners %v, want %v", i, tab.byOwner, s.owners)
				}
				if s.roundTrips != nil {
					got, ok := tab.get(s.roundTrips.Key)
					if !ok || !reflect.DeepEqual(*got, *s.roundTrips) {
						t.Fatalf("step %d: get\n%+v\nwant\n%+v", i, got, s.roundTrips)
					}
				}
				if s.tuple != (tuple{}) {
					if got := keysOf(tab.onTuple(s.tuple)); !slices.Equal(got, s.onTuple) {
						t.Fatalf("step %d: onTuple %v, want %v", i, got, s.onTuple)
					}
				}
				if s.ext != (endpoint{}) {
					h, ok := tab.holder(s.ext)
					if ok != (s.holder != nil) || (ok && h != *s.holder) {
						t.Fatalf("step %d: holder %+v %v, want %+v", i, h, ok, s.holder)
					}
				}
				if s.expireAt != 0 {
					if got := tab.expired(tNow.Add(s.expireAt)); !slices.Equal(got, s.expired) {
						t.Fatalf("step %d: expired %v, want %v", i, got, s.expired)
					}
				}
				if s.next != 0 {
					if at, ok := tab.next(); !ok || !at.Equal(tNow.Add(s.next)) {
						t.Fatalf("step %d: next %v %v, want %v", i, at, ok, tNow.Add(s.next))
					}
				}
			}
		})
	}
}

// model is the reference: a map, scanned in full for every question.
type model struct {
	m   map[store.Key]modelEntry
	seq int
}

type modelEntry struct {
	l   store.Lease
	seq int // insertion order: chains are oldest first
}

func (m *model) put(l store.Lease) {
	m.seq++
	m.m[l.Key] = modelEntry{l, m.seq}
}

func (m *model) sorted(keep func(*store.Lease) bool) []modelEntry {
	var out []modelEntry
	// One variable for the whole scan: keep's pointer made a loop-scoped
	// copy escape, a heap allocation per entry scanned (most of
	// TestTableModelGrowth's time).
	var e modelEntry
	for _, e = range m.m {
		if keep(&e.l) {
			out = append(out, e)
		}
	}
	slices.SortFunc(out, func(a, b modelEntry) int { return a.seq - b.seq })
	return out
}

// TestTableModel runs random operations on a small key space (so keys,
// tuples and endpoints collide and slots are reused) against the model.
func TestTableModel(t *testing.T) {
	for _, seed := range []uint64{1, 2, 3, 4} {
		t.Run(fmt.Sprint("seed=", seed), func(t *testing.T) {
			rnd := rand.New(rand.NewPCG(seed, seed))
			tab := newTable()
			if seed%2 == 0 {
				tab.grow(64)
			}
			m := &model{m: map[store.Key]modelEntry{}}
			var into []store.Lease // onTupleInto's buffer, reused across steps
			owners := []string{"a", "b", "c", "d"}
			addrs := []netip.Addr{v6a, v6b, v4a, netip.MustParseAddr("fe80::1%eth0"), netip.MustParseAddr("::ffff:10.0.0.3")}
			randKey := func() store.Key {
				k := store.Key{Owner: owners[rnd.IntN(len(owners))], InternalAddr: addrs[rnd.IntN(len(addrs))],
					Protocol: []uint8{6, 17}[rnd.IntN(2)], InternalPort: uint16(rnd.IntN(3))}
				if rnd.IntN(3) == 0 {
					k.Remote = netip.AddrPortFrom(addrs[rnd.IntN(2)], uint16(1+rnd.IntN(2)))
				}
				return k
			}
			for i := range 20000 {
				switch op := rnd.IntN(10); {
				case op < 5:
					k := randKey()
					l := store.Lease{Key: k, ExternalAddr: addrs[rnd.IntN(len(addrs))], ExternalPort: uint16(rnd.IntN(3)),
						Kind: store.KindMap, Created: tNow, Expires: tNow.Add(time.Duration(rnd.IntN(100)) * time.Second),
						Nonce: [12]byte{byte(i)}, ThirdParty: rnd.IntN(2) == 0, PreferFailure: rnd.IntN(2) == 0}
					if k.Remote.IsValid() {
						l.Kind = store.KindPeer
					}
					if rnd.IntN(4) == 0 {
						l.Filters = []store.Filter{{Prefix: netip.MustParsePrefix("2001:db8::/32"), Port: uint16(i)}}
					}
					if rnd.IntN(4) == 0 {
						l.Description = fmt.Sprint("d", i)
					}
					if rnd.IntN(2) == 0 {
						l.ClientAddr = netip.AddrPortFrom(addrs[rnd.IntN(len(addrs))], 5350)
						l.ServerAddr = netip.AddrPortFrom(addrs[rnd.IntN(len(addrs))], 5351)
					}
					tab.put(l)
					m.put(l)
				case op < 8:
					k := randKey()
					_, want := m.m[k]
					delete(m.m, k)
					if got := tab.del(k); got != want {
						t.Fatalf("op %d: del %v = %v, want %v", i, k, got, want)
					}
				case op < 9:
					at := tNow.Add(time.Duration(rnd.IntN(100)) * time.Second)
					got := tab.expired(at)
					want := m.sorted(func(l *store.Lease) bool { return !l.Expires.After(at) })
					if len(got) != len(want) {
						t.Fatalf("op %d: %d expired, want %d", i, len(got), len(want))
					}
					last := time.Time{}
					for _, k := range got {
						e, ok := m.m[k]
						if !ok || e.l.Expires.After(at) || e.l.Expires.Before(last) {
							t.Fatalf("op %d: expired %v out of order or not due", i, k)
						}
						last = e.l.Expires
					}
					for _, k := range got { // the engine deletes what expired
						delete(m.m, k)
						tab.del(k)
					}
				case rnd.IntN(2) == 0:
					// An absorbed renewal (extend): the expiry moves, the
					// lease keeps its place on its chains.
					k := randKey()
					at := tNow.Add(time.Duration(rnd.IntN(100)) * time.Second)
					e, want := m.m[k]
					if got := tab.extend(k, at); got != want {
						t.Fatalf("op %d: extend %v = %v, want %v", i, k, got, want)
					}
					if want {
						e.l.Expires = at
						m.m[k] = e
					}
				default:
					// Nothing changes: the questions below are asked anyway.
				}
				// Every question, every step.
				if tab.len() != len(m.m) {
					t.Fatalf("op %d: len %d, want %d", i, tab.len(), len(m.m))
				}
				k := randKey()
				got, ok := tab.get(k)
				if e, want := m.m[k]; ok != want || (ok && !reflect.DeepEqual(*got, e.l)) {
					t.Fatalf("op %d: get %v = %+v %v, want %+v", i, k, got, ok, e.l)
				}
				tp := tupleOf(k)
				var wantTup []store.Key
				for _, e := range m.sorted(func(l *store.Lease) bool { return tupleOf(l.Key) == tp }) {
					wantTup = append(wantTup, e.l.Key)
				}
				if gotTup := keysOf(tab.onTuple(tp)); !slices.Equal(gotTup, wantTup) {
					t.Fatalf("op %d: onTuple %v, want %v", i, gotTup, wantTup)
				}
				into = tab.onTupleInto(tp, into)
				if len(into) != len(wantTup) {
					t.Fatalf("op %d: onTupleInto has %d leases, want %d", i, len(into), len(wantTup))
				}
				for j := range into {
					if !reflect.DeepEqual(into[j], m.m[wantTup[j]].l) {
						t.Fatalf("op %d: onTupleInto[%d] = %+v, want %+v", i, j, into[j], m.m[wantTup[j]].l)
					}
				}
				e := endpoint{addr: addrs[rnd.IntN(len(addrs))], proto: k.Protocol, port: uint16(rnd.IntN(3))}
				holders := m.sorted(func(l *store.Lease) bool { return endpointOf(l) == e })
				h, ok := tab.holder(e)
				if ok != (len(holders) > 0) || (ok && (h.n != len(holders) || h.addr != holders[0].l.InternalAddr || h.port != holders[0].l.InternalPort)) {
					t.Fatalf("op %d: holder(%v) = %+v %v, want %d holders", i, e, h, ok, len(holders))
				}
				if nx, ok := tab.next(); ok != (len(m.m) > 0) {
					t.Fatalf("op %d: next %v", i, ok)
				} else if ok {
					for _, e := range m.m {
						if e.l.Expires.Before(nx) {
							t.Fatalf("op %d: next %v after %v", i, nx, e.l.Expires)
						}
					}
				}
				if i%97 == 0 {
					checkTable(t, tab)
				}
			}
			checkTable(t, tab)
			n := 0
			for k, l := range tab.all() {
				n++
				if e, ok := m.m[k]; !ok || !reflect.DeepEqual(*l, e.l) {
					t.Fatalf("all: %+v, want %+v", *l, e.l)
				}
			}
			if n != len(m.m) {
				t.Fatalf("all yielded %d, want %d", n, len(m.m))
			}
		})
	}
}

// TestTableExtendPinned: while a listing holds a pin, extend refuses and
// changes nothing (the listing reads slots outside the lock); after the
// last unpin it moves the expiry in place.
func TestTableExtendPinned(t *testing.T) {
	tab := newTable()
	a := lease("a", v6a, 6, 443, v6a, 443, time.Hour)
	b := lease("a", v6b, 6, 443, v6b, 443, 2*time.Hour)
	tab.put(a)
	tab.put(b)
	for _, step := range []struct {
		pinned bool
		at     time.Duration
		want   bool
		first  store.Key // expired(tNow+3h)[0]
	}{
		{pinned: true, at: 3 * time.Hour, want: false, first: a.Key},
		{pinned: false, at: 3 * time.Hour, want: true, first: b.Key},
		{pinned: false, at: time.Minute, want: true, first: a.Key},
	} {
		var epoch uint64
		if step.pinned {
			epoch = tab.pin()
		}
		ref := tab.lookup(a.Key)
		before := *tab.rec(ref)
		if got := tab.extend(a.Key, tNow.Add(step.at)); got != step.want {
			t.Fatalf("pinned %v: extend = %v, want %v", step.pinned, got, step.want)
		}
		if !step.want && *tab.rec(ref) != before {
			t.Fatalf("pinned: the slot changed")
		}
		if step.pinned {
			tab.unpin(epoch)
		}
		checkTable(t, tab)
		if got := tab.expired(tNow.Add(3 * time.Hour)); len(got) != 2 || got[0] != step.first {
			t.Fatalf("pinned %v, extend to %v: expired %v, want %v first", step.pinned, step.at, got, step.first)
		}
	}
}

// TestTableRecSize pins the slot's size: the memory budget (README) counts
// on it.
func TestTableRecSize(t *testing.T) {
	if n := unsafe.Sizeof(rec{}); n != 136 {
		t.Fatalf("rec is %d bytes, want 136 (the README's memory budget and BENCHMARKS.md count on it)", n)
	}
}

// benchLeases are n leases shaped like bench/run's: PCP MAP, IPv6, one
// internal address each, spread over owners, expiring over an hour.
func benchLeases(n, owners int) func(i int) store.Lease {
	ids := make([]string, owners)
	for i := range ids {
		ids[i] = fmt.Sprintf("load-%05d", i)
	}
	srv := netip.MustParseAddrPort("[2001:db8:1:2::1]:5351")
	return func(i int) store.Lease {
		a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, 0x40, byte(i >> 16), 0, 0, 0, 0, 0, byte(i >> 8), byte(i), 1})
		now := tNow.Add(time.Duration(i) * time.Millisecond)
		return store.Lease{
			Key:          store.Key{Owner: ids[i%owners], Protocol: 6, InternalAddr: a, InternalPort: uint16(1024 + i%60000)},
			ExternalAddr: a, ExternalPort: uint16(1024 + i%60000), Kind: store.KindMap,
			ClientAddr: netip.AddrPortFrom(a, 40000), ServerAddr: srv,
			Created: now, Expires: now.Add(time.Hour), Nonce: [12]byte{byte(i), byte(i >> 8), byte(i >> 16)},
		}
	}
}

func liveHeap() uint64 {
	var ms runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// BenchmarkTableMemory builds a table of n bench-shaped leases by put (as
// requests grow it) and reports the live heap it keeps per lease, and the
// time per put.
//
//	go test ./server -run '^$' -bench TableMemory -benchtime 1x
func BenchmarkTableMemory(b *testing.B) {
	for _, n := range []int{100_000, 1_000_000} {
		b.Run(fmt.Sprint("leases=", n), func(b *testing.B) {
			gen := benchLeases(n, 4096)
			for b.Loop() {
				before := liveHeap()
				start := time.Now()
				tab := newTable()
				for i := range n {
					tab.put(gen(i))
				}
				took := time.Since(start)
				after := liveHeap()
				b.ReportMetric(float64(int64(after)-int64(before))/float64(n), "heapB/lease")
				b.ReportMetric(float64(took.Nanoseconds())/float64(n), "ns/put")
				runtime.KeepAlive(tab)
			}
		})
	}
}

// TestTableMemoryBudget holds the table to its budget (README, "Memory"):
// ≤ 250 bytes of live heap a lease at 200 000 bench-shaped leases.
func TestTableMemoryBudget(t *testing.T) {
	if testing.Short() {
		t.Skip("builds 200 000 leases")
	}
	const n = 200_000
	gen := benchLeases(n, 4096)
	before := liveHeap()
	tab := newTable()
	for i := range n {
		tab.put(gen(i))
	}
	after := liveHeap()
	per := float64(int64(after)-int64(before)) / n
	t.Logf("%.0f bytes of live heap a lease", per)
	if per > 250 {
		t.Fatalf("%.0f bytes a lease, budget 250", per)
	}
	runtime.KeepAlive(tab)
}

// BenchmarkTableAll is a walk over every lease with a copy of each (what
// Leases does before sorting).
// benchTable is a table of n bench-shaped leases of 4096 owners, and the
// generator that made them.
func benchTable(n int) (*table, func(int) store.Lease) {
	gen := benchLeases(n, 4096)
	tab := newTable()
	for i := range n {
		tab.put(gen(i))
	}
	return tab, gen
}

func BenchmarkTableAll(b *testing.B) {
	const n = 124_000
	tab, _ := benchTable(n)
	out := make([]store.Lease, 0, n)
	for b.Loop() {
		out = out[:0]
		for _, l := range tab.all() {
			out = append(out, *l)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/lease")
}

// TestTableIncrementalRehash: when an index outgrows its buckets, the old
// array is moved into the new one a few buckets per insert or delete, not
// all at once (a whole rehash of three indexes stalled the engine 25-30
// ms at 98 304 leases), and every lease stays findable by key, tuple and
// endpoint throughout, with deletes and re-inserts landing in both arrays.
func TestTableIncrementalRehash(t *testing.T) {
	for _, tc := range []struct {
		name    string
		n       int
		delEach int // delete a random live lease after every delEach puts (0: none)
	}{{"inserts", 20000, 0}, {"inserts and deletes", 30000, 3}} {
		t.Run(tc.name, func(t *testing.T) {
			rnd := rand.New(rand.NewPCG(9, uint64(tc.n)))
			tab := newTable()
			lease := func(i int) store.Lease {
				a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, byte(i >> 16), byte(i >> 8), 15: byte(i)})
				return store.Lease{Key: store.Key{Owner: "o", InternalAddr: a, Protocol: 6, InternalPort: uint16(1000 + i%7)},
					ExternalAddr: a, ExternalPort: uint16(1000 + i%7), Kind: store.KindMap, Created: tNow, Expires: tNow.Add(time.Hour)}
			}
			live := map[int]bool{}
			var liveList []int
			sawMigration := false
			check := func(i int) {
				l := lease(i)
				got, ok := tab.get(l.Key)
				if ok != live[i] || (ok && got.ExternalPort != l.ExternalPort) {
					t.Fatalf("lease %d: get = %v, %v; live %v", i, got, ok, live[i])
				}
				if ok {
					if len(tab.onTuple(tupleOf(l.Key))) != 1 {
						t.Fatalf("lease %d: not found by its tuple", i)
					}
					if _, held := tab.holder(endpointOf(&l)); !held {
						t.Fatalf("lease %d: not found by its endpoint", i)
					}
				}
			}
			for i := range tc.n {
				before := len(tab.byKey.b)
				tab.put(lease(i))
				live[i] = true
				liveList = append(liveList, i)
				if len(tab.byKey.b) != before && before >= 64 {
					if tab.byKey.old == nil {
						t.Fatalf("put %d: the key index grew %d → %d buckets all at once", i, before, len(tab.byKey.b))
					}
					sawMigration = true
				}
				if x := &tab.byKey; x.n+x.oldN != tab.len() {
					t.Fatalf("put %d: index holds %d+%d entries, table %d", i, x.n, x.oldN, tab.len())
				}
				if tc.delEach > 0 && i%tc.delEach == 0 {
					j := rnd.IntN(len(liveList))
					victim := liveList[j]
					liveList[j] = liveList[len(liveList)-1]
					liveList = liveList[:len(liveList)-1]
					if !tab.del(lease(victim).Key) {
						t.Fatalf("del %d: not found", victim)
					}
					delete(live, victim)
					check(victim)
				}
				if i%97 == 0 {
					check(rnd.IntN(i + 1))
				}
			}
			if !sawMigration {
				t.Fatal("the index never grew")
			}
			for i := range tc.n {
				check(i)
			}
			n := 0
			tab.installs(tNow, nil, func(op pinhole.Op) bool { n++; return true })
			if n < len(liveList) {
				t.Errorf("installs listed %d pinholes for %d leases", n, len(liveList))
			}
		})
	}
}
