package server

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/server/servertest"
)

// BenchmarkSpareLive (h/holder): what the flusher's walk adds per flow it
// found since it asks the live leases about every flow (spareLive, under
// s.mu a chunk at a time), not only a wildcard filter's: ns per flow
// (hit), for flows to the endpoints of `leases` live IPv6 MAPs (each kept)
// and to endpoints no lease holds (the expiry case: each ended). Before
// h/holder an exact filter's flow cost a lookup in a map of what was held
// at the end (nil when nothing was).
func BenchmarkSpareLive(b *testing.B) {
	const leases = 10000
	fw, st := servertest.NewFirewall(time.Now), servertest.NewStore()
	s := benchServer(b, fw, st, st.State())
	rem := netip.MustParseAddrPort("[2001:db8:ffff::9]:40000")
	addr := func(i int) netip.Addr {
		return netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, 14: byte(i >> 8), 15: byte(i)})
	}
	for j, rs := 0, requests(leases, 0); j < len(rs); j += 64 {
		for k, r := range s.HandleBatch(rs[j:min(j+64, len(rs))]) {
			if len(r) < 4 || r[3] != 0 {
				b.Fatalf("request %d: % x", j+k, r)
			}
		}
	}
	for _, c := range []struct {
		name string
		port uint16
		keep bool
	}{{"live", 443, true}, {"ended", 444, false}} {
		b.Run(fmt.Sprintf("%s/leases=%d", c.name, leases), func(b *testing.B) {
			hs := make([]ctHit, leases)
			for i := range hs {
				t := ctTarget{addr: addr(i), proto: protoTCP, port: c.port}
				hs[i] = ctHit{t: t, src: rem, to: t.dst()}
			}
			stop := lockWaits(s) // review h/revholder
			b.ResetTimer()
			for range b.N {
				s.spareLive(hs)
			}
			b.StopTimer()
			b.ReportMetric(float64(stop().Microseconds()), "us-max-lock-wait")
			for _, x := range hs {
				if x.keep != c.keep {
					b.Fatalf("%v kept %v, want %v", x.t, x.keep, c.keep)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(hs)), "ns/flow")
		})
	}
}
