package interop

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
)

// binDir holds the pcpd binary built for this test process (tsBuild.dir
// the Tailscale client's).
var binDir string

func TestMain(m *testing.M) {
	code := m.Run()
	for _, dir := range []string{binDir, tsBuild.dir} {
		if dir != "" {
			os.RemoveAll(dir)
		}
	}
	os.Exit(code)
}

var pcpdBuild struct {
	once sync.Once
	path string
	err  error
}

// pcpdBinary builds ./cmd/pcpd once per test process: interop is about
// the daemon an operator runs, not an in-process server.
func pcpdBinary(t testing.TB) string {
	t.Helper()
	pcpdBuild.once.Do(func() {
		out, err := exec.Command("go", "env", "GOMOD").Output()
		if err != nil {
			pcpdBuild.err = fmt.Errorf("interop: go env GOMOD: %w", err)
			return
		}
		gomod := strings.TrimSpace(string(out))
		if gomod == "" || gomod == os.DevNull {
			pcpdBuild.err = errors.New("interop: not inside the pcpd module")
			return
		}
		if binDir, err = os.MkdirTemp("", "pcpd-interop-bin-"); err != nil {
			pcpdBuild.err = err
			return
		}
		path := filepath.Join(binDir, "pcpd")
		cmd := exec.Command("go", "build", "-o", path, "./cmd/pcpd")
		cmd.Dir = filepath.Dir(gomod)
		if out, err := cmd.CombinedOutput(); err != nil {
			pcpdBuild.err = fmt.Errorf("interop: go build ./cmd/pcpd: %v: %s", err, out)
			return
		}
		pcpdBuild.path = path
	})
	if pcpdBuild.err != nil {
		t.Fatal(pcpdBuild.err)
	}
	return pcpdBuild.path
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("interop: needs root (network namespaces, nftables); CI runs it as root: sudo go test ./interop/")
	}
}

// requireTool skips when an external client is not installed.
func requireTool(t testing.TB, name, pkg string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Skipf("interop: %s not installed (Debian package %s): %v", name, pkg, err)
	}
}

// lockedBuffer collects pcpd's output from its goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// lab is netlab's veth topology with pcpd serving on the Host's lan0:
// client c1 owns the Client's /64 and its IPv4, mapped to the Host's
// public 198.51.100.1.
type lab struct {
	topo *netlab.Topology
	log  *lockedBuffer
}

// newLab starts the lab; extra are more pcpd serve flags.
func newLab(t *testing.T, extra ...string) *lab {
	t.Helper()
	requireRoot(t)
	bin := pcpdBinary(t)
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	dir := t.TempDir()
	l := &lab{topo: topo, log: &lockedBuffer{}}
	args := []string{bin, "serve",
		"--interface", topo.HostLANIf,
		"--client", "c1=" + topo.ClientPrefix6.String() + "," + topo.ClientPrefix4.String(),
		"--external-ipv4", topo.HostPublicV4.String(),
		"--state-dir", filepath.Join(dir, "state"),
		"--socket", filepath.Join(dir, "pcpd.sock"),
		"--log-level", "warn",
	}
	args = append(args, extra...)
	cmd, err := topo.Host.Start(func(c *exec.Cmd) { c.Stdout, c.Stderr = l.log, l.log }, args...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		cmd.Wait()
		if t.Failed() {
			t.Logf("pcpd log:\n%s", l.log.String())
		}
	})
	if err := l.waitReady(); err != nil {
		t.Fatal(err)
	}
	return l
}

// waitReady polls with ANNOUNCE from the client until pcpd answers.
func (l *lab) waitReady() error {
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		c, err := l.pcpClient()
		if err != nil {
			return err
		}
		c.MaxAttempts, c.InitialTimeout = 1, 200*time.Millisecond
		var resp pcp.Response
		err = c.Do(context.Background(), pcp.NewAnnounce(l.topo.ClientV6), &resp)
		c.Conn.Close()
		if err == nil && resp.Result == pcp.Success {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("interop: pcpd did not answer ANNOUNCE within 15 s:\n%s", l.log.String())
}

// pcpClient returns pcp's client on a socket opened inside the Client
// namespace (a socket stays in the namespace it was created in), aimed at
// pcpd's IPv6 LAN address. The caller closes c.Conn.
func (l *lab) pcpClient() (*pcp.Client, error) {
	return l.pcpClientFrom(l.topo.ClientV6, l.topo.HostTunnelV6)
}

// pcpClientFrom is pcpClient from the client address from to the server
// address server.
func (l *lab) pcpClientFrom(from, server netip.Addr) (*pcp.Client, error) {
	var conn *net.UDPConn
	err := l.topo.Client.Do(func() (err error) {
		conn, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(from, 0)))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("interop: client socket: %w", err)
	}
	return &pcp.Client{
		Conn:           conn,
		Server:         netip.AddrPortFrom(server, pcp.Port),
		InitialTimeout: 250 * time.Millisecond,
	}, nil
}

// Data-plane checks. A mapping is "open" when a connection from the
// Internet namespace reaches the service in the Client namespace. pcpd
// replies only once the kernel holds the pinhole, but the first packets on
// a fresh topology may wait for neighbour discovery: Eventually absorbs it.
const (
	openWait   = 5 * time.Second
	closedWait = 700 * time.Millisecond
)

// reachTCP reports whether Internet reaches the greeting service at addr.
func (l *lab) reachTCP(addr netip.AddrPort) error {
	return netlab.Eventually(openWait, func() error {
		return l.topo.Internet.DialTCP(addr.String(), time.Second)
	})
}

// reachUDP reports whether Internet gets the echo from the service at addr.
func (l *lab) reachUDP(addr netip.AddrPort) error {
	return netlab.Eventually(openWait, func() error {
		return l.topo.Internet.ProbeUDP(addr.String(), 500*time.Millisecond)
	})
}

// blocked returns nil when proto traffic from Internet to addr does NOT
// reach the service. After a delete one attempt is enough: pcpd replies
// only after the kernel change.
func (l *lab) blocked(proto string, addr netip.AddrPort) error {
	var err error
	switch proto {
	case "tcp":
		err = l.topo.Internet.DialTCP(addr.String(), closedWait)
	case "udp":
		err = l.topo.Internet.ProbeUDP(addr.String(), closedWait)
	default:
		return fmt.Errorf("interop: unknown protocol %q", proto)
	}
	if err == nil {
		return fmt.Errorf("interop: %s %s still reachable from the internet after delete", proto, addr)
	}
	return nil
}
