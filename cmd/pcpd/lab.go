package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/pcpd/pcpd/control"
	"github.com/pcpd/pcpd/internal/netlab"
)

func newLabCmd() *cobra.Command {
	var (
		keep    bool
		verbose bool
		port    uint16
	)
	cmd := &cobra.Command{
		Use:   "lab",
		Short: "Build a throwaway network on this machine and show a pinhole opening and closing (needs root)",
		Long: `Build a self-contained demo on this machine and show pcpd doing its job,
step by step, each step marked PASS or FAIL:

  internet ── (wan0) tunnel host (WireGuard) ══════ client
                     pcpd serve                      owns 2001:db8:1:2::/64
                                                     TCP service on [2001:db8:1:2::10]:PORT

   1. three network namespaces (internet, tunnel host, client), a userspace
      WireGuard tunnel between host and client (run by this binary), routes;
   2. pcpd serve in the host namespace on the WireGuard interface, ownership
      from WireGuard (the client peer's AllowedIPs);
   3. a TCP service on the client's public IPv6 address;
   4. a TCP connect from the internet namespace fails: pcpd's firewall
      guards the client's prefix;
   5. the client runs pcpd map against pcpd over the tunnel: SUCCESS;
   6. the same connect from the internet now succeeds;
   7. pcpd leases shows the lease, pcpd status the daemon, /metrics counts it;
   8. pcpd is killed with SIGKILL: the pinhole keeps working (the kernel
      holds it); pcpd restarts with the lease and the epoch restored;
   9. the client deletes the mapping (pcpd map --delete);
  10. the connect fails again;
  11. an IPv4 mapping (NAPT on the host's public IPv4) works the same way;
  12. the client maps again and the operator ends it with pcpd revoke;
  13. everything is removed: namespaces, processes, nftables tables (they
      live in the namespaces), state directory.

Cleanup also runs on failure and on Ctrl-C. Nothing outside the namespaces is
changed except temporary files and the WireGuard control sockets in
/var/run/wireguard, which are removed too. Exits 0 when every step passed.`,
		Example: `  sudo ./pcpd lab
  sudo ./pcpd lab --verbose     # also show pcpd serve's log`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if os.Geteuid() != 0 {
				return failure(errors.New("lab: needs root (network namespaces, nftables, a TUN device): run it with sudo"))
			}
			l := &lab{out: cmd.OutOrStdout(), verbose: verbose, port: port, keep: keep}
			if err := l.run(cmd.Context()); err != nil {
				fmt.Fprintf(l.out, "\nFAIL: %v\n", err)
				return silent(exitFailure)
			}
			fmt.Fprintln(l.out, "\nPASS: every step of the lab passed")
			return nil
		},
	}
	cmd.Flags().BoolVar(&verbose, "verbose", false, "show pcpd serve's log as it runs")
	cmd.Flags().Uint16Var(&port, "port", 8080, "TCP port of the client's demo service")
	cmd.Flags().BoolVar(&keep, "keep", false, "on success, keep the lab running until Ctrl-C (explore it with ip netns exec)")
	return cmd
}

// lab runs the demo. Every step prints a line, then PASS or FAIL.
type lab struct {
	out     io.Writer
	verbose bool
	keep    bool
	port    uint16

	exe    string
	dir    string
	socket string
	topo   *netlab.Topology
	log    *logBuffer
	n      int

	serveCmd    *exec.Cmd
	serveExited chan error
}

func (l *lab) step(name string, fn func() error) error {
	l.n++
	fmt.Fprintf(l.out, "[%2d] %s\n", l.n, name)
	start := time.Now()
	err := fn()
	if err != nil {
		fmt.Fprintf(l.out, "     FAIL (%v): %v\n", time.Since(start).Round(time.Millisecond), err)
		return fmt.Errorf("step %d (%s): %w", l.n, name, err)
	}
	fmt.Fprintf(l.out, "     PASS (%v)\n", time.Since(start).Round(time.Millisecond))
	return nil
}

// show prints command output indented under its step.
func (l *lab) show(s string) {
	for _, line := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		fmt.Fprintf(l.out, "       | %s\n", line)
	}
}

func (l *lab) run(ctx context.Context) (err error) {
	if l.exe, err = os.Executable(); err != nil {
		return fmt.Errorf("lab: find own executable: %w", err)
	}
	if l.dir, err = os.MkdirTemp("", "pcpd-lab-"); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	l.socket = filepath.Join(l.dir, "pcpd.sock")
	l.log = &logBuffer{}
	if l.verbose {
		l.log.tee = l.out
	}
	defer func() {
		if err != nil && !l.verbose && l.log.String() != "" {
			fmt.Fprintln(l.out, "\npcpd serve's log:")
			l.show(l.log.String())
		}
		cerr := l.step("clean up: stop pcpd and WireGuard, delete the namespaces and the state directory", l.cleanup)
		err = errors.Join(err, cerr)
	}()
	// Each step aborts early on Ctrl-C; the deferred cleanup still runs.
	steps := []struct {
		name string
		fn   func() error
	}{
		{"build namespaces internet, tunnel host and client, with a userspace WireGuard tunnel", l.build},
		{"start pcpd serve on the tunnel host's WireGuard interface (ownership from WireGuard)", l.serve},
		{"start a TCP service on the client", l.service},
		{"internet cannot reach the client's service: pcpd guards the client's prefix", l.expectBlocked6},
		{"client: pcpd map --proto tcp --port PORT (over the tunnel)", l.mapTCP6},
		{"internet reaches the client's service through the pinhole", l.expectOpen6},
		{"pcpd leases, pcpd status and the Prometheus metrics on the tunnel host", l.leases},
		{"kill -9 pcpd: the pinhole still works; restart it: lease and epoch are restored", l.restart},
		{"client: pcpd map --delete", l.delete6},
		{"internet cannot reach the client's service again", l.expectBlocked6},
		{"IPv4: client maps the same port on the host's public IPv4 and internet reaches it", l.ipv4},
		{"operator: pcpd revoke ends a lease the client holds, and the port closes", l.revoke},
	}
	for _, s := range steps {
		if ctx.Err() != nil {
			return errors.New("interrupted")
		}
		name := strings.ReplaceAll(s.name, "PORT", strconv.Itoa(int(l.port)))
		if err := l.step(name, s.fn); err != nil {
			return err
		}
	}
	if l.keep {
		fmt.Fprintf(l.out, "\nThe lab keeps running until Ctrl-C. Namespaces: %s (internet), %s (tunnel host), %s (client).\n"+
			"Try: sudo %s leases --socket %s\n", l.topo.Internet.Name, l.topo.Host.Name, l.topo.Client.Name, l.exe, l.socket)
		<-ctx.Done()
	}
	return nil
}

func (l *lab) build() error {
	topo, err := netlab.BuildTopology(netlab.TopologyOptions{
		WireGuard: true,
		WGCommand: []string{l.exe, "wireguard-device"},
	})
	if err != nil {
		return err
	}
	l.topo = topo
	fmt.Fprintf(l.out, "       | internet %s: %s, %s\n", topo.Internet.Name, topo.InternetV6, topo.InternetV4)
	fmt.Fprintf(l.out, "       | host     %s: WAN %s, public IPv4 %s; WireGuard %s: %s, %s\n",
		topo.Host.Name, topo.HostWANV6, topo.HostPublicV4, topo.HostLANIf, topo.HostTunnelV6, topo.HostTunnelV4)
	fmt.Fprintf(l.out, "       | client   %s: WireGuard %s: %s, %s; owns %s, %s\n",
		topo.Client.Name, topo.ClientIf, topo.ClientV6, topo.ClientV4, topo.ClientPrefix6, topo.ClientPrefix4)
	// The tunnel must carry traffic (WireGuard handshake done) before pcpd
	// can be asked anything: a throwaway TCP service on the host's tunnel
	// address, dialled from the client.
	probe := net.JoinHostPort(topo.HostTunnelV6.String(), "9")
	c, err := topo.Host.StartTCPServer(probe)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := netlab.Eventually(10*time.Second, func() error { return topo.Client.DialTCP(probe, time.Second) }); err != nil {
		return fmt.Errorf("tunnel carries no traffic: %w", err)
	}
	l.show("tunnel up: client reached " + probe + " through WireGuard")
	return nil
}

func (l *lab) serve() error {
	args := []string{l.exe, "serve",
		"--interface", l.topo.HostLANIf,
		"--external-ipv4", l.topo.HostPublicV4.String(),
		"--state-dir", filepath.Join(l.dir, "state"),
		"--socket", l.socket,
		"--log-level", "info",
		"--metrics", labMetrics,
	}
	l.show("pcpd " + strings.Join(args[1:], " "))
	cmd, err := l.topo.Host.Start(func(c *exec.Cmd) {
		c.Stdout, c.Stderr = l.log, l.log
	}, args...)
	if err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	l.serveCmd, l.serveExited = cmd, exited
	c := &control.Client{Path: l.socket, Timeout: 2 * time.Second}
	deadline := time.Now().Add(15 * time.Second)
	for {
		st, err := c.Status(context.Background())
		if err == nil && len(st.Listen) > 0 {
			l.show(fmt.Sprintf("pcpd pid %d listening on %s, ownership %s", st.PID, strings.Join(st.Listen, " "), st.OwnershipSource))
			return nil
		}
		select {
		case werr := <-exited:
			return fmt.Errorf("pcpd serve exited: %v", werr)
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pcpd serve not serving after 15s (last status error: %v)", err)
		}
	}
}

// labMetrics is where the lab's pcpd serves metrics: loopback inside the
// host namespace, unreachable from anywhere else.
const labMetrics = "127.0.0.1:9351"

func (l *lab) target6() string {
	return net.JoinHostPort(l.topo.ClientV6.String(), strconv.Itoa(int(l.port)))
}

func (l *lab) service() error {
	for _, a := range []string{l.target6(), net.JoinHostPort(l.topo.ClientV4.String(), strconv.Itoa(int(l.port)))} {
		if _, err := l.topo.Client.StartTCPServer(a); err != nil {
			return err
		}
		l.show("listening on " + a)
	}
	// The client itself can reach it: what is blocked later is the path
	// through the tunnel host's firewall, not the service.
	return l.topo.Client.DialTCP(l.target6(), 2*time.Second)
}

// expectBlocked checks that new connections fail for a while, not only once:
// one lost SYN is not proof of a firewall.
func (l *lab) expectBlocked(addr string) error {
	for i := 0; i < 3; i++ {
		if err := l.topo.Internet.DialTCP(addr, time.Second); err == nil {
			return fmt.Errorf("internet connected to %s: the port is open", addr)
		} else if i == 0 {
			l.show(fmt.Sprintf("internet → %s: %v", addr, err))
		}
	}
	return nil
}

func (l *lab) expectOpen(addr string) error {
	err := netlab.Eventually(5*time.Second, func() error { return l.topo.Internet.DialTCP(addr, time.Second) })
	if err != nil {
		return fmt.Errorf("internet → %s: %w", addr, err)
	}
	l.show(fmt.Sprintf("internet → %s: connected, service said %q", addr, netlab.Greeting))
	return nil
}

func (l *lab) expectBlocked6() error { return l.expectBlocked(l.target6()) }
func (l *lab) expectOpen6() error    { return l.expectOpen(l.target6()) }

// pcpdOnClient runs this binary inside the client namespace.
func (l *lab) pcpdOnClient(args ...string) (string, error) {
	l.show("pcpd " + strings.Join(args, " "))
	out, err := l.topo.Client.Run(append([]string{l.exe}, args...)...)
	l.show(out)
	return out, err
}

func (l *lab) mapArgs(server netip.Addr, extra ...string) []string {
	return append([]string{"map", "--server", server.String(), "--proto", "tcp",
		"--port", strconv.Itoa(int(l.port)), "--timeout", "10s"}, extra...)
}

func (l *lab) mapTCP6() error {
	out, err := l.pcpdOnClient(l.mapArgs(l.topo.HostTunnelV6, "--lifetime", "10m")...)
	if err != nil {
		return err
	}
	if !strings.Contains(out, "SUCCESS") {
		return errors.New("no SUCCESS")
	}
	return nil
}

func (l *lab) leases() error {
	c := &control.Client{Path: l.socket}
	var found bool
	if _, err := c.Leases(context.Background(), func(le control.Lease) error {
		if le.Protocol == "tcp" && le.InternalAddress == l.topo.ClientV6 && le.InternalPort == l.port {
			found = true
		}
		return nil
	}); err != nil {
		return err
	}
	for _, args := range [][]string{{"leases"}, {"status"}} {
		args = append(args, "--socket", l.socket)
		l.show("pcpd " + strings.Join(args, " "))
		out, err := exec.Command(l.exe, args...).CombinedOutput()
		l.show(string(out))
		if err != nil {
			return fmt.Errorf("pcpd %s: %w", args[0], err)
		}
	}
	if !found {
		return fmt.Errorf("no lease for tcp [%s]:%d", l.topo.ClientV6, l.port)
	}
	// The HTTP client dials on its own goroutines; the socket must be
	// created on a thread inside the host namespace.
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (c net.Conn, err error) {
			err = l.topo.Host.Do(func() (err error) {
				c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
				return err
			})
			return c, err
		},
	}}
	var body []byte
	resp, err := hc.Get("http://" + labMetrics + "/metrics")
	if err == nil {
		body, err = io.ReadAll(resp.Body)
		resp.Body.Close()
	}
	if err != nil {
		return fmt.Errorf("metrics: %w", err)
	}
	l.show("curl http://" + labMetrics + "/metrics | grep -E '^pcpd_(leases|requests_total|ownership_refreshes_total)'")
	var shown []string
	for _, line := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(line, "pcpd_leases ") || strings.HasPrefix(line, "pcpd_requests_total{") ||
			strings.HasPrefix(line, "pcpd_ownership_refreshes_total ") {
			shown = append(shown, line)
		}
	}
	l.show(strings.Join(shown, "\n"))
	if !strings.Contains(string(body), "pcpd_leases 1") {
		return errors.New("metrics do not show the one live lease (pcpd_leases 1)")
	}
	if !strings.Contains(string(body), "pcpd_ownership_refreshes_total ") {
		return errors.New("metrics lack the WireGuard ownership refresh counter")
	}
	return nil
}

func (l *lab) revoke() error {
	if err := l.mapTCP6(); err != nil {
		return err
	}
	if err := l.expectOpen6(); err != nil {
		return err
	}
	args := []string{"revoke", "--socket", l.socket, fmt.Sprintf("tcp/%s/%d", l.topo.ClientV6, l.port)}
	l.show("pcpd " + strings.Join(args, " "))
	out, err := exec.Command(l.exe, args...).CombinedOutput()
	l.show(string(out))
	if err != nil {
		return fmt.Errorf("pcpd revoke: %w", err)
	}
	return l.expectBlocked6()
}

func (l *lab) restart() error {
	c := &control.Client{Path: l.socket}
	before, err := c.Status(context.Background())
	if err != nil {
		return err
	}
	if err := l.serveCmd.Process.Kill(); err != nil {
		return err
	}
	<-l.serveExited
	l.show(fmt.Sprintf("killed pcpd (pid %d, epoch %d) with SIGKILL", before.PID, before.Epoch))
	// Expiry and access are the kernel's: the pinhole works without pcpd.
	if err := l.expectOpen6(); err != nil {
		return fmt.Errorf("with pcpd dead: %w", err)
	}
	if err := l.serve(); err != nil {
		return err
	}
	after, err := c.Status(context.Background())
	if err != nil {
		return err
	}
	l.show(fmt.Sprintf("restarted: pid %d, %d lease(s), epoch %d (restored from disk: %v)", after.PID, after.Leases, after.Epoch, after.Restarted))
	switch {
	case after.Leases != before.Leases:
		return fmt.Errorf("%d leases after the restart, %d before", after.Leases, before.Leases)
	case !after.Restarted || after.Epoch < before.Epoch:
		// RFC 6887 §8.5: an epoch that went back tells clients their
		// mappings were lost; these were not.
		return fmt.Errorf("epoch went from %d to %d (restarted %v): clients would re-map needlessly", before.Epoch, after.Epoch, after.Restarted)
	}
	return l.expectOpen6()
}

func (l *lab) delete6() error {
	out, err := l.pcpdOnClient(l.mapArgs(l.topo.HostTunnelV6, "--delete")...)
	if err != nil {
		return err
	}
	if !strings.Contains(out, "SUCCESS") || !strings.Contains(out, "lifetime  0s") {
		return errors.New("delete not confirmed (want SUCCESS, lifetime 0s)")
	}
	return nil
}

func (l *lab) ipv4() error {
	out, err := l.pcpdOnClient(l.mapArgs(l.topo.HostTunnelV4, "--lifetime", "10m")...)
	if err != nil {
		return err
	}
	ext := ""
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "external" {
			ext = f[1]
		}
	}
	ap, err := netip.ParseAddrPort(ext)
	if err != nil || ap.Addr() != l.topo.HostPublicV4 {
		return fmt.Errorf("external address %q is not on the host's public IPv4 %s", ext, l.topo.HostPublicV4)
	}
	if err := l.expectOpen(ap.String()); err != nil {
		return err
	}
	if _, err := l.pcpdOnClient(l.mapArgs(l.topo.HostTunnelV4, "--delete")...); err != nil {
		return err
	}
	return l.expectBlocked(ap.String())
}

func (l *lab) cleanup() error {
	var errs []error
	if l.topo != nil {
		errs = append(errs, l.topo.Close())
		for _, ifc := range []string{l.topo.HostLANIf, l.topo.ClientIf} {
			// A killed device leaves its socket behind; it lives outside
			// the namespaces.
			os.Remove(filepath.Join(netlab.SocketDir, ifc+".sock"))
		}
		l.show(fmt.Sprintf("removed %s, %s, %s", l.topo.Internet.Name, l.topo.Host.Name, l.topo.Client.Name))
	}
	if l.dir != "" {
		errs = append(errs, os.RemoveAll(l.dir))
	}
	return errors.Join(errs...)
}

// logBuffer collects a child's output, optionally echoing it.
type logBuffer struct {
	mu  sync.Mutex
	b   strings.Builder
	tee io.Writer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.tee != nil {
		for _, line := range strings.Split(strings.TrimRight(string(p), "\n"), "\n") {
			fmt.Fprintf(b.tee, "       pcpd> %s\n", line)
		}
	}
	return b.b.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
