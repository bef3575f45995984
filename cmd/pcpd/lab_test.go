package main

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pcpd/pcpd/control"
	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/internal/pcpdtest"
)

// binary builds this command once per test run: the lab and serve tests
// run the real executable, as an operator would.
func binary(t *testing.T) string { return pcpdtest.Binary(t) }

// The README's first command, end to end: every step passes, and nothing
// is left behind (namespaces, WireGuard sockets).
func TestLab(t *testing.T) {
	netlab.RequireRoot(t)
	bin := binary(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "lab")
	out, err := cmd.CombinedOutput()
	t.Logf("pcpd lab:\n%s", out)
	if err != nil {
		t.Fatalf("pcpd lab: %v", err)
	}
	s := string(out)
	if n := strings.Count(s, "     PASS ("); n != 13 || strings.Contains(s, "FAIL") {
		t.Errorf("%d steps passed, want 13, and no FAIL", n)
	}
	for _, want := range []string{"result    SUCCESS", "1 lease(s)", "pcpd_leases 1", "pcpd_ownership_refreshes_total", "revoked 1 lease(s)", "PASS: every step of the lab passed"} {
		if !strings.Contains(s, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	prefix := "pcpdt-" // netlab.New's, or $PCPD_NETNS_PREFIX
	if p := os.Getenv("PCPD_NETNS_PREFIX"); p != "" {
		prefix = p
	}
	names := regexp.MustCompile(regexp.QuoteMeta(prefix)+`[0-9a-f]{6}-[a-z]+`).FindAllString(s, -1)
	wgs := regexp.MustCompile(`\bwg[hc][0-9a-f]{12}\b`).FindAllString(s, -1)
	if len(names) == 0 || len(wgs) == 0 {
		t.Fatal("lab output names no namespaces or WireGuard interfaces")
	}
	list, _ := exec.Command("ip", "netns", "list").CombinedOutput()
	for _, n := range names {
		if strings.Contains(string(list), n) {
			t.Errorf("namespace %s left behind", n)
		}
	}
	for _, w := range wgs {
		if _, err := os.Stat(filepath.Join(netlab.SocketDir, w+".sock")); err == nil {
			t.Errorf("WireGuard socket of %s left behind", w)
		}
	}
}

// pcpd serve under systemd's eyes: READY=1 on NOTIFY_SOCKET once serving,
// a second instance on the same control socket refuses to start (and does
// not touch the first one's firewall), SIGTERM stops it cleanly and removes
// the socket, while the nftables table stays (pinholes survive restarts).
func TestServeLifecycle(t *testing.T) {
	netlab.RequireRoot(t)
	bin := binary(t)
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	dir := t.TempDir()
	sock := filepath.Join(dir, "run", "pcpd.sock")
	notify := filepath.Join(dir, "notify.sock")
	nconn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notify, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer nconn.Close()

	args := []string{bin, "serve", "--interface", topo.HostLANIf, "--socket", sock,
		"--state-dir", filepath.Join(dir, "state"), "--client", "home=" + topo.ClientPrefix6.String()}
	var log1 bytes.Buffer
	var mu sync.Mutex
	first, err := topo.Host.Start(func(c *exec.Cmd) {
		c.Env = append(os.Environ(), "NOTIFY_SOCKET="+notify)
		c.Stdout, c.Stderr = lockedWriter{&mu, &log1}, lockedWriter{&mu, &log1}
	}, args...)
	if err != nil {
		t.Fatal(err)
	}
	nconn.SetReadDeadline(time.Now().Add(15 * time.Second))
	buf := make([]byte, 256)
	n, err := nconn.Read(buf)
	if err != nil || !strings.Contains(string(buf[:n]), "READY=1") {
		mu.Lock()
		defer mu.Unlock()
		t.Fatalf("no READY=1 from pcpd serve: %q, %v\n%s", buf[:n], err, log1.String())
	}
	st, err := (&control.Client{Path: sock}).Status(context.Background())
	if err != nil || st.OwnershipSource != "static" {
		t.Fatalf("status: %+v, %v", st, err)
	}
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("control socket: %v, %v; want mode 0600", fi.Mode(), err)
	}
	if fi, err := os.Stat(filepath.Dir(sock)); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("control socket directory: %v; want mode 0700", err)
	}

	// A second pcpd with the same socket refuses, exit 1, and leaves the
	// first one serving.
	second := exec.Command("ip", append([]string{"netns", "exec", topo.Host.Name}, append(args[:len(args):len(args)], "--nft-table", "pcpd2")...)...)
	out, err := second.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != exitFailure || !strings.Contains(string(out), "in use by a running daemon") {
		t.Errorf("second instance: %v\n%s", err, out)
	}
	if nft, _ := topo.Host.Run("nft", "list", "tables"); strings.Contains(nft, "pcpd2") {
		t.Errorf("second instance created its table before refusing:\n%s", nft)
	}
	if _, err := (&control.Client{Path: sock}).Status(context.Background()); err != nil {
		t.Errorf("first instance stopped answering: %v", err)
	}

	// SIGTERM: clean exit, socket gone, table (and its pinholes) kept.
	syscall.Kill(-first.Process.Pid, syscall.SIGTERM)
	werr := make(chan error, 1)
	go func() { werr <- first.Wait() }()
	select {
	case err := <-werr:
		if err != nil {
			t.Errorf("pcpd serve after SIGTERM: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("pcpd serve did not stop within 10s of SIGTERM")
	}
	if _, err := os.Lstat(sock); err == nil {
		t.Error("control socket left behind after a clean stop")
	}
	if nft, _ := topo.Host.Run("nft", "list", "tables"); !strings.Contains(nft, "table inet pcpd") {
		t.Errorf("nftables table removed on stop (pinholes must outlive a restart):\n%s", nft)
	}
	mu.Lock()
	defer mu.Unlock()
	if !strings.Contains(log1.String(), "serving") {
		t.Errorf("log lacks the serving line:\n%s", log1.String())
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (w lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

// dist/pcpd.service runs pcpd as an unprivileged user with CAP_NET_ADMIN
// only. The same here, with setpriv: nftables, the interface-bound
// sockets, the store and the control socket all work, and a client's MAP
// opens its port.
func TestServeLeastPrivilege(t *testing.T) {
	netlab.RequireRoot(t)
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Skip("setpriv (util-linux) not installed")
	}
	bin := binary(t)
	os.Chmod(filepath.Dir(bin), 0o755)
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	dir := t.TempDir()
	os.Chmod(filepath.Dir(dir), 0o755) // t.TempDir's parent is 0700
	os.Chmod(dir, 0o755)
	work := filepath.Join(dir, "pcpd")
	os.Mkdir(work, 0o700)
	os.Chown(work, 65534, 65534)
	sock := filepath.Join(work, "run", "pcpd.sock")
	var log logBuffer
	_, err := topo.Host.Start(func(c *exec.Cmd) { c.Stdout, c.Stderr = &log, &log },
		"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
		"--inh-caps=-all,+net_admin", "--ambient-caps=-all,+net_admin", "--bounding-set=-all,+net_admin",
		bin, "serve", "--interface", topo.HostLANIf, "--client", "home="+topo.ClientPrefix6.String(),
		"--state-dir", filepath.Join(work, "state"), "--socket", sock)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlab.Eventually(10*time.Second, func() error {
		st, err := (&control.Client{Path: sock}).Status(context.Background())
		if err == nil && len(st.Listen) == 0 {
			err = os.ErrNotExist
		}
		return err
	}); err != nil {
		t.Fatalf("unprivileged pcpd not serving: %v\n%s", err, log.String())
	}
	if fi, err := os.Stat(sock); err != nil || fi.Sys().(*syscall.Stat_t).Uid != 65534 {
		t.Errorf("control socket not owned by the unprivileged user: %v", err)
	}
	target := net.JoinHostPort(topo.ClientV6.String(), "8080")
	topo.Client.ServeTCP(t, target)
	out, err := topo.Client.Run(bin, "map", "--server", topo.HostTunnelV6.String(), "--port", "8080")
	if err != nil || !strings.Contains(out, "SUCCESS") {
		t.Fatalf("map: %v\n%s\n%s", err, out, log.String())
	}
	if err := netlab.Eventually(5*time.Second, func() error { return topo.Internet.DialTCP(target, time.Second) }); err != nil {
		t.Fatalf("mapped port unreachable: %v\n%s", err, log.String())
	}
}

// TestMain removes the binary binary() built.
func TestMain(m *testing.M) { os.Exit(pcpdtest.Main(m)) }
