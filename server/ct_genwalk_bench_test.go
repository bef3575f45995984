package server

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
)

// BenchmarkCtGenericWalk (root; BENCHMARKS.md, h/genwalk): one generic
// walk (walkConntrackGeneric: kernels without CTA_FILTER, one unfiltered
// dump per family, filtered here) as the flusher runs it (live: every
// matched flow asked of the live leases), in a namespace whose table
// holds 100 000 unrelated UDP flows (half IPv4, half IPv6) and `ended`
// TCP flows to an ended IPv4 mapping's endpoint, which the walk deletes
// (recreated before each walk, untimed). Its filters are that endpoint's
// and an IPv6 one's that matches nothing, so both families are dumped.
// Reported: ms a walk, allocations, and flows ended a walk.
func BenchmarkCtGenericWalk(b *testing.B) {
	for _, ended := range []int{0, 1000} {
		b.Run(fmt.Sprintf("unrelated=100000/ended=%d", ended), func(b *testing.B) {
			netlab.RequireRoot(b)
			ns := netlab.NewNS(b, "ctgenb")
			netlab.FillConntrackUnrelated(b, ns, 100000)
			h, err := ns.Handle()
			if err != nil {
				b.Fatal(err)
			}
			defer h.Close()
			s := walkBenchServer(b, Config{ExternalIPv4: ext4, NetNS: h}, "10.0.0.0/8")
			defer s.ctSock.close()
			ext := netip.AddrPortFrom(ext4, 7000)
			fs := []ctFilter{
				{v4: true, t: ctTarget{addr: ext.Addr(), proto: protoTCP, port: ext.Port()}},
				{t: ctTarget{addr: netip.MustParseAddr("2001:db8:1::7"), proto: protoTCP, port: 7000}},
			}
			cli := netip.AddrPortFrom(netip.MustParseAddr("10.1.0.7"), 7000)
			fill := func() {
				netlab.FillConntrack(b, ns, ended, func(i int) netlab.ConntrackEntry {
					rem := netip.AddrPortFrom(netip.AddrFrom4([4]byte{203, 0, 113, byte(i / 60000)}), uint16(1024+i%60000))
					return netlab.ConntrackEntry{Proto: unix.IPPROTO_TCP, Src: rem, Dst: ext, DNAT: cli, Status: 2 | 4}
				})
			}
			timeWalks(b, ns, ended, fill, func() ([]ctFilter, error) { return s.walkConntrackGeneric(slicesClone(fs), nil, true) })
		})
	}
}

// timeWalks times walk b.N times, each over the table's entries to end
// remade first by fill (untimed), and reports ms and flows ended a walk:
// each walk must leave no filter and end them all (ended a walk).
func timeWalks(b *testing.B, ns *netlab.NS, ended int, fill func(), walk func() ([]ctFilter, error)) {
	total := 0
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		fill()
		before := netlab.ConntrackCount(b, ns)
		b.StartTimer()
		left, err := walk()
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
}

func slicesClone(fs []ctFilter) []ctFilter { return append([]ctFilter(nil), fs...) }

// walkBenchServer is a started Server over a fake firewall and store,
// owning prefix for one client, with its conntrack walk's socket open as
// while serving (the caller closes it): what the walk benchmarks run.
func walkBenchServer(b *testing.B, cfg Config, prefix string) *Server {
	own, err := policy.NewStatic(map[string][]netip.Prefix{"bench": {netip.MustParsePrefix(prefix)}})
	if err != nil {
		b.Fatal(err)
	}
	pol, err := policy.New(policy.Config{MinLifetime: time.Minute}, own)
	if err != nil {
		b.Fatal(err)
	}
	fw, st := servertest.NewFirewall(time.Now), servertest.NewStore()
	s, err := New(cfg, Deps{Firewall: fw, Store: st, State: st.State(), Policy: pol}, zap.NewNop())
	if err != nil {
		b.Fatal(err)
	}
	if err := s.Start(); err != nil {
		b.Fatal(err)
	}
	s.ctSock.open()
	return s
}
