package server

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/pcpd/pcpd/store"
)

// TestMappingsOfMatchesWalk (review h/revrq2): table.mappingsOf, which a
// NAT-PMP delete of every mapping of a client (PMP-08) reads instead of
// walking all(), returns exactly the leases the walk selected (owner,
// internal address with its zone, protocol, every kind but PEER; filtered
// and expired-but-unswept ones included) after every step of random
// puts, replacements, extends, deletes, sweeps, pins, unpins and broken
// pins, for every owner (one never seen too), address and protocol. Its
// early stop after byOwner leases is thereby checked against owner
// numbers reused and held back by pins. The address rows include a zone
// no lease has (fe80::1%never) beside a lease on an unzoned fe80::1.
func TestMappingsOfMatchesWalk(t *testing.T) {
	for _, seed := range []uint64{1, 2, 3, 4} {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rnd := rand.New(rand.NewPCG(seed, 7))
			tab := newTable()
			owners := []string{"a", "b", "c", "never"}
			addrs := []netip.Addr{
				netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2"),
				netip.MustParseAddr("::ffff:10.0.0.1"), netip.MustParseAddr("2001:db8::1"),
				netip.MustParseAddr("fe80::1%eth0"), netip.MustParseAddr("fe80::1"),
			}
			probe := append(slices.Clone(addrs), netip.MustParseAddr("fe80::1%never"))
			kinds := []store.Kind{store.KindMap, store.KindPeer, store.KindNATPMP}
			base := time.Unix(1_700_000_000, 0).UTC()
			var pins []uint64
			randKey := func() store.Key {
				k := store.Key{Owner: owners[rnd.IntN(3)], InternalAddr: addrs[rnd.IntN(len(addrs))],
					Protocol: []uint8{6, 17}[rnd.IntN(2)], InternalPort: uint16(1 + rnd.IntN(3))}
				if rnd.IntN(3) == 0 {
					k.Remote = netip.AddrPortFrom(netip.MustParseAddr("192.0.2.9"), uint16(rnd.IntN(2)))
				}
				return k
			}
			for i := range 4000 {
				switch op := rnd.IntN(20); {
				case op < 9:
					k := randKey()
					l := store.Lease{Key: k, ExternalAddr: netip.MustParseAddr("198.51.100.1"), ExternalPort: uint16(1000 + rnd.IntN(5)),
						Kind: kinds[rnd.IntN(len(kinds))], Created: base, Expires: base.Add(time.Duration(rnd.IntN(100)) * time.Second)}
					if rnd.IntN(4) == 0 {
						l.Filters = []store.Filter{{Prefix: netip.MustParsePrefix("192.0.2.0/24"), Port: 80}}
					}
					tab.put(l)
				case op < 14:
					tab.del(randKey())
				case op < 15:
					tab.extend(randKey(), base.Add(time.Duration(rnd.IntN(100))*time.Second))
				case op < 16:
					for _, k := range tab.expired(base.Add(time.Duration(rnd.IntN(100)) * time.Second)) {
						if rnd.IntN(2) == 0 { // some swept, some left expired
							tab.del(k)
						}
					}
				case op < 18:
					pins = append(pins, tab.pin())
				case op < 19 && len(pins) > 0:
					j := rnd.IntN(len(pins))
					tab.unpin(pins[j])
					pins = slices.Delete(pins, j, j+1)
				case op < 20:
					if rnd.IntN(8) == 0 {
						tab.breakPins()
						pins = nil
					}
				}
				var walk []store.Lease
				for _, l := range tab.all() {
					walk = append(walk, *l)
				}
				for _, o := range owners {
					for _, a := range probe {
						for _, proto := range []uint8{6, 17} {
							var want []store.Lease
							for _, l := range walk {
								if l.Owner == o && l.InternalAddr == a && l.Protocol == proto && l.Kind != store.KindPeer {
									want = append(want, l)
								}
							}
							got := tab.mappingsOf(o, a, proto, nil)
							cmp := func(x, y store.Lease) int { return compareKeys(x.Key, y.Key) }
							slices.SortFunc(want, cmp)
							slices.SortFunc(got, cmp)
							if !slices.EqualFunc(got, want, func(x, y store.Lease) bool { return leaseEqual(&x, &y) }) {
								t.Fatalf("op %d: mappingsOf(%s, %v, %d): %d leases %v, the walk selects %d %v",
									i, o, a, proto, len(got), leaseKeys(got), len(want), leaseKeys(want))
							}
						}
					}
				}
			}
		})
	}
}

func leaseKeys(ls []store.Lease) []store.Key {
	ks := make([]store.Key, len(ls))
	for i := range ls {
		ks[i] = ls[i].Key
	}
	return ks
}
