package server

import (
	"fmt"
	"net/netip"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
)

// BenchmarkCtAllProtoWalk (root; BENCHMARKS.md, h/allproto): one
// kernel-filtered walk (walkCt) ending an IPv6 all-protocols mapping's
// flows (the group of protocol 0: the kernel cannot filter it, so its dump
// is the family's whole table) as the flusher runs it (live: every matched
// flow asked of the live leases), in a namespace whose table holds 100 000
// unrelated IPv6 UDP entries and `ended` entries (TCP and UDP, alternate)
// to the mapping's address, which the walk deletes (remade before each
// walk, untimed). Reported: ms a walk, bytes and allocations a walk, and
// flows ended a walk.
func BenchmarkCtAllProtoWalk(b *testing.B) {
	const unrelated = 100000
	for _, ended := range []int{0, 1000} {
		b.Run(fmt.Sprintf("unrelated=%d/ended=%d", unrelated, ended), func(b *testing.B) {
			netlab.RequireRoot(b)
			ns := netlab.NewNS(b, "ctallb")
			ns.MustRun(b, "sysctl", "-qw", "net.netfilter.nf_conntrack_max="+strconv.Itoa(2*(unrelated+ended)))
			src6, dst6 := netip.MustParseAddr("2001:db8:ff::1").As16(), netip.MustParseAddr("2001:db8:fe::1")
			netlab.FillConntrack(b, ns, unrelated, func(i int) netlab.ConntrackEntry {
				s := src6
				s[14], s[15] = byte(i/60000>>8), byte(i/60000)
				return netlab.ConntrackEntry{Proto: unix.IPPROTO_UDP, Src: netip.AddrPortFrom(netip.AddrFrom16(s), uint16(1024+i%60000)),
					Dst: netip.AddrPortFrom(dst6, 53), Status: 2 | 4}
			})
			h, err := ns.Handle()
			if err != nil {
				b.Fatal(err)
			}
			defer h.Close()
			s := walkBenchServer(b, Config{NetNS: h}, "2001:db8:1::/48")
			defer s.ctSock.close()
			addr := netip.MustParseAddr("2001:db8:1::7")
			fs := []ctFilter{{t: ctTarget{addr: addr}}} // all protocols, all ports
			fill := func() {
				netlab.FillConntrack(b, ns, ended, func(i int) netlab.ConntrackEntry {
					rem := netip.AddrPortFrom(netip.MustParseAddr("2001:db8:ff::2"), uint16(1024+i))
					proto := uint8(unix.IPPROTO_TCP)
					if i%2 == 1 {
						proto = unix.IPPROTO_UDP
					}
					return netlab.ConntrackEntry{Proto: proto, Src: rem, Dst: netip.AddrPortFrom(addr, uint16(2000+i%7)), Status: 2 | 4}
				})
			}
			total := 0
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				fill()
				before := netlab.ConntrackCount(b, ns)
				b.StartTimer()
				left, err := s.walkLive(slicesClone(fs))
				b.StopTimer()
				if err != nil || len(left) > 0 {
					b.Fatalf("walk: %d filters left, %v", len(left), err)
				}
				total += before - netlab.ConntrackCount(b, ns)
				b.StartTimer()
			}
			b.StopTimer()
			b.ReportMetric(float64(b.Elapsed().Microseconds())/1e3/float64(b.N), "ms/walk")
			b.ReportMetric(float64(total)/float64(b.N), "ended/walk")
			if total != ended*b.N {
				b.Fatalf("ended %d flows in %d walks, want %d a walk", total, b.N, ended)
			}
		})
	}
}
