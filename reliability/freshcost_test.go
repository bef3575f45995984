package reliability

import (
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestWireGuardFreshLoadCost (h/fresh; figures, not a bound:
// PCPD_FRESHCOST=1): what judging every MAP by a WireGuard view no older
// than --wireguard-fresh (1 s) costs under a WireGuard-owned load, at 1
// and 1000 peers (the client and 999 others, a /64 each, as
// TestThirdPartyFloodFreshCost). The client holds a /56 of load sources
// and sends, from its 256 /64s, own-source MAPs (port 9000, an hour: 256
// leases, then renewals) at PCPD_FRESHCOST_RATE a second (300); the
// victim, the client's own address, sends 120 MAP renewals at 40/s. Logged:
// pcpd's WireGuard reads a second idle and under the load, the victim's
// p50/p99 (a lost one counts 500 ms), pcpd's CPU (utime+stime) a request
// sent during the load. Run once on each build to compare.
//
//	sudo PCPD_FRESHCOST=1 go test ./reliability -run TestWireGuardFreshLoadCost -v
func TestWireGuardFreshLoadCost(t *testing.T) {
	figuresOnly(t, "PCPD_FRESHCOST")
	rate := envRate(t, "PCPD_FRESHCOST_RATE", 300)
	for _, npeers := range []int{1, 1000} {
		t.Run(strconv.Itoa(npeers)+" peers", func(t *testing.T) {
			l := newLab(t, labOptions{wireGuard: true})
			l.start()
			loadNet := netip.MustParsePrefix("2001:db8:1:100::/56")
			addLoadPeers(t, l, loadNet, npeers-1)
			cpu := func() float64 { // seconds of user and system time
				b, err := os.ReadFile("/proc/" + strconv.Itoa(l.pid()) + "/stat")
				if err != nil {
					t.Fatal(err)
				}
				f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
				u, _ := strconv.ParseFloat(f[11], 64)
				s, _ := strconv.ParseFloat(f[12], 64)
				return (u + s) / 100
			}
			r0, began := l.ownershipRefreshes(t), time.Now()
			time.Sleep(5 * time.Second)
			idle := (l.ownershipRefreshes(t) - r0) / time.Since(began).Seconds()

			cli := l.topo.ClientV6
			conn := l.clientSocket(cli)
			victimReq := mapNonce(cli, 7000, time.Hour, 1, netip.Addr{})
			sp := newSpoofer(t, l.topo.Client, l.server6())
			sent, stop := sendLoad(t, sp, loadNet, rate, func(s netip.Addr) []byte { return mapNonce(s, 9000, time.Hour, 2, netip.Addr{}) })
			time.Sleep(time.Second) // the 256 leases made; renewals from here
			r0, c0, s0, began := l.ownershipRefreshes(t), cpu(), sent.Load(), time.Now()
			p50, p99, lost := victimRTTs(t, conn, l.server6(), victimReq)
			secs := time.Since(began).Seconds()
			reads := (l.ownershipRefreshes(t) - r0) / secs
			used := cpu() - c0
			n := sent.Load() - s0 + 120
			stop()
			t.Logf("%d peers: WireGuard reads/s idle %.2f, under load %.2f; load %.0f/s; victim MAP p50 %v p99 %v lost %d/120; pcpd CPU %.1f µs a request (%.3f s for %d)",
				npeers, idle, reads, float64(sent.Load()-s0)/secs, p50.Round(10*time.Microsecond), p99.Round(10*time.Microsecond), lost,
				used/float64(n)*1e6, used, n)
		})
	}
}
