package policy

import (
	"testing"
)

// BenchmarkAuthorize10kPeersTwoInterfaces is BenchmarkAuthorize10kPeers
// with the peers split over two served interfaces, every request arriving
// on its peer's: table.findOn's second lookup, in the interface's
// sub-table, that one interface skips (table.only). Review of the F3 fix
// (h/revown).
func BenchmarkAuthorize10kPeersTwoInterfaces(b *testing.B) {
	d, reqs := benchPeers(10_000)
	peers := d.peers["wg0"]
	d.set("wg0", peers[:len(peers)/2]...)
	d.set("wg1", peers[len(peers)/2:]...)
	for i := range reqs {
		if i/3 >= len(peers)/2 { // benchPeers: three requests a peer, in peer order
			reqs[i].Iface = "wg1"
		}
	}
	w, err := newWireGuard(d, []string{"wg0", "wg1"}, 0, nil)
	if err != nil {
		b.Fatal(err)
	}
	benchAuthorizeAllowed(b, w, reqs)
}
