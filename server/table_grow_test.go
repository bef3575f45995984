package server

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/pcpd/pcpd/store"
)

// checkIndexes verifies the three indexes as they are, mid-rehash
// included, without a lookup (find and bucket move entries out of the old
// array, so checkTable's lookups finish a migration before it looks):
// in each of b and old every entry carries its hash's tag and is reachable
// from its home bucket; old[:mig] is empty; n and oldN count the entries;
// no key is in both arrays or twice in one; b's load is at most 3/4.
func checkIndexes(t testing.TB, tab *table, step int) {
	t.Helper()
	for _, kind := range []int{ixKey, ixTup, ixExt} {
		x := tab.ix(kind)
		if x.old == nil && (x.oldN != 0 || x.mig != 0) {
			t.Fatalf("step %d: index %d: no old array, oldN %d mig %d", step, kind, x.oldN, x.mig)
		}
		if x.old != nil && len(x.old)*2 != len(x.b) {
			t.Fatalf("step %d: index %d: old %d buckets, b %d", step, kind, len(x.old), len(x.b))
		}
		seen := map[ixKeyOf][2]int{}
		for a, arr := range [2][]uint32{x.b, x.old} {
			n := 0
			mask := len(arr) - 1
			for i, e := range arr {
				if e == 0 {
					continue
				}
				if a == 1 && i < x.mig {
					t.Fatalf("step %d: index %d: old bucket %d below mig %d holds %d", step, kind, i, x.mig, e&refMask)
				}
				n++
				r := tab.rec(e & refMask)
				if r.flags&fLive == 0 {
					t.Fatalf("step %d: index %d: array %d bucket %d holds free slot %d", step, kind, a, i, e&refMask)
				}
				h := tab.hash(kind, r)
				if e&^refMask != tagOf(h) {
					t.Fatalf("step %d: index %d: array %d bucket %d: wrong tag", step, kind, a, i)
				}
				for j := int(h) & mask; j != i; j = (j + 1) & mask {
					if arr[j] == 0 {
						t.Fatalf("step %d: index %d: array %d: entry at %d cut off from its home %d", step, kind, a, i, int(h)&mask)
					}
				}
				// The fields same compares.
				key := ixKeyOf{owner: r.owner, a: r.iaddr, port: r.iport, proto: r.proto, remote: r.remote, rport: r.rport}
				switch kind {
				case ixTup:
					key = ixKeyOf{a: r.iaddr, port: r.iport, proto: r.proto}
				case ixExt:
					key = ixKeyOf{a: r.eaddr, port: r.eport, proto: r.proto}
				}
				where := [2]int{a, i}
				if w, dup := seen[key]; dup {
					t.Fatalf("step %d: index %d: one key in buckets %v and %v", step, kind, w, where)
				}
				seen[key] = where
			}
			want := x.n
			if a == 1 {
				want = x.oldN
			}
			if n != want {
				t.Fatalf("step %d: index %d: array %d holds %d entries, counted %d", step, kind, a, n, want)
			}
		}
		if x.n*4 > len(x.b)*3 {
			t.Fatalf("step %d: index %d: load %d/%d over 3/4", step, kind, x.n, len(x.b))
		}
	}
	if tab.byKey.n+tab.byKey.oldN != tab.len() {
		t.Fatalf("step %d: key index %d+%d entries, %d leases", step, tab.byKey.n, tab.byKey.oldN, tab.len())
	}
}

type ixKeyOf struct {
	owner     uint32
	a, remote caddr
	port      uint16
	rport     uint16
	proto     uint8
}

// TestTableModelGrowth runs random put/del/get/onTuple/holder/expire
// against the model while the table grows through several doublings and
// shrinks again, comparing after every step and checking the indexes as
// they are (mid-migration, lookups having moved entries out of order)
// every few steps. It fails if any index step of the incremental rehash
// loses, duplicates or misplaces an entry.
func TestTableModelGrowth(t *testing.T) {
	for _, seed := range []uint64{1, 2, 3, 4} {
		t.Run(fmt.Sprint("seed=", seed), func(t *testing.T) {
			rnd := rand.New(rand.NewPCG(seed, 77))
			tab := newTable()
			if seed%3 == 0 {
				tab.grow(100) // restart sizing, then growth past it
			}
			m := &model{m: map[store.Key]modelEntry{}}
			owners := []string{"a", "b", "c"}
			// ~3 000 keys: 60 addresses x 2 protocols x 8 ports (and a
			// few PEERs); endpoints and tuples collide often enough to
			// build chains.
			addr := func(i int) netip.Addr {
				return netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(i)})
			}
			randKey := func() store.Key {
				k := store.Key{Owner: owners[rnd.IntN(len(owners))], InternalAddr: addr(rnd.IntN(60)),
					Protocol: []uint8{6, 17}[rnd.IntN(2)], InternalPort: uint16(rnd.IntN(8))}
				if rnd.IntN(8) == 0 {
					k.Remote = netip.AddrPortFrom(addr(200+rnd.IntN(2)), 9)
				}
				return k
			}
			randEndpoint := func(proto uint8) endpoint {
				return endpoint{addr: addr(100 + rnd.IntN(40)), proto: proto, port: uint16(rnd.IntN(20))}
			}
			sawMig := [3]bool{}
			// Phases: mostly puts (growth through several doublings),
			// balanced, mostly deletes (shrinking while migrations are
			// left half done), then puts again.
			phases := []int{7, 5, 2, 8}
			const steps = 8000
			for i := range steps {
				putShare := phases[i*len(phases)/steps]
				switch op := rnd.IntN(10); {
				case op < putShare:
					k := randKey()
					e := randEndpoint(k.Protocol)
					l := store.Lease{Key: k, ExternalAddr: e.addr, ExternalPort: e.port, Kind: store.KindMap,
						Created: tNow, Expires: tNow.Add(time.Duration(rnd.IntN(1000)) * time.Second), Nonce: [12]byte{byte(i)}}
					if k.Remote.IsValid() {
						l.Kind = store.KindPeer
					}
					tab.put(l)
					m.put(l)
				case op < 9:
					k := randKey()
					_, want := m.m[k]
					delete(m.m, k)
					if got := tab.del(k); got != want {
						t.Fatalf("step %d: del %v = %v, want %v", i, k, got, want)
					}
				default:
					at := tNow.Add(time.Duration(rnd.IntN(30)) * time.Second)
					for _, k := range tab.expired(at) {
						if _, ok := m.m[k]; !ok {
							t.Fatalf("step %d: expired %v not in the model", i, k)
						}
						delete(m.m, k)
						tab.del(k)
					}
				}
				for kind := range 3 {
					sawMig[kind] = sawMig[kind] || tab.ix(kind).old != nil
				}
				if tab.len() != len(m.m) {
					t.Fatalf("step %d: len %d, want %d", i, tab.len(), len(m.m))
				}
				// A few lookups of each kind, in random order: each may move
				// an entry out of the old array.
				for range 1 + rnd.IntN(4) {
					switch rnd.IntN(3) {
					case 0:
						k := randKey()
						got, ok := tab.get(k)
						if e, want := m.m[k]; ok != want || (ok && !reflect.DeepEqual(*got, e.l)) {
							t.Fatalf("step %d: get %v = %v, want %v", i, k, ok, want)
						}
					case 1:
						tp := tupleOf(randKey())
						var want []store.Key
						for _, e := range m.sorted(func(l *store.Lease) bool { return tupleOf(l.Key) == tp }) {
							want = append(want, e.l.Key)
						}
						if got := keysOf(tab.onTuple(tp)); !slices.Equal(got, want) {
							t.Fatalf("step %d: onTuple %v = %v, want %v", i, tp, got, want)
						}
					default:
						e := randEndpoint([]uint8{6, 17}[rnd.IntN(2)])
						hs := m.sorted(func(l *store.Lease) bool { return endpointOf(l) == e })
						h, ok := tab.holder(e)
						if ok != (len(hs) > 0) || (ok && (h.n != len(hs) || h.addr != hs[0].l.InternalAddr || h.port != hs[0].l.InternalPort)) {
							t.Fatalf("step %d: holder(%v) = %+v %v, want %d holders", i, e, h, ok, len(hs))
						}
					}
				}
				if i%29 == 0 || tab.byKey.old != nil && i%7 == 0 {
					checkIndexes(t, tab, i)
				}
				if i%1009 == 0 {
					checkTable(t, tab)
					checkIndexes(t, tab, i)
				}
			}
			checkIndexes(t, tab, steps)
			checkTable(t, tab)
			for kind, saw := range sawMig {
				if !saw {
					t.Errorf("index %d never migrated: the test did not grow the table", kind)
				}
			}
		})
	}
}
