package server

import (
	"cmp"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
)

// BenchmarkExpiryFlush (root): the cost of an expiry that ends `leases`
// leases at once (NAT-PMP IPv4 or PCP MAP IPv6) in a namespace whose
// conntrack holds one inbound flow per lease (matching: 0 or 1) and
// `unrelated` other TCP flows of the family (IPv4: outbound flows
// masqueraded to the external address, what the SNAT dump must skip;
// IPv6: flows to another host, which the IPv6 dump cannot filter out in
// the kernel). Timed: the expiry (what the engine holds s.mu for) and the
// conntrack walk, which runs beside it. Reported: expire-ms (engine),
// walk-ms, and the requests the engine answered while the walk ran, with
// the slowest (max-req-ms). Checked: every matching flow gone, every
// unrelated one kept.
func BenchmarkExpiryFlush(b *testing.B) {
	for _, fam := range []string{"v4", "v6"} {
		for _, matching := range []bool{false, true} {
			b.Run(fmt.Sprintf("%s/leases=10000/unrelated=10000/matching=%v", fam, matching), func(b *testing.B) {
				benchExpiryFlush(b, fam == "v4", 10000, 10000, matching, false, false, false)
			})
		}
		// The expiry alone, as before the flush (KeepConnections).
		b.Run(fmt.Sprintf("%s/leases=10000/unrelated=10000/matching=true/keep", fam), func(b *testing.B) {
			benchExpiryFlush(b, fam == "v4", 10000, 10000, true, true, false, false)
		})
		// PEERs (their end flushes since h/peerend, issue 9), each
		// with a flow from its remote.
		b.Run(fmt.Sprintf("%speer/leases=10000/unrelated=10000/matching=true", fam), func(b *testing.B) {
			benchExpiryFlush(b, fam == "v4", 10000, 10000, true, false, false, true)
		})
	}
	// IPv6 all-ports MAPs (wildcard filters, h/ctall): every flow found
	// is asked about under s.mu (spareLive; since h/holder every
	// filter's are).
	b.Run("v6allports/leases=10000/unrelated=10000/matching=true", func(b *testing.B) {
		benchExpiryFlush(b, false, 10000, 10000, true, false, true, false)
	})
}

// BenchmarkExpireNothingDue: the engine's expiry check with 10 000 leases
// and none due, what every expiry timer, batch and flush runs first: the
// flush adds nothing to it.
func BenchmarkExpireNothingDue(b *testing.B) {
	fw, st := servertest.NewFirewall(time.Now), servertest.NewStore()
	s := benchServer(b, fw, st, st.State())
	for j := 0; j < 10000; j += 64 {
		s.HandleBatch(requests(64, j))
	}
	b.ReportAllocs()
	for b.Loop() {
		s.expire()
	}
}

// With allPorts, the IPv6 leases are all-ports MAPs, their flows to port
// 443. With peer, the leases are PCP PEERs (IPv4 or IPv6), each flow from
// its remote.
func benchExpiryFlush(b *testing.B, v4 bool, leases, unrelated int, matching, keep, allPorts, peer bool) {
	netlab.RequireRoot(b)
	var expireD, walkD, maxReq time.Duration
	var answered int64
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		ns := netlab.NewNS(b, "ctexpb")
		h, err := ns.Handle()
		if err != nil {
			b.Fatal(err)
		}
		nh, err := netlink.NewHandleAt(h)
		if err != nil {
			b.Fatal(err)
		}
		own, err := policy.NewStatic(map[string][]netip.Prefix{"bench": {netip.MustParsePrefix("2001:db8::/32"), netip.MustParsePrefix("10.0.0.0/8")}})
		if err != nil {
			b.Fatal(err)
		}
		pol, err := policy.New(policy.Config{MaxLeasesPerClient: 1 << 20, MaxLeases: 1 << 20, MinLifetime: time.Minute, AllowAllPorts: allPorts}, own)
		if err != nil {
			b.Fatal(err)
		}
		clock := &fakeClock{t: time.Date(2026, 12, 4, 23, 0, 0, 0, time.UTC)}
		fw, st := servertest.NewFirewall(clock.Now), servertest.NewStore()
		s, err := New(Config{ExternalIPv4: ext4, NetNS: h, RateLimit: 1e12, RateBurst: 1 << 30, KeepConnections: keep},
			Deps{Firewall: fw, Store: st, State: st.State(), Policy: pol, Now: clock.Now}, zap.NewNop())
		if err != nil {
			b.Fatal(err)
		}
		if err := s.Start(); err != nil {
			b.Fatal(err)
		}
		// The leases, by requests of 64.
		var reqs []Request
		for j := range leases {
			if peer {
				a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, 14: byte(j >> 8), 15: byte(j)})
				rem, local := netip.AddrPortFrom(netip.MustParseAddr("2001:db8:ffff::9"), uint16(10000+j)), local6
				if v4 {
					a = netip.AddrFrom4([4]byte{10, 1, byte(j >> 8), byte(j)})
					rem, local = netip.AddrPortFrom(netip.MustParseAddr("203.0.113.9"), uint16(10000+j)), local4
				}
				reqs = append(reqs, Request{Local: local, Source: netip.AddrPortFrom(a, 5000), Data: pcp.AppendRequest(nil, peerReq(a, pcp.ProtoTCP, 443, rem, time.Minute, 1))})
				continue
			}
			if v4 {
				a := netip.AddrFrom4([4]byte{10, 1, byte(j >> 8), byte(j)})
				data := pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: pcp.PMPOpMapTCP, InternalPort: 8080, Lifetime: time.Minute})
				reqs = append(reqs, Request{Local: local4, Source: netip.AddrPortFrom(a, 5000), Data: data})
			} else {
				a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, 14: byte(j >> 8), 15: byte(j)})
				port := uint16(443)
				if allPorts {
					port = 0
				}
				reqs = append(reqs, Request{Local: local6, Source: netip.AddrPortFrom(a, 5000), Data: pcp.AppendRequest(nil, mapReq(a, pcp.ProtoTCP, port, port, time.Minute, 1))})
			}
		}
		for j := 0; j < len(reqs); j += 64 {
			for k, r := range s.HandleBatch(reqs[j:min(j+64, len(reqs))]) {
				if len(r) < 4 || r[3] != 0 {
					b.Fatalf("request %d: % x", j+k, r)
				}
			}
		}
		ls := s.Leases()
		if len(ls) != leases {
			b.Fatalf("%d leases, want %d", len(ls), leases)
		}
		// The conntrack entries.
		fam := netlink.InetFamily(netlink.FAMILY_V6)
		if v4 {
			fam = netlink.FAMILY_V4
		}
		flow := func(src, dst netip.AddrPort, rsrc, rdst netip.AddrPort) *netlink.ConntrackFlow {
			f := &netlink.ConntrackFlow{FamilyType: uint8(fam), TimeOut: 3600}
			f.Forward = netlink.IPTuple{Protocol: protoTCP, SrcIP: net.IP(src.Addr().AsSlice()), SrcPort: src.Port(), DstIP: net.IP(dst.Addr().AsSlice()), DstPort: dst.Port()}
			f.Reverse = netlink.IPTuple{Protocol: protoTCP, SrcIP: net.IP(rsrc.Addr().AsSlice()), SrcPort: rsrc.Port(), DstIP: net.IP(rdst.Addr().AsSlice()), DstPort: rdst.Port()}
			return f
		}
		create := func(f *netlink.ConntrackFlow) {
			if err := nh.ConntrackCreate(netlink.ConntrackTable, fam, f); err != nil {
				b.Fatalf("create %s: %v", f, err)
			}
		}
		for j := range unrelated {
			if v4 {
				in := netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 200, byte(j >> 8), byte(j)}), 30000)
				rem := netip.MustParseAddrPort("203.0.113.1:443")
				create(flow(in, rem, rem, netip.AddrPortFrom(ext4, uint16(20000+j))))
			} else {
				in := netip.AddrPortFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 2, 14: byte(j >> 8), 15: byte(j)}), 30000)
				rem := netip.MustParseAddrPort("[2001:db8:ffff::1]:443")
				create(flow(in, rem, rem, in))
			}
		}
		if matching {
			j := 0
			for _, l := range ls {
				rem := netip.AddrPortFrom(netip.MustParseAddr("203.0.113.9"), uint16(10000+j))
				if !v4 {
					rem = netip.AddrPortFrom(netip.MustParseAddr("2001:db8:ffff::9"), uint16(10000+j))
				}
				if peer {
					rem = l.Remote
				}
				ext := netip.AddrPortFrom(l.ExternalAddr, cmp.Or(l.ExternalPort, 443))
				in := netip.AddrPortFrom(l.InternalAddr, cmp.Or(l.InternalPort, 443))
				create(flow(rem, ext, in, rem))
				j++
			}
		}
		// Requests answered meanwhile: renewals of one more client's
		// mapping (not due), one at a time.
		extra := netip.MustParseAddr("2001:db8:2::1")
		req := []Request{{Local: local6, Source: netip.AddrPortFrom(extra, 5000), Data: pcp.AppendRequest(nil, mapReq(extra, pcp.ProtoTCP, 443, 443, time.Hour, 1))}}
		s.HandleBatch(req)
		clock.Advance(2 * time.Minute)
		walksBefore := s.ct.seq()
		b.StartTimer()
		t0 := time.Now()
		s.expire()
		t1 := time.Now()
		stop := make(chan struct{})
		done := make(chan struct{})
		var n int64
		var slowest time.Duration
		go func() {
			defer close(done)
			for {
				select {
				case <-stop:
					return
				default:
				}
				r0 := time.Now()
				if r := s.HandleBatch(req); r[0][3] != 0 {
					panic(fmt.Sprintf("renewal: % x", r[0]))
				}
				slowest = max(slowest, time.Since(r0))
				n++
			}
		}()
		s.waitConntrack()
		t2 := time.Now()
		close(stop)
		<-done
		b.StopTimer()
		if (s.ct.seq() == walksBefore) != keep {
			b.Fatalf("flush queued: %v, KeepConnections %v", s.ct.seq() != walksBefore, keep)
		}
		if left := len(s.Leases()); left != 1 {
			b.Fatalf("%d leases left, want 1", left)
		}
		expireD += t1.Sub(t0)
		walkD += t2.Sub(t1)
		maxReq = max(maxReq, slowest)
		answered += n
		left, err := nh.ConntrackTableList(netlink.ConntrackTable, fam)
		if err != nil {
			b.Fatal(err)
		}
		want := unrelated
		if keep && matching {
			want += leases
		}
		if len(left) != want {
			b.Fatalf("%d flows left, want %d", len(left), want)
		}
		nh.Close()
		h.Close()
		ns.Close()
	}
	b.ReportMetric(float64(expireD.Microseconds())/1e3/float64(b.N), "expire-ms")
	b.ReportMetric(float64(walkD.Microseconds())/1e3/float64(b.N), "walk-ms")
	b.ReportMetric(float64(answered)/float64(b.N), "reqs-during-walk")
	b.ReportMetric(float64(maxReq.Microseconds())/1e3, "max-req-ms")
}
