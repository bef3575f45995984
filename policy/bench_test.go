package policy

import (
	"context"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"syscall"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// benchPeers returns n peers like a busy tunnel host's: each owns a /64 (one
// in eight a /56) under 2001:db8::/32 and one IPv4 /32 under 10.0.0.0/8,
// and a sample of requests from them.
func benchPeers(n int) (*devices, []Request) {
	r := rand.New(rand.NewPCG(5, 6))
	var peers []wgtypes.Peer
	var reqs []Request
	for i := range n {
		var b [16]byte
		copy(b[:], []byte{0x20, 0x01, 0x0d, 0xb8})
		b[4], b[5], b[6] = byte(i>>8), byte(i), byte(r.IntN(256))
		bits := 64
		if i%8 == 0 {
			bits, b[7] = 56, 0
		} else {
			b[7] = byte(r.IntN(256))
		}
		v6 := netip.PrefixFrom(netip.AddrFrom16(b), bits).Masked()
		v4 := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		peers = append(peers, wgtypes.Peer{PublicKey: testKey(i), AllowedIPs: []net.IPNet{
			{IP: v6.Addr().AsSlice(), Mask: net.CIDRMask(bits, 128)},
			{IP: v4.AsSlice(), Mask: net.CIDRMask(32, 32)},
		}})
		host := v6.Addr().As16()
		host[15] = byte(r.IntN(255) + 1)
		src := netip.AddrFrom16(host)
		host[14] = byte(r.IntN(256))
		reqs = append(reqs,
			Request{Source: src, Iface: "wg0", Target: src, Protocol: 6, InternalPort: 443},
			Request{Source: src, Iface: "wg0", Target: netip.AddrFrom16(host), ThirdParty: true, Protocol: 17, InternalPort: 5000},
			Request{Source: v4, Iface: "wg0", Target: v4, Protocol: 6, InternalPort: 8080})
	}
	d := &devices{}
	d.set("wg0", peers...)
	return d, reqs
}

// cpuClock reports the process's CPU time per operation next to ns/op:
// on a shared machine wall time counts the time other processes hold the
// CPU; CPU time does not.
func cpuClock(b *testing.B) func() {
	cpu := func() time.Duration {
		var ru syscall.Rusage
		if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
			b.Fatal(err)
		}
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	start := cpu()
	return func() { b.ReportMetric(float64(cpu()-start)/float64(b.N), "cpu-ns/op") }
}

// benchAuthorizeAllowed times Authorize over reqs (shuffled), every one
// of which must be Allowed by a policy on w that takes ::1 as the host's
// address, with allocations and CPU time per request reported.
func benchAuthorizeAllowed(b *testing.B, w Ownership, reqs []Request) {
	b.Helper()
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

// BenchmarkAuthorize10kPeers is the per-request authorization cost with
// 10 000 WireGuard peers (target ≤ 200 ns, 0 allocs).
func BenchmarkAuthorize10kPeers(b *testing.B) {
	d, reqs := benchPeers(10_000)
	w, err := newWireGuard(d, []string{"wg0"}, 0, nil)
	if err != nil {
		b.Fatal(err)
	}
	benchAuthorizeAllowed(b, w, reqs)
}

// BenchmarkAuthorize10kPeersDenied: requests for another peer's address.
func BenchmarkAuthorize10kPeersDenied(b *testing.B) {
	d, reqs := benchPeers(10_000)
	w, err := newWireGuard(d, []string{"wg0"}, 0, nil)
	if err != nil {
		b.Fatal(err)
	}
	p, err := New(Config{}, w)
	if err != nil {
		b.Fatal(err)
	}
	for i := range reqs {
		reqs[i].Target = reqs[(i+3)%len(reqs)].Target
		reqs[i].ThirdParty = true
	}
	rand.New(rand.NewPCG(7, 8)).Shuffle(len(reqs), func(i, j int) { reqs[i], reqs[j] = reqs[j], reqs[i] })
	b.ReportAllocs()
	done := cpuClock(b)
	for i := 0; b.Loop(); i++ {
		if _, r := p.Authorize(reqs[i%len(reqs)]); r != NotOwned {
			b.Fatal(r)
		}
	}
	done()
}

// BenchmarkRefresh10kPeers is the cost of one periodic re-read that finds
// nothing changed (wgctrl's own cost aside): compare and keep the table.
func BenchmarkRefresh10kPeers(b *testing.B) {
	d, _ := benchPeers(10_000)
	w, err := newWireGuard(d, []string{"wg0"}, 0, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if err := w.Refresh(context.Background()); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRefresh10kPeersChanged: one peer's AllowedIPs change on every
// re-read: rebuild the table, diff it, deliver the Change.
func BenchmarkRefresh10kPeersChanged(b *testing.B) {
	d, _ := benchPeers(10_000)
	w, err := newWireGuard(d, []string{"wg0"}, 0, nil)
	if err != nil {
		b.Fatal(err)
	}
	full := slices.Clone(d.peers["wg0"])
	shrunk := slices.Clone(full)
	shrunk[0].AllowedIPs = shrunk[0].AllowedIPs[:1]
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		if i%2 == 0 {
			d.set("wg0", shrunk...)
		} else {
			d.set("wg0", full...)
		}
		if err := w.Refresh(context.Background()); err != nil {
			b.Fatal(err)
		}
		for len(w.Changes()) > 0 {
			<-w.Changes()
		}
	}
}

// BenchmarkAuthorize10kPeersManyLengths: peers' IPv6 prefixes use more than
// maxHashLengths lengths, so lookups fall back to the interval search.
func BenchmarkAuthorize10kPeersManyLengths(b *testing.B) {
	d, reqs := benchPeers(10_000)
	peers := d.peers["wg0"]
	for i := range peers {
		n := 48 + i%17 // /48 … /64
		peers[i].AllowedIPs[0].Mask = net.CIDRMask(n, 128)
		peers[i].AllowedIPs[0].IP = peers[i].AllowedIPs[0].IP.Mask(peers[i].AllowedIPs[0].Mask)
	}
	// Shorter prefixes now nest; keep only requests whose peer still owns them.
	w, err := newWireGuard(d, []string{"wg0"}, 0, nil)
	if err != nil {
		b.Fatal(err)
	}
	if w.current().len6 != nil {
		b.Fatal("hashed lookup still in use")
	}
	p, err := New(Config{}, w)
	if err != nil {
		b.Fatal(err)
	}
	reqs = slices.DeleteFunc(reqs, func(r Request) bool { _, reason := p.Authorize(r); return reason != Allowed })
	rand.New(rand.NewPCG(7, 8)).Shuffle(len(reqs), func(i, j int) { reqs[i], reqs[j] = reqs[j], reqs[i] })
	b.ReportAllocs()
	done := cpuClock(b)
	for i := 0; b.Loop(); i++ {
		if _, r := p.Authorize(reqs[i%len(reqs)]); r != Allowed {
			b.Fatal(r)
		}
	}
	done()
}
