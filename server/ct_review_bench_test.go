package server

import (
	"bufio"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
	"github.com/pcpd/pcpd/store"
)

// BenchmarkStartExpired is a start after downtime: n stored leases, all
// expired while pcpd was down (IPv6 MAPs as startLeases, one inbound
// filter each), so Start drops them and queues their flush, and the real
// conntrack walk runs (in the namespace, on an empty conntrack table). It
// reports the peak heap and the peak RSS (VmHWM, reset before) from Start
// until the flush is done, and the stored leases' share (they are the
// caller's, as in BenchmarkStart). With keep, KeepConnections: no
// flush, the baseline.
//
//	flock /tmp/team/bench.lock go test ./server -run '^$' -bench StartExpired -benchtime 1x
func BenchmarkStartExpired(b *testing.B) {
	netlab.RequireRoot(b)
	for _, c := range []struct {
		n    int
		keep bool // KeepConnections: no flush, the baseline
	}{{100_000, false}, {1_000_000, false}, {1_000_000, true}} {
		n := c.n
		name := "leases=" + itoa(n)
		if c.keep {
			name += "/keep"
		}
		b.Run(name, func(b *testing.B) {
			fw, h := lastingFirewallNS(b, "revctx")
			own, err := policy.NewStatic(map[string][]netip.Prefix{"bench": {netip.MustParsePrefix("2001:db8::/32")}})
			if err != nil {
				b.Fatal(err)
			}
			pol, err := policy.New(policy.Config{MaxLeasesPerClient: 1 << 20, MaxLeases: 1 << 20}, own)
			if err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				runtime.GC()
				var base runtime.MemStats
				runtime.ReadMemStats(&base)
				ls := startLeases(n, time.Now().Add(-2*time.Hour))
				runtime.GC()
				var withLeases runtime.MemStats
				runtime.ReadMemStats(&withLeases)
				state := store.State{Leases: ls, EpochOrigin: time.Now().Add(-3 * time.Hour)}
				s, err := New(Config{RateLimit: 1e12, RateBurst: 1 << 30, NetNS: h, KeepConnections: c.keep}, Deps{Firewall: fw, Store: servertest.NewStore(), State: state, Policy: pol}, zap.NewNop())
				if err != nil {
					b.Fatal(err)
				}
				walks := 0
				walk := s.ct.walk
				s.ct.walk = func(fs []ctFilter) ([]ctFilter, error) { walks++; return walk(fs) }
				resetHWM(b)
				rss0 := vmKB(b, "VmRSS:")
				stop := peakHeap()
				start := time.Now()
				if err := s.Start(); err != nil {
					b.Fatal(err)
				}
				s.waitConntrack()
				took := time.Since(start)
				peak := stop()
				hwm := vmKB(b, "VmHWM:")
				if walks == 0 && !c.keep || s.tab.len() != 0 {
					b.Fatalf("%d walks, %d leases left", walks, s.tab.len())
				}
				b.ReportMetric(took.Seconds(), "s/start+flush")
				b.ReportMetric(float64(peak)/1e6, "peakheapMB")
				b.ReportMetric(float64(withLeases.HeapAlloc-base.HeapAlloc)/1e6, "storedleasesMB")
				b.ReportMetric(float64(hwm)/1e3, "peakrssMB")
				b.ReportMetric(float64(hwm-rss0)/1e3, "rssgrowthMB")
				runtime.KeepAlive(ls)
				state.Leases, s.deps.State.Leases = nil, nil
			}
		})
	}
}

// resetHWM resets the process's peak RSS (VmHWM) to its current RSS.
func resetHWM(b *testing.B) {
	if err := os.WriteFile("/proc/self/clear_refs", []byte("5"), 0); err != nil {
		b.Fatal(err)
	}
}

// vmKB is a /proc/self/status field in kB.
func vmKB(b *testing.B, field string) int {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), field); ok {
			n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(rest), " kB"))
			if err != nil {
				b.Fatal(err)
			}
			return n
		}
	}
	b.Fatalf("no %s", field)
	return 0
}
