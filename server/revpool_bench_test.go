package server

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/store"
)

// BenchmarkOneAddressDeleteAll (review h/revpool): n leases of one
// internal IPv4 address (one client's, its quota raised; PEERs to many
// remotes), put and then deleted oldest first, as an expiry or a
// revocation of them all does. byIn4's delete (in4Del) looks the slot up
// in the address's list: each delete is O(leases of the address).
func BenchmarkOneAddressDeleteAll(b *testing.B) {
	for _, n := range []int{1024, 16384, 65536} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			now := time.Unix(1e9, 0)
			ls := make([]store.Lease, n)
			for i := range ls {
				ls[i] = store.Lease{
					Key: store.Key{Owner: ownerA, Protocol: protoUDP, InternalAddr: v4A, InternalPort: 5000,
						Remote: netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, byte(i >> 16), byte(i >> 8)}), uint16(1+i&255))},
					Kind: store.KindPeer, ExternalAddr: ext4, ExternalPort: 5000, Created: now, Expires: now.Add(time.Hour),
				}
			}
			for b.Loop() {
				b.StopTimer()
				tab := newTable()
				for i := range ls {
					tab.insert(&ls[i])
				}
				b.StartTimer()
				for i := range ls {
					tab.del(ls[i].Key)
				}
			}
		})
	}
}
