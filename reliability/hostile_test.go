package reliability

import (
	"cmp"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
)

// kernelSet is the kernel's pinholes as comparable values.
func kernelSet(es []pinhole.Entry) map[pinhole.Pinhole]bool {
	m := make(map[pinhole.Pinhole]bool, len(es))
	for _, e := range es {
		m[e.Pinhole] = true
	}
	return m
}

// TestOwnershipAttacksSEC02: a client tries to open what it does not own
// (issue 9 "ownership attacks"; PROTOCOL.md SEC-02, TP-03, ADDR-01..03,
// choice (a)/(b)): another client's address, never-openable addresses,
// through THIRD_PARTY, IPv4-mapped and other IPv4-in-IPv6 forms, FILTER and
// PEER variants, deletes of the victim's mapping, and requests from a
// source nobody owns. Every one is refused, and the kernel's pinhole sets
// are exactly what they were before: 0 pinholes appear, none disappears.
func TestOwnershipAttacksSEC02(t *testing.T) {
	l := newLab(t, labOptions{})
	l.start()
	cli, cli4 := l.topo.ClientV6, l.topo.ClientV4
	// The victim's own legitimate mapping (static ownership: whoever sends
	// from the victim's prefix is the victim).
	l.mustMap(l.pcpClient(victimAddr6), victimAddr6, pcp.ProtoTCP, servicePort, time.Hour)
	before := kernelSet(l.kernel())
	leasesBefore := len(l.leases())

	flood6, flood4 := floodSrc(5), netip.MustParseAddr("10.100.1.5")
	nobody6, nobody4 := netip.MustParseAddr("2001:db8:1:5::7"), netip.MustParseAddr("10.100.2.7")
	internet := netip.AddrPortFrom(l.topo.InternetV6, 443)
	m := func(s netip.Addr, port uint16, life time.Duration) []byte {
		return mapBytes(s, pcp.ProtoTCP, port, life)
	}
	tp := func(name string, src, target netip.Addr, want int) attackCase {
		return attackCase{name, src, cat(m(src, 9000, time.Hour), tpOpt(target)), want}
	}
	attacks := []attackCase{
		tp("TP-03 THIRD_PARTY: victim's address", cli, victimAddr6, int(pcp.NotAuthorized)),
		tp("TP-03 THIRD_PARTY: flood client's address", cli, flood6, int(pcp.NotAuthorized)),
		tp("TP-03 THIRD_PARTY: address nobody owns", cli, nobody6, int(pcp.NotAuthorized)),
		tp("TP-03 THIRD_PARTY: loopback ::1", cli, netip.IPv6Loopback(), int(pcp.NotAuthorized)),
		tp("TP-03 THIRD_PARTY: host's own address inside the client's prefix", cli, l.topo.HostTunnelV6, int(pcp.NotAuthorized)),
		tp("TP-03 THIRD_PARTY: host's WAN address", cli, l.topo.HostWANV6, wantNotSuccess),
		tp("TP-03 THIRD_PARTY: unspecified ::", cli, netip.IPv6Unspecified(), wantNotSuccess),
		tp("TP-03 THIRD_PARTY: multicast ff02::1", cli, netip.MustParseAddr("ff02::1"), wantNotSuccess),
		tp("TP-03 THIRD_PARTY: link-local fe80::1", cli, netip.MustParseAddr("fe80::1"), wantNotSuccess),
		tp("TP-03 THIRD_PARTY: ::ffff:10.100.1.5 (flood's IPv4, mapped) from IPv6", cli, flood4, wantNotSuccess),
		tp("TP-03 THIRD_PARTY: ::ffff:10.100.0.1 (host's IPv4) from IPv6", cli, l.topo.HostTunnelV4, wantNotSuccess),
		tp("TP-03 THIRD_PARTY: ::ffff:10.100.1.5 from IPv4", cli4, flood4, int(pcp.NotAuthorized)),
		tp("TP-03 THIRD_PARTY: ::ffff:10.100.0.1 (host) from IPv4", cli4, l.topo.HostTunnelV4, wantNotSuccess),
		tp("TP-03 THIRD_PARTY: ::ffff:198.51.100.1 (host public) from IPv4", cli4, l.topo.HostPublicV4, wantNotSuccess),
		tp("TP-03 THIRD_PARTY: ::ffff:127.0.0.1 from IPv4", cli4, netip.MustParseAddr("127.0.0.1"), wantNotSuccess),
		tp("TP-03 THIRD_PARTY: ::ffff:224.0.0.1 from IPv4", cli4, netip.MustParseAddr("224.0.0.1"), wantNotSuccess),
		tp("TP-03 THIRD_PARTY: IPv4-compatible ::10.100.1.5 from IPv4", cli4, netip.MustParseAddr("::a64:105"), wantNotSuccess),
		tp("TP-03 THIRD_PARTY: NAT64 64:ff9b::10.100.1.5 from IPv4", cli4, netip.MustParseAddr("64:ff9b::a64:105"), wantNotSuccess),
		tp("TP-03 THIRD_PARTY: NAT64 64:ff9b::10.100.0.2 (own IPv4 in NAT64 form) from IPv6", cli, netip.MustParseAddr("64:ff9b::a64:2"), wantNotSuccess),
		{"TP-03 delete the victim's mapping via THIRD_PARTY", cli, cat(m(cli, servicePort, 0), tpOpt(victimAddr6)), int(pcp.NotAuthorized)},
		{"TP-03 THIRD_PARTY victim + FILTER", cli, cat(m(cli, 9001, time.Hour), tpOpt(victimAddr6), filterOpt(128, 0, internet.Addr())), int(pcp.NotAuthorized)},
		{"TP-03 THIRD_PARTY victim + FILTER clear", cli, cat(m(cli, 9002, time.Hour), tpOpt(victimAddr6), filterOpt(0, 0, netip.IPv6Unspecified())), int(pcp.NotAuthorized)},
		{"TP-04 PEER with THIRD_PARTY victim", cli, cat(peerBytes(cli, pcp.ProtoTCP, 9003, internet), tpOpt(victimAddr6)), int(pcp.NotAuthorized)},
		{"ADDR-01 Client IP field = victim", cli, setClientIP(m(cli, 9004, time.Hour), victimAddr6), int(pcp.AddressMismatch)},
		{"ADDR-02 Client IP ::ffff:10.100.0.2 from the IPv6 source", cli, setClientIP(m(cli, 9005, time.Hour), cli4), int(pcp.AddressMismatch)},
		{"ADDR-02 Client IP = victim from IPv4", cli4, setClientIP(m(cli4, 9006, time.Hour), victimAddr6), int(pcp.AddressMismatch)},
		{"SEC-02 MAP from a source nobody owns", nobody6, m(nobody6, 9007, time.Hour), int(pcp.NotAuthorized)},
		{"SEC-02 PEER from a source nobody owns", nobody6, peerBytes(nobody6, pcp.ProtoTCP, 9008, internet), int(pcp.NotAuthorized)},
		{"SEC-02 PCP MAP over IPv4 from a source nobody owns", nobody4, m(nobody4, 9009, time.Hour), int(pcp.NotAuthorized)},
		{"SEC-02 NAT-PMP map from a source nobody owns", nobody4, []byte{0, 2, 0, 0, 0x23, 0x2a, 0x23, 0x2a, 0, 0, 0x1c, 0x20}, int(pcp.PMPNotAuthorized)},
		{"MAP-05 all traffic to the own address", cli, mapBytes(cli, pcp.ProtoAll, 0, time.Hour), int(pcp.UnsuppProtocol)},
	}
	l.sendAttacks(t, attacks) // never a drop here: each is answered
	if appeared, vanished := kernelDiff(before, kernelSet(l.kernel())); len(appeared)+len(vanished) > 0 {
		t.Fatalf("kernel changed by refused attacks: appeared %v, vanished %v", appeared, vanished)
	}
	if n := len(l.leases()); n != leasesBefore {
		t.Fatalf("leases: %d before, %d after the attacks", leasesBefore, n)
	}
	// Positive control: THIRD_PARTY for an address the client does own is
	// honoured, and the same kernel comparison sees exactly that pinhole.
	own := netip.MustParseAddr("2001:db8:1:2::77")
	conn, err := socketIn(l.topo.Client, cli)
	if err != nil {
		t.Fatal(err)
	}
	reply, err := rawExchange(conn, l.server6(), cat(m(cli, 9010, time.Hour), tpOpt(own)), 3*time.Second)
	conn.Close()
	if err != nil || resultOf(reply) != 0 {
		t.Fatalf("control: THIRD_PARTY for an owned address: %x %v", reply, err)
	}
	appearedNow, _ := kernelDiff(before, kernelSet(l.kernel()))
	if len(appearedNow) != 1 || appearedNow[0].InternalAddr != own || appearedNow[0].InternalPort != 9010 {
		t.Fatalf("control: kernel comparison saw %v, want exactly tcp [%s]:9010", appearedNow, own)
	}
	if !t.Failed() {
		t.Logf("ownership attacks: %d sent, each refused with the expected code; pinholes appeared: 0, vanished: 0 (kernel checked)", len(attacks))
	}
}

// spoofer sends UDP datagrams from any source address of the client
// namespace's AnyIP prefixes through one socket (IPV6_FREEBIND plus
// IPV6_PKTINFO per datagram), so a million sources cost no sockets.
type spoofer struct {
	fd  int
	dst unix.Sockaddr
}

func newSpoofer(t testing.TB, ns *netlab.NS, server netip.AddrPort) *spoofer {
	t.Helper()
	var s *spoofer
	err := ns.Do(func() (err error) {
		s, err = openSpoofer(server)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(s.fd) })
	return s
}

// openSpoofer opens a spoofer's socket in the calling thread's namespace.
func openSpoofer(server netip.AddrPort) (*spoofer, error) {
	s := &spoofer{dst: &unix.SockaddrInet6{Port: int(server.Port()), Addr: server.Addr().As16()}}
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("spoofer socket: %w", err)
	}
	s.fd = fd
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 4<<20)
	if err := unix.SetsockoptInt(fd, unix.SOL_IPV6, unix.IPV6_FREEBIND, 1); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("spoofer IPV6_FREEBIND: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet6{}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("spoofer bind: %w", err)
	}
	return s, nil
}

func (s *spoofer) send(src netip.Addr, b []byte) error {
	info := unix.Inet6Pktinfo{Addr: src.As16()}
	for {
		err := unix.Sendmsg(s.fd, b, unix.PktInfo6(&info), s.dst, 0)
		if errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.EAGAIN) {
			time.Sleep(50 * time.Microsecond)
			continue
		}
		return err
	}
}

// latencyRound sends n requests from src (bound to conn) paced at rate per second and
// returns the sorted round-trip times; a lost request counts as 1 s. With
// renew set, every second request is renew (a MAP renewal of the
// client's own mapping, same nonce: an early renewal) and its times are
// returned apart (mapRTTs); the others are ANNOUNCEs. seq is every
// round trip in the order sent.
func latencyRound(t *testing.T, l *lab, conn *net.UDPConn, src netip.Addr, n int, rate float64, renew []byte) (rtts, mapRTTs, seq []time.Duration, lost int) {
	ann := announceBytes(src)
	gap := time.Duration(float64(time.Second) / rate)
	next := time.Now()
	for i := 0; i < n; i++ {
		time.Sleep(time.Until(next))
		next = next.Add(gap)
		req, out := ann, &rtts
		if renew != nil && i%2 == 1 {
			req, out = renew, &mapRTTs
		}
		start := time.Now()
		reply, err := rawExchange(conn, l.server6(), req, time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if reply == nil {
			lost++
			*out = append(*out, time.Second)
			seq = append(seq, time.Second)
			continue
		}
		*out = append(*out, time.Since(start))
		seq = append(seq, time.Since(start))
		if len(reply) < 4 || reply[3] != 0 {
			t.Errorf("victim's request refused: % x", reply)
		}
	}
	slices.Sort(rtts)
	slices.Sort(mapRTTs)
	return rtts, mapRTTs, seq, lost
}

// slowest names the k slowest round trips of seq by their index: where in
// a round the victim waited (a flood's burst shows at its start).
func slowest(seq []time.Duration, k int) string {
	idx := make([]int, len(seq))
	for i := range idx {
		idx[i] = i
	}
	slices.SortFunc(idx, func(a, b int) int { return cmp.Compare(seq[b], seq[a]) })
	var parts []string
	for _, i := range idx[:min(k, len(idx))] {
		parts = append(parts, fmt.Sprintf("#%d %v", i, seq[i].Round(10*time.Microsecond)))
	}
	return strings.Join(parts, " ")
}

func ratio(a, b time.Duration) float64 { return float64(a) / float64(b) }

// cpuStall is the machine's CPU pressure so far (/proc/pressure/cpu, "some
// total"): how long at least one runnable task waited for a CPU. Its
// growth over a round is how loaded the box was during that round, which
// a round's p99 on a shared 2-core box depends on; 0 where PSI is off.
func cpuStall() time.Duration {
	b, _ := os.ReadFile("/proc/pressure/cpu")
	for _, f := range strings.Fields(string(b)) {
		if v, ok := strings.CutPrefix(f, "total="); ok {
			us, _ := strconv.ParseInt(v, 10, 64)
			return time.Duration(us) * time.Microsecond
		}
	}
	return 0
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	return strings.Join(strings.Fields(string(b))[:min(3, len(strings.Fields(string(b))))], " ")
}

func roundMs(ds []time.Duration) []time.Duration {
	var out []time.Duration
	for _, d := range ds {
		out = append(out, d.Round(time.Millisecond))
	}
	return out
}

func medianDur(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

// TestFloodFairnessPKT08: one client floods pcpd at full speed while
// another measures its latency (issue 9 "one peer flooding ... p99";
// PROTOCOL.md PKT-08, SEC-04). Two floods: from one source, and from the
// flooding client's whole prefix (a /40: every datagram from a fresh /64,
// which a per-/64 limit does not stop; the per-owner bucket does). The
// victim's p99 under flood must stay within 2× its p99 without pcpd in the
// way, plus 2 ms of scheduler noise (idle p99 is a fraction of a
// millisecond on a quiet machine).
//
// "Without pcpd in the way" is the larger of idle and a control flood: the
// same sender, same sources, same rate, to a closed port, so that the
// sender, the veth and the kernel cost the machine what they cost under
// the real flood and none of it reaches pcpd. The flooder shares this
// machine's two cores with pcpd and the victim, which no server can help
// (the victim's own process is descheduled as often as pcpd is), so 2×
// plain idle is not a bound any server could meet here: on a loaded box
// the control alone gave 12-46 ms against 1-11 ms idle. Idle, control
// and real rounds alternate, so all three see the same background load
// (other tests share the machine); each figure is the median of the
// rounds' p99s. A mode that misses a bound is measured again from
// scratch, up to 3 attempts, and fails only if all miss: a burst of
// other tests' CPU during one attempt's flood rounds can push it over
// (1 of 2 runs beside the server package), a pcpd unfair to the victim
// misses in every attempt (RELIABILITY.md, the test's row).
// The one-source flood is shed by pcpd's kernel meter before the socket;
// what its rate lets through is written through by the engine, which the
// victim's ANNOUNCEs (answered by the socket readers) no longer wait for
// and its absorbed renewals wait for only in the queue (see its mode).
// The victim's requests alternate: ANNOUNCE and an early renewal of its
// own mapping; both p99s are bounded.
//
// PCPD_FLOOD_PIN=1 runs the pinned bed instead (flooder_test.go): the
// flooder a process of its own on the clients' CPU, pcpd and the kernel's
// receive path on the server's CPU, the control flood dropped by a kernel
// rule; the bound is then 2 × idle plus the kernel's own cost
// (kernelSlack), not the control. Opt-in: on the shared box it passed 4
// of 11 runs (RELIABILITY.md "The flood bound", known bug 5), and none
// since known bug 4's reverse-path lookup (runs T).
func TestFloodFairnessPKT08(t *testing.T) {
	requireRoot(t)
	pin := floodPin(t)
	if pin {
		pinSelf(t, serverCPU) // pcpd, started by newLab, inherits it
	}
	l := newLab(t, labOptions{})
	l.start()
	cli := l.topo.ClientV6
	closedPort := netip.AddrPortFrom(l.topo.HostTunnelV6, 5399)
	if pin {
		pinSelf(t, clientCPU) // the victim: another machine than pcpd's
		steerReceive(t, l.topo.Host, l.topo.HostLANIf, serverCPU)
		steerReceive(t, l.topo.Client, l.topo.ClientIf, clientCPU)
		installControlDrop(t, l.topo.Host)
		closedPort = netip.AddrPortFrom(l.topo.HostTunnelV6, controlDropPort)
		t.Logf("pinned bed: pcpd (pid %d) and the host's receive path on CPU %d; the victim, the flooder (SCHED_IDLE) and the client's receive path on CPU %d; control flood dropped by a raw prerouting rule",
			l.pcpd.PID(), serverCPU, clientCPU)
	}
	t.Logf("pcpd's sockets: %s; owner meter: %s; reverse path: %s", socketMem(l.topo.Host), ownerMeterLimit(l.topo.Host), ownerReversePath(l.topo.Host))
	// Half the victim's requests are ANNOUNCEs (stateless: answered by
	// the socket readers), half early renewals of its own mapping (same
	// nonce, 1 h: absorbed, no commit of their own, but the engine's);
	// 40/s together, under the 50/s per-source limit.
	const rounds, perRound, rate = 4, 160, 40.0
	conn := l.clientSocket(cli) // one socket: the renewals keep the mapping's client port
	renew := mapBytes(cli, pcp.ProtoTCP, servicePort, time.Hour)
	if reply, err := rawExchange(conn, l.server6(), renew, time.Second); err != nil || len(reply) < 4 || reply[3] != 0 {
		t.Fatalf("victim's MAP: % x %v", reply, err)
	}
	// A mode whose first attempt misses a bound (or loses a victim
	// request) is measured twice more, from scratch (fresh idle, control
	// and flood rounds), and judged on all three attempts' rounds pooled:
	// the median of 12 rounds' p99s per kind against the same bound, and
	// a loss in more than one attempt. On a box shared with other tests
	// (CI runs the packages in parallel) a burst of their CPU during one
	// attempt's flood rounds can push it over (84.4 ms against a bound of
	// 80.6 ms at load average 5-6), which the pooled rounds outvote; an
	// unfairness that is there in every attempt is not outvoted, as it
	// would be by taking the best attempt (RELIABILITY.md, the test's
	// row: PCPD_LAB_EXTRA with pcpd's limits off). Each attempt's rounds
	// interleave idle, control and flood, so a load that comes and goes
	// weighs on all three alike.
	const attempts = 3
	var next atomic.Uint32 // the whole-prefix sources go on across rounds
	// flood sends MAP requests from sources(i) to dst until stop is called,
	// which returns the datagrams sent per second. The pinned bed's
	// flooder is a process of its own (flooder_test.go), told the kind of
	// sources by name.
	flood := func(t *testing.T, dst netip.AddrPort, sources func(i uint32) netip.Addr, kind string) (stop func() float64) {
		if pin {
			first := next.Load()
			p := startFlooder(t, l.topo.Client, dst, kind, first)
			return func() float64 {
				sent, rate := p.stop(t)
				next.Store(first + uint32(sent))
				return rate
			}
		}
		sp := newSpoofer(t, l.topo.Client, dst)
		done := make(chan struct{})
		var sent atomic.Int64
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := uint32(0); ; i++ {
				select {
				case <-done:
					return
				default:
				}
				src := sources(i)
				if err := sp.send(src, mapBytes(src, pcp.ProtoUDP, 7000, time.Hour)); err != nil {
					t.Error(err)
					return
				}
				sent.Add(1)
			}
		}()
		start := time.Now()
		return func() float64 {
			close(done)
			wg.Wait()
			return float64(sent.Load()) / time.Since(start).Seconds()
		}
	}
	// measure is one attempt at a flood mode: rounds × (idle, control,
	// flood). It logs the attempt's figures under name and returns its
	// rounds. Receive-buffer drops fail the test at once, whatever the
	// other attempts show (known bug 5).
	measure := func(t *testing.T, name string, sources func(i uint32) netip.Addr, kind string) floodRounds {
		m0, _ := l.metrics()
		k0 := kernelDrops(l.topo.Host)
		o0 := ownerMeterDrops(l.topo.Host)
		sn0 := readSoftnet()
		var idle, idleMap, ctl, fl, ctlMap, flMap, ctlStall, flStall []time.Duration
		t.Logf("%s: load average %s", name, loadavg())
		var idleLost, ctlLost, flLost int
		var ctlRate, flRate float64
		var floodTime time.Duration // how long the real floods ran
		for r := 0; r < rounds; r++ {
			// The flood's accepted MAPs settle (the previous round's)
			// before the victim measures idle.
			time.Sleep(200 * time.Millisecond)
			rtts, mrtts, _, n := latencyRound(t, l, conn, cli, perRound, rate, renew)
			idle, idleMap, idleLost = append(idle, percentile(rtts, 99)), append(idleMap, percentile(mrtts, 99)), idleLost+n
			for _, real := range []bool{false, true} {
				dst := closedPort
				if real {
					dst = l.server6()
				}
				kr0 := kernelDrops(l.topo.Host)
				began := time.Now()
				stop := flood(t, dst, sources, kind)
				time.Sleep(200 * time.Millisecond)
				kr1 := kernelDrops(l.topo.Host)
				st0 := cpuStall()
				rtts, mrtts, seq, n := latencyRound(t, l, conn, cli, perRound, rate, renew)
				stall := cpuStall() - st0
				sent := stop()
				if pin {
					// Receive-buffer drops before the victim starts
					// (the owner bucket's burst, full at each flood
					// round's start) and while it measures.
					kr2 := kernelDrops(l.topo.Host)
					t.Logf("%s round %d %s: %.0f datagrams/s; rcvbuf drops %d in the first 200 ms, %d after; slowest victim requests %s", name, r, map[bool]string{false: "control", true: "flood"}[real], sent,
						kr1.rcvbuf-kr0.rcvbuf, kr2.rcvbuf-kr1.rcvbuf, slowest(seq, 4))
				}
				if real {
					floodTime += time.Since(began)
					fl, flLost, flRate = append(fl, percentile(rtts, 99)), flLost+n, flRate+sent/rounds
					flMap, flStall = append(flMap, percentile(mrtts, 99)), append(flStall, stall)
				} else {
					ctl, ctlLost, ctlRate = append(ctl, percentile(rtts, 99)), ctlLost+n, ctlRate+sent/rounds
					ctlMap, ctlStall = append(ctlMap, percentile(mrtts, 99)), append(ctlStall, stall)
				}
			}
		}
		secs := floodTime.Seconds()
		m1, _ := l.metrics()
		f := floodRounds{idle: idle, idleMap: idleMap, ctl: ctl, ctlMap: ctlMap, fl: fl, flMap: flMap, lost: flLost}
		idleP99, idleMapP99, controlP99, controlMapP99, floodP99, floodMapP99, bound, mapBound := f.figures(pin)
		answered := metricSum(m1, "pcpd_requests_total") - metricSum(m0, "pcpd_requests_total")
		if pin {
			t.Logf("%s: literal 2 × idle: ANNOUNCE %v (%v), MAP renewal %v (%v)", name,
				floodP99 <= 2*idleP99, 2*idleP99, floodMapP99 <= 2*idleMapP99, 2*idleMapP99)
		}
		k1 := kernelDrops(l.topo.Host)
		t.Logf("%s: per-CPU receive processing (machine-wide): %s", name, readSoftnet().minus(sn0))
		t.Logf("%s: under flood / idle: ANNOUNCE %.2f, MAP renewal %.2f; control / idle %.2f, %.2f",
			name, ratio(floodP99, idleP99), ratio(floodMapP99, idleMapP99), ratio(controlP99, idleP99), ratio(controlMapP99, idleMapP99))
		t.Logf("%s: flood %.0f datagrams/s (control %.0f/s to a closed port), %.1fs on pcpd; pcpd answered %.0f/s, dropped %s, absorbed %.0f renewals; lost: idle %d, control %d, flood %d; kernel drops in the host namespace (socket buffer full, UDP errors, backlog) %v; owner meter drops %d (%.0f/s)",
			name, flRate, ctlRate, secs, answered/secs, dropSummary(m0, m1),
			m1["pcpd_renewals_absorbed_total"]-m0["pcpd_renewals_absorbed_total"], idleLost, ctlLost, flLost, k1.minus(k0),
			ownerMeterDrops(l.topo.Host)-o0, float64(ownerMeterDrops(l.topo.Host)-o0)/secs)
		t.Logf("%s: victim ANNOUNCE p99 idle %v (rounds %v), control %v (rounds %v), under flood %v (rounds %v); bound %v",
			name, idleP99, idle, controlP99, ctl, floodP99, fl, bound)
		t.Logf("%s: victim MAP renewal p99 idle %v (rounds %v), control %v (rounds %v), under flood %v (rounds %v); bound %v",
			name, idleMapP99, idleMap, controlMapP99, ctlMap, floodMapP99, flMap, mapBound)
		t.Logf("%s: CPU pressure (some task waiting for a CPU) per 4 s round: control %v, flood %v; load average %s",
			name, roundMs(ctlStall), roundMs(flStall), loadavg())
		// Nothing lost (issue 9): a datagram dropped because pcpd's
		// socket buffer was full could as well have been a victim's,
		// whether or not this run's victim was unlucky (known bug 5:
		// the owner meter's burst of 3200 overflowed the buffer). In
		// the host namespace only pcpd's sockets receive UDP.
		if d := k1.minus(k0).rcvbuf; d > 0 {
			t.Errorf("%s: %d datagrams dropped because pcpd's socket buffer was full (%s)", name, d, socketMem(l.topo.Host))
		}
		return f
	}
	for _, mode := range []struct {
		name    string
		sources func(i uint32) netip.Addr
		kind    string // sources for the flooder process: "one" or "prefix"
		// knownBug, if set, is why this mode's renewal probe still fails
		// (RELIABILITY.md); ANNOUNCE is held to its bound regardless.
		knownBug string
	}{
		// pcpd's kernel request meter (--kernel-rate-limit, default 4 ×
		// --rate-limit: 200/s, burst 400 per /64) drops all but ~2 500 of
		// the 100-145 k datagrams/s in the kernel, so they no longer queue
		// in pcpd's socket ahead of the victim (17:10-17:26: 1 of 14 runs
		// still failed, victim ANNOUNCE p99 17.2 ms vs control 4.0 ms).
		// What was left: the source's bucket lets 50 MAPs a second
		// through, each a replacement (a new nonce) that the engine
		// writes through, a kernel transaction and an fsync alone in its
		// batch, and the victim's ANNOUNCE waited for the commit in
		// progress. Since ANNOUNCE is answered by the socket readers
		// (server/early.go) it no longer does, and the victim's early
		// renewals are absorbed (server/absorb.go): no commit of their
		// own, though they still queue for the engine behind the flood's
		// commits. 19:05-19:27, 9 runs, median-of-rounds p99 under flood
		// / bound: ANNOUNCE 4.0/12.2, 5.0/17.1, 4.0/14.4, 4.4/16.2,
		// 4.3/10.0, 6.4/11.5, 3.9/10.0, 4.7/22.0, 5.0/9.9 ms; MAP renewal
		// 5.4/11.5, 8.2/14.0, 5.1/12.0, 5.0/14.4, 4.0/11.1, 6.7/15.7,
		// 6.2/10.0, 8.3/12.0, 4.7/11.0 ms: 9 of 9 pass (single rounds of
		// the MAP probe reached 11.7 and 13.1 ms).
		//
		// Still failing now and then on a loaded box (19:30-19:40, load
		// average 5-7, other tests' fsyncs on the same disk): the
		// victim's renewals, absorbed but queued for the one engine
		// goroutine, wait behind the flood's write-through replacements;
		// a slow fsync holds them for its whole length. Renewal p99 under
		// flood / bound 98/37.5 ms (rounds 98, 182, 25, 12 ms) and
		// 107.6/45.9 ms, ANNOUNCE within its bound both times: 2 of 14
		// runs. Since 121c07f the flood's replacements are absorbed too
		// (a bare pinhole's replacement ends the same after a crash:
		// server/absorb.go bareReplacement), so they cost no commit:
		// 20:06-20:16, 7 runs (load average 2-7, other tests running),
		// under flood / bound: ANNOUNCE 11.0/77.7, 28.9/309, 11.6/118,
		// 4.8/11.3, 3.8/13.1, 7.3/11.8, 3.0/12.8 ms; MAP renewal
		// 26.3/66.9, 9.6/355, 24.5/121, 6.9/17.6, 5.3/13.9, 7.7/13.0,
		// 4.8/15.4 ms: 7 of 7 pass.
		{"one source", func(uint32) netip.Addr { return floodSrc(1) }, "one", ""},
		// The whole prefix: every datagram from a fresh /64, so the
		// per-/64 meter's set fills and tracks none of them; until the
		// owner meter (pinhole/ownermeter.go, 2026-12-02 night) all
		// 75-120 k/s reached pcpd's socket, where the per-owner bucket
		// shed them, and 2 of 7 runs (20:06-20:16, loaded box) lost one
		// victim request. Now the kernel holds the owner to 400/s,
		// burst 800, what pcpd's own owner bucket admits (both modes:
		// the one source is the same owner's). Its former 1600/s, burst
		// 3200, overflowed pcpd's socket buffer in the pinned bed
		// (known bug 5): the test fails on any receive-buffer drop.
		{"whole prefix, a new /64 per datagram", func(uint32) netip.Addr { return floodSrc(2 + next.Add(1)%(1<<23)) }, "prefix", ""},
	} {
		t.Run(mode.name, func(t *testing.T) {
			defer time.Sleep(500 * time.Millisecond) // the flood's accepted MAPs settle before the next mode
			var all floodRounds
			lossy := 0 // attempts that lost a victim request under flood
			for a := 1; a <= attempts; a++ {
				began := time.Now()
				f := measure(t, fmt.Sprintf("%s, attempt %d", mode.name, a), mode.sources, mode.kind)
				all.add(f)
				if f.lost > 0 {
					lossy++
				}
				if a > 1 {
					continue
				}
				if f.within(pin) && f.lost == 0 {
					return
				}
				t.Logf("%s, attempt 1: missed a bound: %s; measuring %d more attempts, judged on all %d pooled", mode.name, f.summary(pin), attempts-1, attempts)
				// Within go test's package timeout (10 min by default):
				// each attempt takes as long as this one, and the rest
				// of the package still has to run.
				if d, ok := t.Deadline(); ok && time.Until(d) < time.Duration(attempts)*time.Since(began) {
					t.Errorf("%s: victim p99 under flood over its bound, and no time for more attempts before the test deadline (%v): %s", mode.name, time.Until(d).Round(time.Second), f.summary(pin))
					return
				}
				// The flood's accepted MAPs settle before the next attempt.
				time.Sleep(500 * time.Millisecond)
			}
			t.Logf("%s: %d attempts pooled (%d rounds of each): %s; attempts that lost a victim request under flood: %d", mode.name, attempts, len(all.fl), all.summary(pin), lossy)
			if all.within(pin) && lossy <= 1 {
				return
			}
			if _, _, _, _, ann, _, annBound, _ := all.figures(pin); all.lost == 0 && ann <= annBound && mode.knownBug != "" {
				// The known bug is the renewal probe's; an ANNOUNCE
				// over its bound always fails.
				knownBug(t, mode.knownBug)
			}
			t.Errorf("%s: victim p99 under flood over its bound on %d attempts' rounds pooled, or requests lost in %d of them: %s", mode.name, attempts, lossy, all.summary(pin))
		})
	}
}

// floodRounds are a flood mode's rounds, one attempt's or several pooled:
// the victim's p99 per round and kind (ANNOUNCE, MAP renewal) idle, under
// the control flood and under the real flood, and the victim's requests
// lost in the flood rounds.
type floodRounds struct {
	idle, idleMap, ctl, ctlMap, fl, flMap []time.Duration
	lost                                  int
}

func (f *floodRounds) add(o floodRounds) {
	f.idle, f.idleMap = append(f.idle, o.idle...), append(f.idleMap, o.idleMap...)
	f.ctl, f.ctlMap = append(f.ctl, o.ctl...), append(f.ctlMap, o.ctlMap...)
	f.fl, f.flMap = append(f.fl, o.fl...), append(f.flMap, o.flMap...)
	f.lost += o.lost
}

// figures are f's medians of the rounds' p99s (idle and control of each
// kind; then under flood, ANNOUNCE and renewal) and each kind's bound:
// 2 × max(idle, control) + 2 ms, or in the pinned bed issue 9's 2 × idle
// plus the kernel's own cost (kernelSlack).
func (f floodRounds) figures(pin bool) (idle, idleMap, ctl, ctlMap, fl, flMap, bound, mapBound time.Duration) {
	idle, idleMap, ctl, ctlMap = medianDur(f.idle), medianDur(f.idleMap), medianDur(f.ctl), medianDur(f.ctlMap)
	fl, flMap = medianDur(f.fl), medianDur(f.flMap)
	if pin {
		return idle, idleMap, ctl, ctlMap, fl, flMap, 2*idle + kernelSlack(idle, ctl), 2*idleMap + kernelSlack(idleMap, ctlMap)
	}
	return idle, idleMap, ctl, ctlMap, fl, flMap, 2*max(idle, ctl) + 2*time.Millisecond, 2*max(idleMap, ctlMap) + 2*time.Millisecond
}

// within reports whether both kinds' p99 under flood are within their
// bounds (lost requests aside).
func (f floodRounds) within(pin bool) bool {
	_, _, _, _, fl, flMap, bound, mapBound := f.figures(pin)
	return fl <= bound && flMap <= mapBound
}

func (f floodRounds) summary(pin bool) string {
	idle, idleMap, ctl, ctlMap, fl, flMap, bound, mapBound := f.figures(pin)
	r := func(d time.Duration) time.Duration { return d.Round(10 * time.Microsecond) }
	return fmt.Sprintf("ANNOUNCE %v (bound %v), MAP renewal %v (bound %v), lost %d; idle %v / %v, control flood to a closed port %v / %v",
		r(fl), r(bound), r(flMap), r(mapBound), f.lost, r(idle), r(idleMap), r(ctl), r(ctlMap))
}

// drops are the kernel's counts of datagrams dropped on their way to a
// socket: where a lost victim request went (a full socket buffer, or the
// per-CPU backlog the test bed's veth traffic passes through).
type drops struct{ rcvbuf, inErrors, backlog uint64 }

func (d drops) minus(o drops) drops {
	return drops{d.rcvbuf - o.rcvbuf, d.inErrors - o.inErrors, d.backlog - o.backlog}
}

func (d drops) String() string {
	return fmt.Sprintf("rcvbuf %d, in-errors %d, backlog %d", d.rcvbuf, d.inErrors, d.backlog)
}

// kernelDrops reads ns's UDP counters (/proc/net/snmp6, snmp) and the
// backlog drops of /proc/net/softnet_stat (per CPU, not per namespace).
// Unreadable counters read as 0: they only explain a failure.
func kernelDrops(ns *netlab.NS) drops {
	var d drops
	for _, file := range []string{"/proc/net/snmp6", "/proc/net/snmp"} {
		out, _ := ns.Run("cat", file)
		lines := strings.Split(out, "\n")
		for i, line := range lines {
			f := strings.Fields(line)
			switch {
			case len(f) == 2 && f[0] == "Udp6RcvbufErrors":
				d.rcvbuf += parseUint(f[1])
			case len(f) == 2 && f[0] == "Udp6InErrors":
				d.inErrors += parseUint(f[1])
			case len(f) > 1 && f[0] == "Udp:" && i > 0 && strings.HasPrefix(lines[i-1], "Udp:"):
				// The values line; the line before names them.
				names := strings.Fields(lines[i-1])
				for j, n := range names {
					if j < len(f) && n == "RcvbufErrors" {
						d.rcvbuf += parseUint(f[j])
					}
					if j < len(f) && n == "InErrors" {
						d.inErrors += parseUint(f[j])
					}
				}
			}
		}
	}
	out, _ := ns.Run("cat", "/proc/net/softnet_stat")
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) > 1 {
			n, _ := strconv.ParseUint(f[1], 16, 64)
			d.backlog += n
		}
	}
	return d
}

// socketMem is ss's memory line of pcpd's serving sockets in ns (skmem:
// rb is the receive buffer's size, r what is queued, d the drops).
func socketMem(ns *netlab.NS) string {
	out, _ := ns.Run("ss", "-u", "-a", "-n", "-m", "sport", "=", ":"+strconv.Itoa(pcp.Port))
	var mem []string
	for _, line := range strings.Split(out, "\n") {
		if line = strings.TrimSpace(line); strings.HasPrefix(line, "skmem:") {
			mem = append(mem, line)
		}
	}
	return strings.Join(mem, " ")
}

// ownerMeterDrops sums the counters of pcpd's owner meter chains
// (pinhole/ownermeter.go) in ns: datagrams the kernel dropped because
// their owner was over its rate, or because they came from an owner's
// prefix on an interface the host does not route it through (the
// reverse-path rule; none in these labs, whose sources are routed).
func ownerMeterDrops(ns *netlab.NS) uint64 {
	var n uint64
	for _, f := range ownerChainRules(ns) {
		if i := slices.Index(f, "counter"); i >= 0 && i+2 < len(f) && f[i+1] == "packets" {
			n += parseUint(f[i+2])
		}
	}
	return n
}

// ownerChainRules lists the rules of pcpd's owner chains in ns (one
// owner_* chain per client), each split into fields.
func ownerChainRules(ns *netlab.NS) [][]string {
	out, _ := ns.Run("nft", "list", "table", "inet", "pcpd")
	var rules [][]string
	inOwner := false
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 2 && f[0] == "chain":
			inOwner = strings.HasPrefix(f[1], "owner_")
		case inOwner && len(f) > 0 && f[0] != "}" && f[0] != "type":
			rules = append(rules, f)
		}
	}
	return rules
}

// ownerMeterLimit is the limit rule of pcpd's first owner chain in ns
// ("limit rate over 400/second burst 800 packets"), or "none".
func ownerMeterLimit(ns *netlab.NS) string {
	for _, f := range ownerChainRules(ns) {
		if f[0] == "limit" {
			if i := slices.Index(f, "counter"); i > 0 {
				f = f[:i]
			}
			return strings.Join(f, " ")
		}
	}
	return "none"
}

// ownerReversePath is the reverse-path rule of pcpd's first owner chain
// in ns ("iif != \"lan0\" fib saddr . iif oif 0"), or "none".
func ownerReversePath(ns *netlab.NS) string {
	for _, f := range ownerChainRules(ns) {
		if slices.Contains(f, "fib") {
			if i := slices.Index(f, "counter"); i > 0 {
				f = f[:i]
			}
			return strings.Join(f, " ")
		}
	}
	return "none"
}

func parseUint(s string) uint64 {
	n, _ := strconv.ParseUint(s, 10, 64)
	return n
}

// knownBug skips the rest of a test that has just found a pcpd bug already
// reported (RELIABILITY.md "Known bugs"), so CI stays green while the
// owner fixes it; PCPD_KNOWN_BUGS=1 makes it fail as it should. It is
// called only after the violation was measured and logged: once the bug
// is fixed the test passes without skipping.
func knownBug(t *testing.T, what string) {
	t.Helper()
	if os.Getenv("PCPD_KNOWN_BUGS") == "" {
		t.Skipf("known bug: %s (figures above; PCPD_KNOWN_BUGS=1 to fail)", what)
	}
}

func metricSum(m map[string]float64, name string) float64 {
	var s float64
	for k, v := range m {
		if k == name || strings.HasPrefix(k, name+"{") {
			s += v
		}
	}
	return s
}

func dropSummary(m0, m1 map[string]float64) string {
	var parts []string
	for k, v := range m1 {
		if strings.HasPrefix(k, "pcpd_requests_dropped_total{") {
			if d := v - m0[k]; d > 0 {
				parts = append(parts, fmt.Sprintf("%s %.0f", strings.TrimPrefix(k, "pcpd_requests_dropped_total"), d))
			}
		}
	}
	slices.Sort(parts)
	return strings.Join(parts, ", ")
}

// TestQuotaAndRateLimitMAP15: per-client quotas and the per-source rate
// limit hold (issue 9; PROTOCOL.md MAP-15, PKT-08). With
// --max-leases-per-client 50, a client asking for 80 mappings (from 80
// sources of its prefix) gets exactly 50 SUCCESS and 30 USER_EX_QUOTA, the
// kernel holds exactly its 50 pinholes, renewals still succeed and another
// client is unaffected. A burst of 1000 ANNOUNCEs from one source gets no
// more answers than the bucket allows (burst 100 + 50/s).
func TestQuotaAndRateLimitMAP15(t *testing.T) {
	l := newLab(t, labOptions{extra: []string{"--max-leases-per-client", "50"}})
	l.start()
	var ok, quota int
	for i := uint32(0); i < 80; i++ {
		src := floodSrc(i)
		resp, err := do(l.pcpClient(src), pcp.NewMap(src, pcp.ProtoUDP, 6000, time.Hour))
		if err != nil {
			t.Fatal(err)
		}
		switch resp.Result {
		case pcp.Success:
			ok++
		case pcp.UserExQuota:
			quota++
			if l.kernelHas(src, pcp.ProtoUDP, 6000) {
				t.Fatalf("USER_EX_QUOTA for %s but a pinhole is in the kernel", src)
			}
		default:
			t.Fatalf("MAP %d: %v", i, resp.Result)
		}
	}
	inKernel := 0
	for _, e := range l.kernel() {
		if floodPrefix6.Contains(e.Pinhole.InternalAddr) {
			inKernel++
		}
	}
	if ok != 50 || quota != 30 || inKernel != 50 {
		t.Fatalf("quota 50: %d SUCCESS, %d USER_EX_QUOTA, %d pinholes in the kernel; want 50, 30, 50", ok, quota, inKernel)
	}
	if r, err := do(l.pcpClient(floodSrc(0)), pcp.NewMap(floodSrc(0), pcp.ProtoUDP, 6000, 2*time.Hour)); err != nil || r.Result != pcp.Success {
		t.Fatalf("renewal at the quota: %v %v", r, err)
	}
	l.mustMap(l.pcpClient(l.topo.ClientV6), l.topo.ClientV6, pcp.ProtoUDP, 6000, time.Hour)

	// Rate limit: 1000 ANNOUNCEs back to back from one source.
	src := l.topo.ClientV6
	conn := l.clientSocket(src)
	req := announceBytes(src)
	time.Sleep(2 * time.Second) // refill the bucket after the MAPs above
	start := time.Now()
	for i := 0; i < 1000; i++ {
		if _, err := conn.WriteToUDPAddrPort(req, l.server6()); err != nil {
			t.Fatal(err)
		}
	}
	answers := 0
	buf := make([]byte, 2048)
	for {
		conn.SetReadDeadline(time.Now().Add(time.Second))
		if _, _, err := conn.ReadFromUDPAddrPort(buf); err != nil {
			break
		}
		answers++
	}
	window := time.Since(start).Seconds() - 1
	allowed := 100 + 50*window
	if float64(answers) > allowed+5 {
		t.Fatalf("1000 ANNOUNCEs in %.2fs from one source: %d answered, the bucket allows %.0f", window, answers, allowed)
	}
	if answers < 90 {
		t.Fatalf("only %d of 1000 answered: less than the burst of 100", answers)
	}
	// For the record (not a requirement): how many back-to-back
	// unsupported-version packets are answered (PKT-09 puts the version
	// check before the overload limit; each reply is at most the request
	// padded to ×4, (f)).
	time.Sleep(time.Second)
	v3 := withLen([]byte{3, 1}, 24)
	for i := 0; i < 1000; i++ {
		conn.WriteToUDPAddrPort(v3, l.server6())
	}
	v3answers := 0
	for {
		conn.SetReadDeadline(time.Now().Add(time.Second))
		if _, _, err := conn.ReadFromUDPAddrPort(buf); err != nil {
			break
		}
		v3answers++
	}
	t.Logf("quota 50: 50 SUCCESS, 30 USER_EX_QUOTA, 50 pinholes, renewal and other client fine; rate limit: 1000 back-to-back ANNOUNCEs in %.2fs → %d answered (bucket allows %.0f); 1000 back-to-back version-3 packets → %d answered", window, answers, allowed, v3answers)
}

// TestMillionSourcesMemorySEC04: a million distinct spoofed sources (each
// in its own /64, the worst case for a per-/64 limiter) send ANNOUNCEs on
// the serving interface (issue 9 "memory stays bounded"; SEC-04). pcpd's
// RSS is read from /proc before, after 250 000 and after 1 000 000
// sources: the last 750 000 may add at most 16 MiB (the per-source state
// is bounded, not proportional), the whole run at most 64 MiB; pcpd still
// answers a legitimate client afterwards.
//
// The sources are all in one owner's prefix, so pcpd's kernel owner meter
// (pinhole/ownermeter.go) would drop all but 400 a second of them (1600
// before known bug 5's fix) before pcpd saw them (24 384 of the million
// reached pcpd with it on at 1600). That is
// the meter's job, but this test is about pcpd's own per-source state,
// which must stay bounded where nothing sheds the flood first (attached
// mode installs no meter; sources spread over many owners): so the lab
// runs without the kernel meter (--kernel-rate-limit 0). The meter's own
// state is bounded by construction (sets of MeterSize, maps as large as
// the configured prefixes).
func TestMillionSourcesMemorySEC04(t *testing.T) {
	l := newLab(t, labOptions{extra: []string{"--kernel-rate-limit", "0"}})
	l.start()
	pid := l.pid()
	sp := newSpoofer(t, l.topo.Client, l.server6())
	m0, _ := l.metrics()
	p0, err := readProc(pid)
	if err != nil {
		t.Fatal(err)
	}
	const total = 1000000
	var rss []int
	start := time.Now()
	pkt := announceBytes(floodSrc(0))
	for i := uint32(0); i < total; i++ {
		src := floodSrc(i)
		a := src.As16()
		copy(pkt[8:24], a[:])
		if err := sp.send(src, pkt); err != nil {
			t.Fatal(err)
		}
		// Pace to what one engine goroutine answers on a busy 2-core box,
		// so the sources reach pcpd's per-source state rather than die in
		// the socket queue.
		if i%2000 == 1999 {
			time.Sleep(5 * time.Millisecond)
		}
		if (i+1)%250000 == 0 {
			time.Sleep(time.Second)
			p, err := readProc(pid)
			if err != nil {
				t.Fatalf("pcpd gone: %v", err)
			}
			rss = append(rss, p.rssKiB)
		}
	}
	took := time.Since(start)
	m1, _ := l.metrics()
	answered := metricSum(m1, "pcpd_requests_total") - metricSum(m0, "pcpd_requests_total")
	ctxResp, err := l.announceWait(l.topo.ClientV6)
	if err != nil || ctxResp.Result != pcp.Success {
		t.Fatalf("legitimate client not answered after the flood: %v %v", ctxResp, err)
	}
	growthLate := (rss[3] - rss[0]) / 1024
	growth := (rss[3] - p0.rssKiB) / 1024
	t.Logf("1 000 000 spoofed sources (one per /64) in %v: %.0f answered, dropped %s; RSS %d MiB before, after 250k/500k/750k/1M: %d/%d/%d/%d MiB (+%d MiB over the last 750k, +%d MiB total)",
		took.Round(time.Millisecond), answered, dropSummary(m0, m1), p0.rssKiB/1024, rss[0]/1024, rss[1]/1024, rss[2]/1024, rss[3]/1024, growthLate, growth)
	if answered < total/2 {
		t.Errorf("only %.0f of %d sources reached pcpd's answer path: the test did not exercise per-source state", answered, total)
	}
	if growth > 64 {
		t.Fatalf("RSS grew %d MiB in all (bound 64)", growth)
	}
	if growthLate > 16 {
		// The growth that was here (+5/+6/+7 MiB per 250k sources, 11:06)
		// was the per-source limiter: a golang-lru map churned by a new key
		// per packet kept growing at its 65 536-entry cap (live heap +13.6
		// MiB at 250k sources, +18.7 MiB at 1M), plus x/net's allocations
		// per datagram. The limiter is now a fixed table (2 MiB, flat:
		// policy TestRateLimiterMemoryFlatSEC04) and the readers allocate
		// nothing per datagram: 27/29/28/28 MiB after each 250k.
		t.Fatalf("RSS grew %d MiB over the last 750k sources (bound 16): per-source state is not bounded", growthLate)
	}
}

// announceWait retries an ANNOUNCE for up to 5 s.
func (l *lab) announceWait(src netip.Addr) (*pcp.Response, error) {
	c := l.pcpClient(src)
	c.MaxAttempts = 5
	return do(c, pcp.NewAnnounce(src))
}

// TestNonServingInterfaceSEC01: requests that arrive on an interface pcpd
// does not serve are never answered (issue 9; PROTOCOL.md SEC-01): from the
// internet namespace to the host's WAN addresses (IPv6, IPv4, PCP and
// NAT-PMP) and to the serving addresses themselves routed in via the WAN.
// Nothing is answered and nothing changes in the kernel; the same requests
// from the client side are answered (the probe works).
func TestNonServingInterfaceSEC01(t *testing.T) {
	l := newLab(t, labOptions{})
	l.start()
	before := kernelSet(l.kernel())
	in6, in4 := l.topo.InternetV6, l.topo.InternetV4
	targets := []netip.Addr{l.topo.HostWANV6, l.topo.HostPublicV4, l.topo.HostTunnelV6, l.topo.HostTunnelV4}
	var sent int
	for _, dst := range targets {
		src := in6
		if dst.Is4() {
			src = in4
		}
		pkts := map[string][]byte{
			"ANNOUNCE":        announceBytes(src),
			"MAP":             mapBytes(src, pcp.ProtoTCP, 8080, time.Hour),
			"bad version":     withLen([]byte{3, 1}, 24),
			"PCP 1104 octets": withLen(mapBytes(src, pcp.ProtoTCP, 8080, time.Hour), 1104),
		}
		if src.Is4() {
			pkts["NAT-PMP address"] = []byte{0, 0}
			pkts["NAT-PMP map"] = []byte{0, 2, 0, 0, 0x1f, 0x90, 0x1f, 0x90, 0, 0, 0x1c, 0x20}
			pkts["NAT-PMP bad opcode"] = []byte{0, 9}
		}
		conn, err := socketIn(l.topo.Internet, src)
		if err != nil {
			t.Fatal(err)
		}
		for name, p := range pkts {
			reply, err := rawExchange(conn, netip.AddrPortFrom(dst, pcp.Port), p, 500*time.Millisecond)
			if err != nil {
				t.Fatal(err)
			}
			sent++
			if reply != nil {
				t.Errorf("%s from the internet to %s: answered (%d octets)", name, dst, len(reply))
			}
		}
		conn.Close()
	}
	after := kernelSet(l.kernel())
	if len(after) != len(before) {
		t.Fatalf("kernel changed: %d pinholes before, %d after", len(before), len(after))
	}
	// The probe itself works: the same kind of request from the client is
	// answered on the serving interface.
	for _, src := range []netip.Addr{l.topo.ClientV6, l.topo.ClientV4} {
		if r, err := l.announceWait(src); err != nil || r.Result != pcp.Success {
			t.Fatalf("control: ANNOUNCE from the client %s not answered: %v %v", src, r, err)
		}
	}
	t.Logf("non-serving interface: %d requests from the internet to 4 host addresses, 0 answered, kernel unchanged; client control answered", sent)
}

// TestOwnershipAttacksWireGuard is the ownership attack over a real
// WireGuard tunnel, ownership from the peer's AllowedIPs (PROTOCOL.md
// choice (a), SEC-03): THIRD_PARTY outside the peer's AllowedIPs, the
// host's tunnel addresses, a spoofed Client IP, and datagrams whose source
// lies outside the peer's AllowedIPs (WireGuard itself must drop them, so
// pcpd never sees them). Nothing is granted and no pinhole appears.
func TestOwnershipAttacksWireGuard(t *testing.T) {
	l := newLab(t, labOptions{wireGuard: true})
	l.start()
	cli, cli4 := l.topo.ClientV6, l.topo.ClientV4
	before := kernelSet(l.kernel())
	outside := netip.MustParseAddr("2001:db8:1:4::5") // no peer's AllowedIPs
	attacks := []attackCase{
		{"TP-03 THIRD_PARTY outside the peer's AllowedIPs", cli, cat(mapBytes(cli, pcp.ProtoTCP, 9000, time.Hour), tpOpt(outside)), int(pcp.NotAuthorized)},
		{"TP-03 THIRD_PARTY = host's tunnel address", cli, cat(mapBytes(cli, pcp.ProtoTCP, 9000, time.Hour), tpOpt(l.topo.HostTunnelV6)), wantNotSuccess},
		{"TP-03 THIRD_PARTY = ::ffff:10.100.0.1 (host) over IPv4", cli4, cat(mapBytes(cli4, pcp.ProtoTCP, 9000, time.Hour), tpOpt(l.topo.HostTunnelV4)), wantNotSuccess},
		{"TP-03 THIRD_PARTY = 10.100.0.3 (outside AllowedIPs) over IPv4", cli4, cat(mapBytes(cli4, pcp.ProtoTCP, 9000, time.Hour), tpOpt(netip.MustParseAddr("10.100.0.3"))), int(pcp.NotAuthorized)},
		{"ADDR-01 Client IP outside the peer's AllowedIPs", cli, setClientIP(mapBytes(cli, pcp.ProtoTCP, 9000, time.Hour), outside), int(pcp.AddressMismatch)},
		{"SEC-03 spoofed IPv6 source outside AllowedIPs", outside, mapBytes(outside, pcp.ProtoTCP, 9000, time.Hour), wantDrop},
	}
	l.sendAttacks(t, attacks)
	after := kernelSet(l.kernel())
	if len(after) != len(before) {
		t.Fatalf("kernel: %d pinholes before, %d after the attacks", len(before), len(after))
	}
	t.Logf("WireGuard ownership attacks: %d sent, all refused or dropped by WireGuard; pinholes appeared: 0", len(attacks))
}

// TestSiteRenewsAtOncePKT08: the legitimate case the kernel's owner meter
// must not cut (known bug 5 lowered its default to pcpd's own owner
// bucket, 400/s, burst 800): a site whose hosts, each in its own /64 of
// one client's prefix, renew the client's whole quota (256 leases, the
// default --max-leases-per-client; and 1 200, an explicit quota above the
// burst of 800, which the kernel cut to 800 until the owner burst followed
// the quota) back to back. Every renewal is answered SUCCESS and the owner
// meter drops nothing. Checked to fail with PCPD_LAB_EXTRA="--kernel-rate-limit 100
// --kernel-owner-rate-limit 100" (burst 200: 200 of 256 answered, the
// owner meter dropped 56), and the 1 200 case without the config fix.
func TestSiteRenewsAtOncePKT08(t *testing.T) {
	requireRoot(t)
	for _, tc := range []struct {
		name  string
		hosts int
		extra []string
	}{
		{"default quota", 256, nil},
		{"quota 1200", 1200, []string{"--max-leases-per-client", "1200"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			siteRenewsAtOnce(t, tc.hosts, tc.extra)
		})
	}
}

func siteRenewsAtOnce(t *testing.T, hosts int, extra []string) {
	l := newLab(t, labOptions{extra: extra})
	l.start()
	reqs := make([][]byte, hosts)
	for i := range hosts {
		src := floodSrc(uint32(1 + i))
		req := pcp.NewMap(src, pcp.ProtoUDP, 6000, time.Hour)
		if r, err := do(l.pcpClient(src), req); err != nil || r.Result != pcp.Success {
			t.Fatalf("host %d: MAP: %v %v", i, r, err)
		}
		reqs[i] = pcp.AppendRequest(nil, req) // the same nonce: a renewal
	}
	// The owner bucket refills (its burst, at least the quota, at 400/s).
	time.Sleep(time.Second + time.Duration(max(800, hosts))*time.Second/400)
	m0, err := l.metrics()
	if err != nil {
		t.Fatal(err)
	}
	o0 := ownerMeterDrops(l.topo.Host)
	sp := newSpoofer(t, l.topo.Client, l.server6())
	start := time.Now()
	for i, b := range reqs {
		if err := sp.send(floodSrc(uint32(1+i)), b); err != nil {
			t.Fatal(err)
		}
	}
	sent := time.Since(start)
	var ok float64
	err = netlab.Eventually(5*time.Second, func() error {
		m1, err := l.metrics()
		if err != nil {
			return err
		}
		if ok = mapSuccesses(m1) - mapSuccesses(m0); ok < float64(hosts) {
			return fmt.Errorf("%.0f of %d renewals answered SUCCESS", ok, hosts)
		}
		return nil
	})
	drops := ownerMeterDrops(l.topo.Host) - o0
	if m1, err := l.metrics(); err == nil {
		for k, v := range m1 {
			if strings.Contains(k, "dropped") && v != m0[k] {
				t.Logf("%s: %.0f", k, v-m0[k])
			}
		}
	}
	t.Logf("%d renewals from %d /64s of one client sent in %v: %.0f answered SUCCESS; owner meter %s dropped %d", hosts, hosts, sent, ok, ownerMeterLimit(l.topo.Host), drops)
	if err != nil || drops > 0 {
		t.Errorf("a site renewing its %d leases at once: %v; owner meter drops %d", hosts, err, drops)
	}
}

// mapSuccesses is pcpd's count of MAP requests answered SUCCESS.
func mapSuccesses(m map[string]float64) float64 {
	var n float64
	for k, v := range m {
		if strings.HasPrefix(k, "pcpd_requests_total{") && strings.Contains(k, `opcode="MAP"`) && strings.Contains(k, `result="SUCCESS"`) {
			n += v
		}
	}
	return n
}
