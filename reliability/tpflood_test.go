package reliability

import (
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/pcpd/pcpd/pcp"
)

// TestThirdPartyFloodFreshCost (review h/revtp; figures, not a bound:
// PCPD_TPFLOOD=1): what a THIRD_PARTY flood costs another client's
// requests on the same socket when every THIRD_PARTY MAP must be judged
// by a WireGuard read no older than --wireguard-fresh (1s, the default,
// and 0). Until h/tpqueue each read was made in the socket reader
// (WireGuard.Freshen), and with 0 the victim waited behind them (p50
// 269 ms, 34 of 120 lost); now the requests that need one wait in the
// server's THIRD_PARTY queue, the readers do not. The
// host's WireGuard interface has 1000 peers (the client and 999 others,
// a /64 each), so that a read costs what it does on a real tunnel host
// (8 ms: BenchmarkWireGuardReadPeers); the client also holds a /56 of
// flood sources and sends, from its 256 /64s (a per-source bucket each),
// THIRD_PARTY MAPs naming another peer's address: each makes the socket
// reader re-read (if its view is older than the bound) before Authorize
// refuses it, and none reaches the engine. The control flood is the same
// MAPs without THIRD_PARTY, for all ports (refused early: no read). The
// flood is paced at PCPD_TPFLOOD_RATE a second (300 by default: with the
// victim's 40/s, under the kernel's owner meter, 400/s for one client);
// 0 sends at full speed with the owner meter raised (several clients
// flooding together). The victim, the client's own address, sends 120
// ANNOUNCEs at 40/s (answered by the same socket's readers); their p50
// and p99 (a lost one counts 500 ms), pcpd's WireGuard reads per second
// and the flood's rate are logged, idle, under the control and under the
// THIRD_PARTY flood.
//
//	sudo PCPD_TPFLOOD=1 go test ./reliability -run TestThirdPartyFloodFreshCost -v
func TestThirdPartyFloodFreshCost(t *testing.T) {
	figuresOnly(t, "PCPD_TPFLOOD")
	rate := envRate(t, "PCPD_TPFLOOD_RATE", 300) // per second, under the default owner meter's 400/s with the victim's 40/s
	for _, fresh := range []string{"1s", "0"} {
		t.Run("fresh="+fresh, func(t *testing.T) {
			extra := []string{"--wireguard-fresh", fresh}
			if rate == 0 {
				extra = append(extra, "--kernel-owner-rate-limit", "1000000")
			}
			l := newLab(t, labOptions{wireGuard: true, extra: extra})
			l.start()
			floodNet := netip.MustParsePrefix("2001:db8:1:100::/56")
			addLoadPeers(t, l, floodNet, 999)
			other := netip.MustParseAddr("2001:db8:f000::5")
			cli := l.topo.ClientV6
			conn := l.clientSocket(cli)
			ann := announceBytes(cli)
			// victim: 120 ANNOUNCEs at 40/s, a lost one counted as the
			// 500 ms it was waited for.
			victim := func() (p50, p99 time.Duration, lost int) { return victimRTTs(t, conn, l.server6(), ann) }
			sp := newSpoofer(t, l.topo.Client, l.server6())
			// flood sends req(source) from the 256 /64s at the rate
			// while the victim measures.
			flood := func(name string, req func(s netip.Addr) []byte) {
				sent, stop := sendLoad(t, sp, floodNet, rate, req)
				time.Sleep(300 * time.Millisecond)
				r0, began := l.ownershipRefreshes(t), time.Now()
				p50, p99, lost := victim()
				secs := time.Since(began).Seconds()
				reads := (l.ownershipRefreshes(t) - r0) / secs
				stop()
				t.Logf("--wireguard-fresh %s, 1000 peers, %s: victim ANNOUNCE p50 %v p99 %v lost %d/120; flood sent %.0f/s; pcpd read WireGuard %.1f times/s",
					fresh, name, p50.Round(10*time.Microsecond), p99.Round(10*time.Microsecond), lost, float64(sent.Load())/(secs+0.3), reads)
				time.Sleep(500 * time.Millisecond)
			}
			p50, p99, lost := victim()
			t.Logf("--wireguard-fresh %s, 1000 peers, idle: victim ANNOUNCE p50 %v p99 %v lost %d/120", fresh, p50.Round(10*time.Microsecond), p99.Round(10*time.Microsecond), lost)
			// Control: the same MAPs without THIRD_PARTY, for all ports
			// (refused early, AllPortsDenied: no read, no engine).
			flood("control flood (MAP port 0, no THIRD_PARTY)", func(s netip.Addr) []byte { return mapNonce(s, 0, time.Hour, 1, netip.Addr{}) })
			flood("THIRD_PARTY flood (another peer's address)", func(s netip.Addr) []byte { return mapNonce(s, 9000, time.Hour, 1, other) })
		})
	}
}

// TestThirdPartyLagPinholeLife (review h/revtp; figures, not a bound:
// PCPD_TPFLOOD=1): with the default --wireguard-fresh 1s, peer B is given
// a /72 carved out of the client's /64 and the client at once sends
// THIRD_PARTY MAPs into it, one every 100 ms, three, and no more (a
// later THIRD_PARTY request would make the re-read itself): judged by the
// view read just before B came (the lag the bound allows), they are
// granted. Logged: how many were granted, and how long after B appeared
// the last of their pinholes left the kernel (the read that revokes them:
// the periodic one, up to 5 s, before Freshen asked for a re-read).
//
//	sudo PCPD_TPFLOOD=1 go test ./reliability -run TestThirdPartyLagPinholeLife -v -count 3
func TestThirdPartyLagPinholeLife(t *testing.T) {
	figuresOnly(t, "PCPD_TPFLOOD")
	l := newLab(t, labOptions{wireGuard: true})
	l.start()
	cli := l.topo.ClientV6
	nested := netip.MustParsePrefix("2001:db8:1:2:ff00::/72")
	inNested := netip.MustParseAddr("2001:db8:1:2:ff00::5")
	wg, err := wgctrl.New()
	if err != nil {
		t.Fatal(err)
	}
	defer wg.Close()
	conn := l.clientSocket(cli)
	// A THIRD_PARTY MAP elsewhere in the /64 first: pcpd's view is then
	// a fresh read (a Freshen), as on a busy server.
	if r, err := rawExchange(conn, l.server6(), mapNonce(cli, 9099, time.Hour, 6, netip.MustParseAddr("2001:db8:1:2::77")), 3*time.Second); err != nil || resultOf(r) != 0 {
		t.Fatalf("THIRD_PARTY MAP in the /64: %x %v", r, err)
	}
	bKey, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	if err := wg.ConfigureDevice(l.topo.HostLANIf, wgtypes.Config{Peers: []wgtypes.PeerConfig{{
		PublicKey: bKey.PublicKey(), AllowedIPs: []net.IPNet{ipnet(nested)},
	}}}); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	var granted []uint16
	for i := range 3 {
		port := uint16(9100 + i)
		r, err := rawExchange(conn, l.server6(), mapNonce(cli, port, time.Hour, byte(10+i), inNested), 3*time.Second)
		if err != nil || r == nil {
			t.Fatalf("THIRD_PARTY MAP %d: %x %v", i, r, err)
		}
		if resultOf(r) == 0 {
			granted = append(granted, port)
		}
		time.Sleep(100 * time.Millisecond)
	}
	_, ok := waitFor(15*time.Second, func() bool {
		for _, p := range granted {
			if l.kernelHas(inNested, pcp.ProtoTCP, p) {
				return false
			}
		}
		return true
	})
	if !ok {
		t.Fatalf("pinholes into B's /72 still in the kernel 15 s after B appeared")
	}
	t.Logf("--wireguard-fresh 1s: %d of 3 THIRD_PARTY MAPs into B's new /72 (one per 100 ms from B's arrival) granted (ports %v); their pinholes gone %v after B appeared",
		len(granted), granted, time.Since(began).Round(10*time.Millisecond))
}

// addLoadPeers gives the client's peer loadNet (a load's sources) and the
// host's WireGuard interface others more peers (a /64 each in
// 2001:db8:f000::/48), routes loadNet to it and waits for pcpd's
// periodic read to take them.
func addLoadPeers(t *testing.T, l *lab, loadNet netip.Prefix, others int) {
	t.Helper()
	wg, err := wgctrl.New()
	if err != nil {
		t.Fatal(err)
	}
	defer wg.Close()
	peers := []wgtypes.PeerConfig{{PublicKey: l.topo.ClientKey.PublicKey(), AllowedIPs: []net.IPNet{ipnet(loadNet)}}}
	for i := range others {
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		p := netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0xf0, 0, byte(i >> 8), byte(i)}), 64)
		peers = append(peers, wgtypes.PeerConfig{PublicKey: k.PublicKey(), AllowedIPs: []net.IPNet{ipnet(p)}})
	}
	if err := wg.ConfigureDevice(l.topo.HostLANIf, wgtypes.Config{Peers: peers}); err != nil {
		t.Fatal(err)
	}
	l.topo.Host.MustRun(t, "ip", "-6", "route", "add", loadNet.String(), "dev", l.topo.HostLANIf)
	time.Sleep(6 * time.Second) // pcpd's periodic read (5 s) takes the new peers
}

// figuresOnly skips a test that measures and asserts nothing (figures,
// not a bound) unless the environment variable env is set, and without
// root.
func figuresOnly(t *testing.T, env string) {
	t.Helper()
	if os.Getenv(env) == "" {
		t.Skip("figures only: " + env + "=1")
	}
	requireRoot(t)
}

// envRate is a figure test's pace: the integer in the environment
// variable name, else def.
func envRate(t *testing.T, name string, def int) int {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// loadSource is the address ::1 of the (i mod 256)th /64 of the /56
// loadNet: a load's sources, a per-source bucket each.
func loadSource(loadNet netip.Prefix, i int) netip.Addr {
	a := loadNet.Addr().As16()
	a[7] = byte(i)
	a[15] = 1
	return netip.AddrFrom16(a)
}

// ownershipRefreshes is pcpd's count of its WireGuard reads
// (pcpd_ownership_refreshes_total).
func (l *lab) ownershipRefreshes(t *testing.T) float64 {
	t.Helper()
	m, err := l.metrics()
	if err != nil {
		t.Fatal(err)
	}
	return m["pcpd_ownership_refreshes_total"]
}

// sendLoad sends req(source) through sp from loadNet's 256 /64s in turn
// (loadSource), rate a second (0: at full speed), until stop is called;
// stop returns once the sender has. sent counts the requests sent.
func sendLoad(t *testing.T, sp *spoofer, loadNet netip.Prefix, rate int, req func(src netip.Addr) []byte) (sent *atomic.Int64, stop func()) {
	sent = new(atomic.Int64)
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		next := time.Now()
		for i := 0; ; i++ {
			select {
			case <-done:
				return
			default:
			}
			if rate > 0 {
				time.Sleep(time.Until(next))
				next = next.Add(time.Second / time.Duration(rate))
			}
			s := loadSource(loadNet, i)
			if err := sp.send(s, req(s)); err != nil {
				t.Error(err)
				return
			}
			sent.Add(1)
		}
	}()
	return sent, func() {
		close(done)
		wg.Wait()
	}
}

// victimRTTs sends req 120 times at 40/s on conn to server and returns
// the round trips' p50 and p99, a lost one counted as the 500 ms it was
// waited for.
func victimRTTs(t *testing.T, conn *net.UDPConn, server netip.AddrPort, req []byte) (p50, p99 time.Duration, lost int) {
	t.Helper()
	var rtts []time.Duration
	next := time.Now()
	for range 120 {
		time.Sleep(time.Until(next))
		next = next.Add(25 * time.Millisecond)
		start := time.Now()
		reply, err := rawExchange(conn, server, req, 500*time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		if reply == nil {
			lost++
			rtts = append(rtts, 500*time.Millisecond)
			continue
		}
		rtts = append(rtts, time.Since(start))
	}
	slices.Sort(rtts)
	return percentile(rtts, 50), percentile(rtts, 99), lost
}
