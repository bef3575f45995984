package reliability

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/control"
	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/internal/pcpdtest"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
)

func TestMain(m *testing.M) {
	if arg := os.Getenv(flooderEnv); arg != "" {
		// Re-executed as TestFloodFairnessPKT08's flooder process.
		os.Exit(flooderMain(arg))
	}
	os.Exit(pcpdtest.Main(m))
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("reliability: needs root (network namespaces, nftables, tmpfs, bind mounts); CI runs it as root: sudo go test ./reliability/")
	}
}

// Address plan on top of netlab's topology. The client namespace answers
// for whole extra prefixes (AnyIP local routes) and the host routes them to
// it, so one namespace can play many clients and many spoofed sources.
var (
	floodPrefix6  = netip.MustParsePrefix("2001:db8:100::/40") // client "flood": 2^24 /64s
	victimPrefix6 = netip.MustParsePrefix("2001:db8:1:4::/64") // client "victim"
	nobodyPrefix6 = netip.MustParsePrefix("2001:db8:1:5::/64") // owned by no client
	floodPrefix4  = netip.MustParsePrefix("10.100.1.0/24")     // client "flood"
	nobodyPrefix4 = netip.MustParsePrefix("10.100.2.0/24")     // owned by no client
	victimAddr6   = netip.MustParseAddr("2001:db8:1:4::5")     // a victim's server address
	hostV4Routes  = netip.MustParsePrefix("10.100.0.0/16")     // Internet → Host
	metricsAddr   = "127.0.0.1:9351"                           // inside the host namespace
	servicePort   = uint16(8080)                               // the client's TCP service
)

// labOptions chooses a lab.
type labOptions struct {
	wireGuard bool     // WireGuard topology, ownership from WireGuard
	stateDir  string   // default: a fresh temporary directory
	extra     []string // more pcpd serve flags
}

// lab is one topology with one pcpd (started, killed, restarted at will).
type lab struct {
	t      testing.TB
	topo   *netlab.Topology
	bin    string
	dir    string // state directory
	socket string
	opts   labOptions
	pcpd   *pcpdtest.Daemon
	log    logBuf // pcpd's output across its runs

	fw *pinhole.Backend // reads pcpd's sets in the host namespace
}

func newLab(t testing.TB, opts labOptions) *lab {
	t.Helper()
	requireRoot(t)
	l := &lab{t: t, bin: pcpdtest.Binary(t), opts: opts}
	l.topo = netlab.NewTopology(t, netlab.TopologyOptions{WireGuard: opts.wireGuard})
	if opts.wireGuard {
		t.Cleanup(func() {
			for _, ifc := range []string{l.topo.HostLANIf, l.topo.ClientIf} {
				os.Remove(filepath.Join(netlab.SocketDir, ifc+".sock"))
			}
		})
	}
	tmp := t.TempDir()
	l.dir = opts.stateDir
	if l.dir == "" {
		l.dir = filepath.Join(tmp, "state")
	}
	l.socket = filepath.Join(tmp, "pcpd.sock")
	l.pcpd = pcpdtest.New(t, pcpdtest.Config{
		NS:    l.topo.Host,
		Args:  l.args(),
		Ready: pcpdtest.Announce(l.topo.Client, l.topo.ClientV6, l.server6()),
	})
	l.log = logBuf{l.pcpd.Log()}

	h, c, in := l.topo.Host, l.topo.Client, l.topo.Internet
	if !opts.wireGuard {
		cli := l.topo.ClientV6.String()
		for _, p := range []netip.Prefix{floodPrefix6, victimPrefix6, nobodyPrefix6} {
			h.MustRun(t, "ip", "-6", "route", "add", p.String(), "via", cli, "dev", l.topo.HostLANIf)
			c.MustRun(t, "ip", "-6", "route", "add", "local", p.String(), "dev", "lo")
		}
		for _, p := range []netip.Prefix{floodPrefix4, nobodyPrefix4} {
			h.MustRun(t, "ip", "route", "add", p.String(), "via", l.topo.ClientV4.String(), "dev", l.topo.HostLANIf)
			c.MustRun(t, "ip", "route", "add", "local", p.String(), "dev", "lo")
		}
	}
	in.MustRun(t, "ip", "route", "add", hostV4Routes.String(), "via", l.topo.HostPublicV4.String())
	in.MustRun(t, "ip", "-6", "route", "add", floodPrefix6.String(), "via", l.topo.HostWANV6.String())
	// Many spoofed sources must not fill the neighbour or route caches of
	// the namespaces before they reach pcpd.
	for _, ns := range []*netlab.NS{h, c} {
		ns.MustRun(t, "sh", "-c", "echo 1000000 > /proc/sys/net/ipv6/route/max_size 2>/dev/null; true")
	}

	conn, err := l.topo.Host.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	if l.fw, err = pinhole.New(conn, pinhole.Config{Table: "pcpd"}); err != nil {
		t.Fatal(err)
	}
	if opts.wireGuard {
		l.waitTunnel()
	}
	return l
}

// floodSrc returns the n-th source of the flood client, each in its own
// /64: pcpd rate-limits IPv6 sources per /64 (server.Config.RatePrefix6),
// so distinct /64s are what an attacker would use and what keeps the
// tests' own bulk traffic clear of the limit.
func floodSrc(n uint32) netip.Addr {
	a := floodPrefix6.Addr().As16()
	a[5], a[6], a[7] = byte(n>>16), byte(n>>8), byte(n)
	a[15] = 1
	return netip.AddrFrom16(a)
}

// waitTunnel waits until the WireGuard tunnel carries traffic.
func (l *lab) waitTunnel() {
	l.t.Helper()
	probe := net.JoinHostPort(l.topo.HostTunnelV6.String(), "9")
	c, err := l.topo.Host.StartTCPServer(probe)
	if err != nil {
		l.t.Fatal(err)
	}
	defer c.Close()
	// 30 s, not 15: after the host's WireGuard device is re-created
	// (TestWireGuardInterfaceGone) the client still sends with its old
	// session's keys, which the new device cannot decrypt; WireGuard only
	// starts a new handshake after KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
	// (10 + 5 s, plus jitter) without an answer, so recovery takes 15 s
	// and more (one CI run timed out at exactly 15 s).
	if err := netlab.Eventually(30*time.Second, func() error { return l.topo.Client.DialTCP(probe, time.Second) }); err != nil {
		l.t.Fatalf("tunnel carries no traffic: %v", err)
	}
}

// args is pcpd serve's command line.
func (l *lab) args() []string {
	a := []string{"serve",
		"--interface", l.topo.HostLANIf,
		"--external-ipv4", l.topo.HostPublicV4.String(),
		"--state-dir", l.dir,
		"--socket", l.socket,
		"--log-level", "info",
		"--metrics", metricsAddr,
	}
	if !l.opts.wireGuard {
		a = append(a,
			"--client", "cli="+l.topo.ClientPrefix6.String()+","+l.topo.ClientPrefix4.String(),
			"--client", "flood="+floodPrefix6.String()+","+floodPrefix4.String(),
			"--client", "victim="+victimPrefix6.String(),
		)
	}
	a = append(a, l.opts.extra...)
	// PCPD_LAB_EXTRA: more serve flags for an experiment (e.g.
	// "--kernel-owner-rate-limit 400"), after the test's own.
	return append(a, strings.Fields(os.Getenv("PCPD_LAB_EXTRA"))...)
}

// start runs pcpd serve in the host namespace and waits until it answers
// an ANNOUNCE from the client over the serving interface.
func (l *lab) start() { l.t.Helper(); l.pcpd.MustStart() }

// pid is the running pcpd's process id.
func (l *lab) pid() int { return l.pcpd.PID() }

// running reports whether pcpd is alive.
func (l *lab) running() bool { return l.pcpd.Running() }

// kill9 kills pcpd with SIGKILL and waits for it to be gone.
func (l *lab) kill9() { l.pcpd.Kill() }

// stop ends pcpd with SIGTERM (an orderly stop).
func (l *lab) stop() { l.pcpd.Stop() }

// server6 and server4 are pcpd's serving addresses.
func (l *lab) server6() netip.AddrPort { return netip.AddrPortFrom(l.topo.HostTunnelV6, pcp.Port) }
func (l *lab) server4() netip.AddrPort { return netip.AddrPortFrom(l.topo.HostTunnelV4, pcp.Port) }

func (l *lab) serverFor(src netip.Addr) netip.AddrPort {
	if src.Is4() {
		return l.server4()
	}
	return l.server6()
}

// socket opens a UDP socket in ns bound to src (any address: FREEBIND lets
// the client namespace use addresses it only has a local route for).
func socketIn(ns *netlab.NS, src netip.Addr) (*net.UDPConn, error) {
	network := "udp6"
	if src.Is4() {
		network = "udp4"
	}
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		rc.Control(func(fd uintptr) {
			if src.Is4() {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_FREEBIND, 1)
			} else {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_FREEBIND, 1)
			}
		})
		return serr
	}}
	var pc net.PacketConn
	err := ns.Do(func() (err error) {
		pc, err = lc.ListenPacket(context.Background(), network, netip.AddrPortFrom(src, 0).String())
		return err
	})
	if err != nil {
		return nil, err
	}
	return pc.(*net.UDPConn), nil
}

// clientSocket is socketIn for the client namespace; closed at test end.
func (l *lab) clientSocket(src netip.Addr) *net.UDPConn {
	l.t.Helper()
	c, err := socketIn(l.topo.Client, src)
	if err != nil {
		l.t.Fatal(err)
	}
	l.t.Cleanup(func() { c.Close() })
	return c
}

// pcpClient returns a PCP client in the client namespace speaking from src.
// Retransmission is quick: the lab's network loses nothing, so a missing
// answer means pcpd did not answer.
func (l *lab) pcpClient(src netip.Addr) *pcp.Client {
	return &pcp.Client{Conn: l.clientSocket(src), Server: l.serverFor(src), InitialTimeout: 250 * time.Millisecond, MaxAttempts: 3}
}

// announce sends one ANNOUNCE from src and returns the response.
func (l *lab) announce(ctx context.Context, src netip.Addr) (*pcp.Response, error) {
	c, err := socketIn(l.topo.Client, src)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	pc := &pcp.Client{Conn: c, Server: l.serverFor(src), InitialTimeout: 100 * time.Millisecond, MaxAttempts: 1}
	var resp pcp.Response
	if err := pc.Do(ctx, pcp.NewAnnounce(src), &resp); err != nil {
		return nil, err
	}
	return &resp, nil
}

// do sends req through c with a bounded wait.
func do(c *pcp.Client, req *pcp.Request) (*pcp.Response, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	var resp pcp.Response
	if err := c.Do(ctx, req, &resp); err != nil {
		return nil, err
	}
	return &resp, nil
}

// mustMap maps proto/port for c's client address and requires SUCCESS.
func (l *lab) mustMap(c *pcp.Client, src netip.Addr, proto pcp.Protocol, port uint16, life time.Duration) *pcp.Response {
	l.t.Helper()
	return l.mustMapTo(c, src, proto, port, port, life)
}

// mustMapTo is mustMap suggesting the external port ext.
func (l *lab) mustMapTo(c *pcp.Client, src netip.Addr, proto pcp.Protocol, port, ext uint16, life time.Duration) *pcp.Response {
	l.t.Helper()
	req := pcp.NewMap(src, proto, port, life)
	req.Map.ExternalPort = ext
	resp, err := do(c, req)
	if err != nil {
		l.t.Fatalf("MAP %v/%d from %s: %v", proto, port, src, err)
	}
	if resp.Result != pcp.Success {
		l.t.Fatalf("MAP %v/%d from %s: %v", proto, port, src, resp.Result)
	}
	return resp
}

// mustPMP asks for a NAT-PMP mapping (op: PMPOpMapTCP or PMPOpMapUDP) of
// port through c, suggesting the same external port, and requires SUCCESS
// with the lifetime asked; it returns the external endpoint.
func (l *lab) mustPMP(c *pcp.Client, op pcp.PMPOpcode, port uint16, life time.Duration) netip.AddrPort {
	l.t.Helper()
	return l.mustPMPSuggest(c, op, port, port, life)
}

// mustPMPSuggest is mustPMP suggesting external port sugg.
func (l *lab) mustPMPSuggest(c *pcp.Client, op pcp.PMPOpcode, port, sugg uint16, life time.Duration) netip.AddrPort {
	l.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var r pcp.PMPResponse
	err := c.DoPMP(ctx, &pcp.PMPRequest{Opcode: op, InternalPort: port, SuggestedExternalPort: sugg, Lifetime: life}, &r)
	if err != nil || r.Result != pcp.PMPSuccess || r.Lifetime != life {
		l.t.Fatalf("NAT-PMP %v of %d (suggesting %d) for %v: %v, lifetime %v, %v", op, port, sugg, life, r.Result, r.Lifetime, err)
	}
	return netip.AddrPortFrom(l.topo.HostPublicV4, r.ExternalPort)
}

// rawExchange sends b from conn to pcpd and returns the first datagram
// that comes back from pcpd's address within wait (nil: none).
func rawExchange(conn *net.UDPConn, server netip.AddrPort, b []byte, wait time.Duration) ([]byte, error) {
	if _, err := conn.WriteToUDPAddrPort(b, server); err != nil {
		return nil, err
	}
	buf := make([]byte, 4096)
	deadline := time.Now().Add(wait)
	for {
		conn.SetReadDeadline(deadline)
		n, from, err := conn.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return nil, nil
			}
			return nil, err
		}
		if netip.AddrPortFrom(from.Addr().Unmap(), from.Port()) == server && !otherMapping(b, buf[:n]) {
			return append([]byte(nil), buf[:n]...), nil
		}
	}
}

// otherMapping reports whether reply is a PCP MAP or PEER response for
// another mapping than request's (another nonce): an unsolicited update
// (RFC 6887 §14.2, since h/upd: a revoked mapping's NOT_AUTHORIZED comes
// to the socket that made it), which a client matches by nonce and does
// not take for its answer (§11.4, §12.4). Every solicited reply echoes the
// request's nonce (a success copies it, an error the request's octets).
func otherMapping(request, reply []byte) bool {
	const nonceEnd = 36
	if len(request) < nonceEnd || len(reply) < nonceEnd || request[0] != pcp.Version || reply[0] != pcp.Version ||
		request[1]&0x80 != 0 || reply[1]&0x80 == 0 {
		return false
	}
	op := pcp.Opcode(reply[1] & 0x7f)
	return (op == pcp.OpMap || op == pcp.OpPeer) && op == pcp.Opcode(request[1]) && string(request[24:nonceEnd]) != string(reply[24:nonceEnd])
}

// kernel lists pcpd's pinholes as the kernel holds them.
func (l *lab) kernel() []pinhole.Entry {
	l.t.Helper()
	es, err := l.fw.List()
	if err != nil {
		l.t.Fatalf("list pcpd's nftables sets: %v", err)
	}
	return es
}

// kernelHas reports whether a pinhole for addr proto/port is in the kernel.
func (l *lab) kernelHas(addr netip.Addr, proto pcp.Protocol, port uint16) bool {
	for _, e := range l.kernel() {
		p := e.Pinhole
		if p.InternalAddr == addr && p.Protocol == uint8(proto) && p.InternalPort == port {
			return true
		}
	}
	return false
}

// leases runs `pcpd leases --json` against the control socket.
func (l *lab) leases() []control.Lease {
	l.t.Helper()
	ls, err := l.tryLeases()
	if err != nil {
		l.t.Fatal(err)
	}
	return ls
}

func (l *lab) tryLeases() ([]control.Lease, error) {
	out, err := exec.Command(l.bin, "leases", "--json", "--socket", l.socket).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return nil, fmt.Errorf("pcpd leases --json: %v: %s", err, ee.Stderr)
		}
		return nil, fmt.Errorf("pcpd leases --json: %w", err)
	}
	var ls []control.Lease
	if err := json.Unmarshal(out, &ls); err != nil {
		return nil, fmt.Errorf("pcpd leases --json: %v: %.200s", err, out)
	}
	return ls, nil
}

// leaseKey identifies a lease for set comparisons.
type leaseKey struct {
	addr  netip.Addr
	proto string
	port  uint16
}

func (k leaseKey) String() string {
	return fmt.Sprintf("%s [%s]:%d", k.proto, k.addr, k.port)
}

func leaseSet(ls []control.Lease) map[leaseKey]control.Lease {
	m := make(map[leaseKey]control.Lease, len(ls))
	for _, x := range ls {
		m[leaseKey{x.InternalAddress, x.Protocol, x.InternalPort}] = x
	}
	return m
}

// status asks the daemon for its status over the control socket.
func (l *lab) status() control.Status {
	l.t.Helper()
	c := &control.Client{Path: l.socket, Timeout: 5 * time.Second}
	st, err := c.Status(context.Background())
	if err != nil {
		l.t.Fatal(err)
	}
	return st
}

// metrics fetches /metrics from inside the host namespace.
func (l *lab) metrics() (map[string]float64, error) {
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (c net.Conn, err error) {
			err = l.topo.Host.Do(func() (err error) {
				c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
				return err
			})
			return c, err
		},
	}}
	resp, err := hc.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	m := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		m[line[:i]] += v
	}
	return m, sc.Err()
}

// proc reads a pcpd process figure: VmRSS in KiB and open descriptors.
type procStat struct {
	rssKiB int
	fds    int
}

func readProc(pid int) (procStat, error) {
	var ps procStat
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return ps, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			ps.rssKiB, _ = strconv.Atoi(f[1])
		}
	}
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return ps, err
	}
	ps.fds = len(ents)
	return ps, nil
}

// dialService tries a TCP connection from the internet namespace to the
// client's service.
func (l *lab) dialService(addr netip.Addr, port uint16) error {
	return l.topo.Internet.DialTCP(netip.AddrPortFrom(addr, port).String(), time.Second)
}

// logBuf is pcpd's output under the names the tests use.
type logBuf struct{ *pcpdtest.Log }

func (b logBuf) len() int             { return b.Len() }
func (b logBuf) since(off int) string { return b.Since(off) }
func (b logBuf) tail(n int) string    { return b.Tail(n) }

// waitFor polls cond every 20 ms until it holds or timeout passes and
// returns how long it took.
func waitFor(timeout time.Duration, cond func() bool) (time.Duration, bool) {
	start := time.Now()
	for {
		if cond() {
			return time.Since(start), true
		}
		if time.Since(start) > timeout {
			return time.Since(start), false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// percentile returns the p-th percentile (0–100) of sorted durations.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted)-1) * p / 100)
	return sorted[i]
}
