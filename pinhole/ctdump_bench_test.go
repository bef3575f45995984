package pinhole_test

import (
	"bufio"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// ctEntry is a conntrack entry ctFill creates: orig tuple src → dst,
// reply from replySrc (dst unless DNAT-ed) to src, with status and labels
// (ICMPv6: an echo request's, its ports unused).
type ctEntry struct {
	proto         uint8
	src, dst      netip.AddrPort
	replySrc      netip.AddrPort
	status        uint32
	labels        []byte
	timeoutSecond uint32
}

// ctFill creates the entries gen makes for 0 ≤ i < n in ns
// (netlab.FillConntrack).
func ctFill(tb testing.TB, ns *netlab.NS, n int, gen func(i int) ctEntry) {
	tb.Helper()
	netlab.FillConntrack(tb, ns, n, func(i int) netlab.ConntrackEntry {
		e := gen(i)
		return netlab.ConntrackEntry{Proto: e.proto, Src: e.src, Dst: e.dst, ReplySrc: e.replySrc,
			Status: e.status, Labels: e.labels, TimeoutSecond: e.timeoutSecond}
	})
}

// memStatus reads a "kB" field of /proc/self/status in MB.
func memStatus(tb testing.TB, field string) float64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), field+":"); ok {
			kb, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			if err != nil {
				tb.Fatal(err)
			}
			return float64(kb) / 1024
		}
	}
	tb.Fatalf("no %s in /proc/self/status", field)
	return 0
}

// BenchmarkFirstSetupConntrack (BENCHMARKS.md item 49): a Backend's first
// Setup over an existing table, as at every pcpd start, with n entries in
// the namespace's conntrack table. Half IPv4, half IPv6 UDP flows between
// addresses outside the protected prefixes, replied (IPS_SEEN_REPLY), not
// DNAT-ed: the look for a flow DNAT-ed unlabelled (dnatFlowsUnlabelled)
// and for a pinhole's flow admitted unlabelled (pinFlowsUnlabelled)
// find none and read to the end. The namespace's nf_conntrack_max is
// raised to n plus slack; it cannot exceed the initial namespace's, which
// the run must raise for 1 000 000 (and restore). "marked": the layout
// as the table's first Setup wrote it, marked checked (no conntrack
// read); "unmarked": both marks removed before each Setup (as after an
// upgrade: both reads). Reported: time, allocation a Setup (b.N ≥ 1), "peak-RSS-MB" (the test process's
// VmHWM over its VmRSS before the first Setup, after a forced GC and
// /proc/self/clear_refs 5) and each conntrack check alone, under the
// Backend's lock as at Setup (ConntrackChecks): "dnat-check-ms"
// (dnatFlowsUnlabelled), "pinhole-check-ms" (pinFlowsUnlabelled).
func BenchmarkFirstSetupConntrack(b *testing.B) {
	for _, n := range []int{100_000, 1_000_000} {
		b.Run(fmt.Sprintf("entries=%d", n), func(b *testing.B) {
			topo, be := guardedTopology(b, pinhole.Config{})
			netlab.FillConntrackUnrelated(b, topo.Host, n)
			conn, err := topo.Host.NftConn()
			if err != nil {
				b.Fatal(err)
			}
			for _, marked := range []bool{true, false} {
				b.Run(map[bool]string{true: "marked", false: "unmarked"}[marked], func(b *testing.B) {
					runtime.GC()
					debug.FreeOSMemory()
					if err := os.WriteFile("/proc/self/clear_refs", []byte("5"), 0); err != nil {
						b.Fatal(err)
					}
					base := memStatus(b, "VmRSS")
					b.ReportAllocs()
					b.ResetTimer()
					for range b.N {
						if !marked {
							b.StopTimer()
							unmarkChecked(b, topo.Host, "recheck6")
							unmarkChecked(b, topo.Host, "recheck_nat")
							b.StartTimer()
						}
						nb, err := pinhole.New(conn, pinhole.Config{Routes: nsRoutes(b, topo.Host)})
						if err != nil {
							b.Fatal(err)
						}
						if err := nb.Setup(); err != nil {
							b.Fatal(err)
						}
						b.StopTimer()
						if !nb.CutsFlows(pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: 1}) {
							b.Error("CutsFlows false with no unlabelled flow")
						}
						nb.Close()
						b.StartTimer()
					}
					b.StopTimer()
					b.ReportMetric(memStatus(b, "VmHWM")-base, "peak-RSS-MB")
					if marked {
						return
					}
					for _, c := range []struct {
						unit           string
						dnat, pinholes bool
					}{{"dnat-check-ms", true, false}, {"pinhole-check-ms", false, true}} {
						start := time.Now()
						for range 3 {
							pinhole.ConntrackChecks(be, c.dnat, c.pinholes)
						}
						b.ReportMetric(float64(time.Since(start).Microseconds())/3e3, c.unit)
					}
				})
			}
		})
	}
}
