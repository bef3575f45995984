package server

import (
	"net/netip"
	"runtime"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
	"github.com/pcpd/pcpd/store"
)

// BenchmarkStartRefused is BenchmarkStart at 1 000 000 stored leases with
// --deny-ports 22 and the given number of them on port 22: Start restores
// the others and takes those out (restore_policy.go: never in the table,
// their pinholes deleted in kernel batches, their keys out of the store).
// Connections are not kept (the daemon's default): the conntrack walk is
// replaced by a no-op, so the filters' memory is in the peak heap but no conntrack table is touched.
//
//	go test ./server -run '^$' -bench StartRefused -benchtime 1x
func BenchmarkStartRefused(b *testing.B) {
	netlab.RequireRoot(b)
	const n = 1_000_000
	for _, refused := range []int{0, 10_000, 100_000, n} {
		b.Run("refused="+itoa(refused), func(b *testing.B) {
			fw := lastingFirewall(b, "revpolst")
			own, err := policy.NewStatic(map[string][]netip.Prefix{"bench": {netip.MustParsePrefix("2001:db8::/32")}})
			if err != nil {
				b.Fatal(err)
			}
			pol, err := policy.New(policy.Config{MaxLeasesPerClient: 1 << 20, MaxLeases: 1 << 20,
				DenyPorts: []policy.PortRange{{First: 22, Last: 22}}}, own)
			if err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				st := servertest.NewStore()
				runtime.GC()
				var before, after runtime.MemStats
				runtime.ReadMemStats(&before)
				ls := startLeases(n, time.Now())
				for i := 0; i < refused; i++ {
					j := i * (n / refused)
					ls[j].InternalPort, ls[j].ExternalPort = 22, 22
				}
				state := store.State{Leases: ls, EpochOrigin: time.Now().Add(-time.Hour)}
				s, err := New(Config{RateLimit: 1e12, RateBurst: 1 << 30}, Deps{Firewall: fw, Store: st, State: state, Policy: pol}, zap.NewNop())
				if err != nil {
					b.Fatal(err)
				}
				s.ct.walk = func([]ctFilter) ([]ctFilter, error) { return nil, nil }
				stop := peakHeap()
				start := time.Now()
				if err := s.Start(); err != nil {
					b.Fatal(err)
				}
				took := time.Since(start)
				peak := stop()
				state.Leases = nil
				runtime.GC()
				runtime.ReadMemStats(&after)
				if got := s.tab.len(); got != n-refused {
					b.Fatalf("%d leases after start, want %d", got, n-refused)
				}
				b.ReportMetric(took.Seconds(), "s/start")
				b.ReportMetric(float64(peak)/1e6, "peakheapMB")
				b.ReportMetric(float64(after.HeapAlloc)/1e6, "afterheapMB")
				runtime.KeepAlive(s)
			}
		})
	}
}

// BenchmarkRefusedNow is the re-check restore adds per stored lease
// (restoring.add): one Authorize, as for a request, over the bench
// ownership (2001:db8::/32, one owner).
//
//	go test ./server -run '^$' -bench RefusedNow
func BenchmarkRefusedNow(b *testing.B) {
	own, err := policy.NewStatic(map[string][]netip.Prefix{"bench": {netip.MustParsePrefix("2001:db8::/32")}})
	if err != nil {
		b.Fatal(err)
	}
	pol, err := policy.New(policy.Config{DenyPorts: []policy.PortRange{{First: 22, Last: 22}}}, own)
	if err != nil {
		b.Fatal(err)
	}
	s := &Server{pol: pol}
	ls := startLeases(1<<16, time.Now())
	b.ResetTimer()
	i := 0
	for b.Loop() {
		if s.refusedNow(&ls[i&(len(ls)-1)]) != policy.Allowed {
			b.Fatal("refused")
		}
		i++
	}
}
