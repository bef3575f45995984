package policy

import (
	"math/rand/v2"
	"net/netip"
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
	p, err := New(Config{HostAddrs: func(a netip.Addr) bool { return a == netip.IPv6Loopback() }}, w)
	if err != nil {
		b.Fatal(err)
	}
	rand.New(rand.NewPCG(7, 8)).Shuffle(len(reqs), func(i, j int) { reqs[i], reqs[j] = reqs[j], reqs[i] })
	for _, r := range reqs {
		if _, reason := p.Authorize(r); reason != Allowed {
			b.Fatalf("%+v: %v", r, reason)
		}
	}
	b.ReportAllocs()
	b.ResetTimer()
	done := cpuClock(b)
	for i := 0; b.Loop(); i++ {
		if _, r := p.Authorize(reqs[i%len(reqs)]); r != Allowed {
			b.Fatal(r)
		}
	}
	done()
}
