package server

import (
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/server/servertest"
)

// BenchmarkSpareLivePeers (review h/revholder): the engine lock a chunk
// of the flusher's walk holds (spareLive: 4096 flows, one hold of s.mu)
// when the flows' endpoints are held by many PEERs (one client's PEERs
// share its internal endpoint, up to its quota) and no lease admits the
// flows (each asks every pinhole). ns per chunk is one hold of s.mu.
// "alternating": the flows of two such endpoints interleaved, as a
// dump's hash order gives them.
func BenchmarkSpareLivePeers(b *testing.B) {
	for _, peers := range []int{16, 256} {
		fw, st := servertest.NewFirewall(time.Now), servertest.NewStore()
		s := benchServer(b, fw, st, st.State())
		clients := []netip.Addr{netip.MustParseAddr("2001:db8:2::1"), netip.MustParseAddr("2001:db8:2::2")}
		for _, c := range clients {
			for k := 0; k < peers; k += 64 {
				var rs []Request
				for j := k; j < min(k+64, peers); j++ {
					rem := netip.AddrPortFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0xff, 0xff, 14: byte(j >> 8), 15: byte(j)}), 40000)
					r := peerReq(c, pcp.ProtoTCP, 443, rem, time.Hour, 1)
					rs = append(rs, Request{Local: local6, Source: netip.AddrPortFrom(c, 5000), Data: pcp.AppendRequest(nil, r)})
				}
				for i, r := range s.HandleBatch(rs) {
					if len(r) < 4 || r[3] != 0 {
						b.Fatalf("PEER %d: % x", k+i, r)
					}
				}
			}
		}
		rem := netip.MustParseAddrPort("[2001:db8:eeee::1]:1234") // admitted by none
		for _, alt := range []bool{false, true} {
			b.Run(fmt.Sprintf("peers=%d/alternating=%v", peers, alt), func(b *testing.B) {
				hs := make([]ctHit, 4096)
				for i := range hs {
					c := clients[0]
					if alt {
						c = clients[i&1]
					}
					t := ctTarget{addr: c, proto: protoTCP, port: 443}
					hs[i] = ctHit{t: t, src: rem, to: t.dst()}
				}
				stop := lockWaits(s)
				b.ResetTimer()
				for range b.N {
					s.spareLive(hs)
				}
				b.StopTimer()
				b.ReportMetric(float64(stop().Microseconds()), "us-max-lock-wait")
				for _, h := range hs {
					if h.keep {
						b.Fatalf("%v kept", h)
					}
				}
				b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N), "us/chunk")
			})
		}
	}
}

// lockWaits measures, until the returned func is called, the longest a
// goroutine waited for s.mu (taken every 100 µs): the engine's stall
// while spareLive runs beside it.
func lockWaits(s *Server) func() time.Duration {
	var wg sync.WaitGroup
	done := make(chan struct{})
	var worst time.Duration
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-done:
				return
			default:
			}
			t0 := time.Now()
			s.mu.Lock()
			worst = max(worst, time.Since(t0))
			s.mu.Unlock()
			time.Sleep(100 * time.Microsecond)
		}
	}()
	return func() time.Duration {
		close(done)
		wg.Wait()
		return worst
	}
}
