package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/internal/pcpdtest"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/store"
)

// --reserved-ports, --touch-interval and --snapshot-interval reach the
// engine: a reserved external IPv4 port is not handed out even when
// suggested and free, while an unreserved one is; with 1 s intervals the
// idle daemon writes its state (Touch) and replaces its backup copy
// (Snapshot) within seconds, where the defaults take a minute and an hour.
func TestServeHousekeepingAndReservedFlags(t *testing.T) {
	netlab.RequireRoot(t)
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	pcpdtest.Start(t, pcpdtest.Config{
		NS: topo.Host,
		Args: []string{"serve", "--interface", topo.HostLANIf,
			"--client", "home=" + topo.ClientPrefix6.String() + "," + topo.ClientPrefix4.String(),
			"--external-ipv4", topo.HostPublicV4.String(),
			"--state-dir", state, "--socket", filepath.Join(dir, "pcpd.sock"),
			"--reserved-ports", "7000-7001,7003",
			"--touch-interval", "1s", "--snapshot-interval", "1s",
		},
		Ready: pcpdtest.Announce(topo.Client, topo.ClientV6, netip.AddrPortFrom(topo.HostTunnelV6, pcp.Port)),
	})

	t.Run("reserved-ports", func(t *testing.T) {
		var conn *net.UDPConn
		if err := topo.Client.Do(func() (err error) {
			conn, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(topo.ClientV4, 0)))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		c := &pcp.Client{Conn: conn, Server: netip.AddrPortFrom(topo.HostTunnelV4, pcp.Port)}
		for _, tt := range []struct {
			port     uint16
			reserved bool
		}{{7000, true}, {7001, true}, {7002, false}, {7003, true}} {
			// NAT-PMP: the suggested external port is the internal
			// one, granted when free (MAP-12's rule for NAT-PMP too).
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			var resp pcp.PMPResponse
			err := c.DoPMP(ctx, &pcp.PMPRequest{Opcode: pcp.PMPOpMapUDP, InternalPort: tt.port, SuggestedExternalPort: tt.port, Lifetime: time.Hour}, &resp)
			cancel()
			if err != nil || resp.Result != pcp.PMPSuccess {
				t.Fatalf("NAT-PMP map UDP %d: %v, %v", tt.port, err, resp.Result)
			}
			if got := resp.ExternalPort == tt.port; got == tt.reserved {
				t.Errorf("UDP %d (reserved %v): external port %d", tt.port, tt.reserved, resp.ExternalPort)
			}
		}
	})

	t.Run("touch-interval and snapshot-interval", func(t *testing.T) {
		db, bak := filepath.Join(state, store.DBName), filepath.Join(state, store.BackupName)
		var first os.FileInfo
		if err := netlab.Eventually(5*time.Second, func() (err error) {
			first, err = os.Stat(bak)
			return err
		}); err != nil {
			t.Fatalf("no backup copy: %v", err)
		}
		dbFirst, err := os.Stat(db)
		if err != nil {
			t.Fatal(err)
		}
		// Snapshot renames a fresh file over the copy: a new inode.
		ino := func(fi os.FileInfo) uint64 { return fi.Sys().(*syscall.Stat_t).Ino }
		if err := netlab.Eventually(5*time.Second, func() error {
			fi, err := os.Stat(bak)
			if err != nil {
				return err
			}
			if ino(fi) == ino(first) {
				return os.ErrExist
			}
			return nil
		}); err != nil {
			t.Errorf("backup copy not rewritten within 5 s with --snapshot-interval 1s")
		}
		// Nothing else writes the state file of an idle daemon.
		if err := netlab.Eventually(5*time.Second, func() error {
			fi, err := os.Stat(db)
			if err != nil {
				return err
			}
			if !fi.ModTime().After(dbFirst.ModTime()) {
				return os.ErrExist
			}
			return nil
		}); err != nil {
			t.Errorf("state file not written within 5 s with --touch-interval 1s")
		}
	})
}

// --kernel-reverse-path reaches the kernel (the owner chain's rule per
// mode) and the reverse-path drops reach /metrics apart from the rate
// drops: 40 requests spoofed from the client's prefix via the WAN are
// dropped and counted as reverse-path under strict (the default), and
// neither under off, whose owner chain has no such rule (RELIABILITY.md
// bug 4, review S1).
func TestServeKernelReversePath(t *testing.T) {
	netlab.RequireRoot(t)
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	spoof := netip.MustParseAddr("2001:db8:1:2::99") // the client's /64
	topo.Internet.MustRun(t, "ip", "addr", "add", spoof.String()+"/128", "dev", "lo", "nodad")
	const metricsAddr = "127.0.0.1:9359"
	for _, tt := range []struct {
		mode        string // "": the default
		rule        string // in the owner chain; "" none
		reversePath int    // pcpd_kernel_requests_dropped_total{reason="reverse-path"}
	}{
		// The client's prefix is routed through the LAN: pcpd gives the
		// backend its routes (Config.Routes), so datagrams from there
		// skip the route lookup (RELIABILITY.md runs V).
		{"", fmt.Sprintf("iif != %q fib saddr . iif oif 0 counter", topo.HostLANIf), 40},
		{"off", "", 0},
	} {
		t.Run("mode="+tt.mode, func(t *testing.T) {
			dir := t.TempDir()
			// pcpd serves the WAN too: datagrams from an interface it
			// does not serve skip the kernel meter (review7 L1).
			args := []string{"serve", "--interface", topo.HostLANIf, "--interface", topo.HostWANIf,
				"--client", "home=" + topo.ClientPrefix6.String(),
				"--state-dir", filepath.Join(dir, "state"), "--socket", filepath.Join(dir, "pcpd.sock"),
				"--metrics", metricsAddr}
			if tt.mode != "" {
				args = append(args, "--kernel-reverse-path", tt.mode)
			}
			d := pcpdtest.Start(t, pcpdtest.Config{NS: topo.Host, Args: args,
				Ready: pcpdtest.Announce(topo.Client, topo.ClientV6, netip.AddrPortFrom(topo.HostTunnelV6, pcp.Port))})
			defer d.Stop()
			var chain string
			if err := netlab.Eventually(5*time.Second, func() error {
				out, err := topo.Host.Run("nft", "list", "table", "inet", "pcpd")
				if i := strings.Index(out, "chain owner_"); err == nil && i >= 0 {
					chain = out[i:]
					chain = chain[:strings.Index(chain, "}")]
					return nil
				}
				return fmt.Errorf("no owner chain: %v\n%s", err, out)
			}); err != nil {
				t.Fatal(err)
			}
			if got := strings.Contains(chain, "fib saddr"); got != (tt.rule != "") || !strings.Contains(chain, tt.rule) {
				t.Errorf("owner chain with --kernel-reverse-path %q, want rule %q:\n%s", tt.mode, tt.rule, chain)
			}
			// ANNOUNCEs (a valid request, so pcpd's answer, were it to
			// get one, is not what is measured): sent from the WAN side.
			req := make([]byte, 24)
			req[0], req[1] = 2, 0 // version 2, ANNOUNCE
			if err := topo.Internet.Do(func() error {
				c, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(spoof, 0)), net.UDPAddrFromAddrPort(netip.AddrPortFrom(topo.HostTunnelV6, pcp.Port)))
				if err != nil {
					return err
				}
				defer c.Close()
				for range 40 {
					if _, err := c.Write(req); err != nil {
						return err
					}
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			// The figures follow the firewall check (every 5 s).
			want := fmt.Sprintf("pcpd_kernel_requests_dropped_total{reason=\"reverse-path\"} %d\n", tt.reversePath)
			var body string
			if err := netlab.Eventually(12*time.Second, func() (err error) {
				body, err = scrape(topo.Host, metricsAddr)
				if err == nil && !strings.Contains(body, want) {
					err = fmt.Errorf("no %q", want)
				}
				return err
			}); err != nil {
				t.Errorf("/metrics: %v\n%s", err, grepLines(body, "pcpd_kernel_requests_dropped_total"))
			}
			if !strings.Contains(body, "pcpd_kernel_requests_dropped_total{reason=\"owner-rate-limit\"} 0\n") {
				t.Errorf("/metrics: owner-rate-limit drops not apart and 0:\n%s", grepLines(body, "pcpd_kernel_requests_dropped_total"))
			}
			// The client's prefix is routed through the LAN, so none of its
			// requests costs a route lookup (BENCHMARKS.md item 28); off
			// looks nothing up.
			if !strings.Contains(body, "pcpd_owner_meter_route_lookup_owners 0\n") {
				t.Errorf("/metrics: no pcpd_owner_meter_route_lookup_owners 0:\n%s", grepLines(body, "pcpd_owner_meter"))
			}
		})
	}
}

// --kernel-unowned-rate-limit reaches the kernel (the unowned chain's
// limit, default 400/s burst 800, pcpd's own bucket for the unowned) and
// its drops reach /metrics apart (review S4): 200 ANNOUNCEs back to back
// from a source no client owns, under its per-source burst, are held to
// the shared bucket's burst of 40. The default run also serves its
// metrics on a wildcard address, which pcpd serves with a warning naming
// it (warnWildcardMetrics); the loopback one gets none.
func TestServeKernelUnownedRateLimit(t *testing.T) {
	netlab.RequireRoot(t)
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	const metricsAddr = "127.0.0.1:9358"
	for _, tt := range []struct {
		name    string
		args    []string
		limit   string
		flood   bool
		metrics string
	}{
		{"default", nil, "limit rate over 400/second burst 800 packets", false, "[::]:9358"},
		{"20", []string{"--kernel-unowned-rate-limit", "20"}, "limit rate over 20/second burst 40 packets", true, metricsAddr},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			args := append([]string{"serve", "--interface", topo.HostLANIf,
				"--client", "home=" + topo.ClientPrefix6.String(),
				"--state-dir", filepath.Join(dir, "state"), "--socket", filepath.Join(dir, "pcpd.sock"),
				"--metrics", tt.metrics}, tt.args...)
			d := pcpdtest.Start(t, pcpdtest.Config{NS: topo.Host, Args: args,
				Ready: pcpdtest.Announce(topo.Client, topo.ClientV6, netip.AddrPortFrom(topo.HostTunnelV6, pcp.Port))})
			defer d.Stop()
			// The warning comes before "serving" (the log is copied
			// from pcpd's stderr by a goroutine: wait for that line).
			if err := netlab.Eventually(5*time.Second, func() error {
				if !strings.Contains(d.Log().String(), "\tserving\t") {
					return fmt.Errorf("no serving line")
				}
				return nil
			}); err != nil {
				t.Fatalf("%v:\n%s", err, d.Log().Tail(20))
			}
			warned := strings.Contains(d.Log().String(), "metrics served on every interface")
			if want := tt.metrics != metricsAddr; warned != want || want && !strings.Contains(d.Log().String(), tt.metrics) {
				t.Errorf("--metrics %s: wildcard warning logged %v, want %v (naming the address):\n%s", tt.metrics, warned, want, d.Log().Tail(20))
			}
			if out := topo.Host.MustRun(t, "nft", "list", "chain", "inet", "pcpd", "unowned"); !strings.Contains(out, tt.limit) {
				t.Fatalf("unowned chain, want %q:\n%s", tt.limit, out)
			}
			if !tt.flood {
				return
			}
			req := make([]byte, 24)
			req[0], req[1] = 2, 0 // version 2, ANNOUNCE
			// From the client's LAN, outside its /64 (unconnected: the
			// answers, if any, are not what is measured).
			unowned := netip.MustParseAddr("2001:db8:1:3::5")
			topo.Client.MustRun(t, "ip", "addr", "add", unowned.String()+"/128", "dev", topo.ClientIf, "nodad")
			if err := topo.Client.Do(func() error {
				c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(unowned, 0)))
				if err != nil {
					return err
				}
				defer c.Close()
				for range 200 {
					if _, err := c.WriteToUDPAddrPort(req, netip.AddrPortFrom(topo.HostTunnelV6, pcp.Port)); err != nil {
						return err
					}
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			// The figures follow the firewall check (every 5 s).
			var body string
			if err := netlab.Eventually(12*time.Second, func() (err error) {
				body, err = scrape(topo.Host, metricsAddr)
				if err == nil {
					var n int
					for _, l := range strings.Split(body, "\n") {
						if v, ok := strings.CutPrefix(l, `pcpd_kernel_requests_dropped_total{reason="unowned-rate-limit"} `); ok {
							n, _ = strconv.Atoi(v)
						}
					}
					if n < 150 {
						err = fmt.Errorf("unowned-rate-limit drops %d, want at least 150", n)
					}
				}
				return err
			}); err != nil {
				t.Errorf("/metrics: %v\n%s", err, grepLines(body, "pcpd_kernel_requests_dropped_total"))
			}
		})
	}
}

// The host's loopback bucket (pinhole's loopbackRules, h/lometer) drops
// what the host's own processes send to a served address over
// --kernel-rate-limit, and those drops reach /metrics as
// pcpd_kernel_requests_dropped_total{reason="loopback-rate-limit"}: 1000
// ANNOUNCEs back to back from the host's served address, then the metric
// (read at a firewall check) equals control_local's loopback counter,
// which is not 0. Before (h/lodrop), only "nft list chain inet pcpd
// control_local" showed them; the metric had no such reason.
func TestServeKernelLoopbackDrops(t *testing.T) {
	netlab.RequireRoot(t)
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	const metricsAddr = "127.0.0.1:9357"
	dir := t.TempDir()
	server := netip.AddrPortFrom(topo.HostTunnelV6, pcp.Port)
	d := pcpdtest.Start(t, pcpdtest.Config{NS: topo.Host, Args: []string{"serve", "--interface", topo.HostLANIf,
		"--client", "home=" + topo.ClientPrefix6.String(),
		"--state-dir", filepath.Join(dir, "state"), "--socket", filepath.Join(dir, "pcpd.sock"),
		"--metrics", metricsAddr},
		Ready: pcpdtest.Announce(topo.Client, topo.ClientV6, server)})
	defer d.Stop()
	req := make([]byte, 24)
	req[0], req[1] = 2, 0 // version 2, ANNOUNCE
	const flood = 1000
	if err := topo.Host.Do(func() error {
		// From the served address itself (the host's own requests): the
		// socket filter takes them, so what pcpd does not get is the
		// loopback rule's.
		c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(topo.HostTunnelV6, 0)))
		if err != nil {
			return err
		}
		defer c.Close()
		for range flood {
			if _, err := c.WriteToUDPAddrPort(req, server); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	kernel := func() int {
		out := topo.Host.MustRun(t, "nft", "list", "chain", "inet", "pcpd", "control_local")
		for _, l := range strings.Split(out, "\n") {
			if !strings.Contains(l, `iif "lo" limit rate over`) {
				continue
			}
			f := strings.Fields(l[strings.Index(l, "counter packets"):])
			n, err := strconv.Atoi(f[2])
			if err != nil {
				t.Fatalf("control_local's loopback rule: %q", l)
			}
			return n
		}
		t.Fatalf("control_local has no loopback bucket:\n%s", out)
		return 0
	}
	dropped := kernel()
	if dropped == 0 {
		t.Fatalf("%d ANNOUNCEs over loopback back to back: the loopback rule dropped none (--kernel-rate-limit's burst is 400)", flood)
	}
	// The figures follow the firewall check (every 5 s).
	want := fmt.Sprintf("pcpd_kernel_requests_dropped_total{reason=\"loopback-rate-limit\"} %d\n", dropped)
	var body string
	if err := netlab.Eventually(12*time.Second, func() (err error) {
		body, err = scrape(topo.Host, metricsAddr)
		if err == nil && !strings.Contains(body, want) {
			err = fmt.Errorf("no %q", strings.TrimSpace(want))
		}
		return err
	}); err != nil {
		t.Errorf("/metrics after %d ANNOUNCEs over loopback, %d dropped by control_local's loopback rule: %v\n%s",
			flood, dropped, err, grepLines(body, "pcpd_kernel_requests_dropped_total"))
	}
	for _, r := range []string{"owner-rate-limit", "unowned-rate-limit", "reverse-path"} {
		if !strings.Contains(body, fmt.Sprintf("pcpd_kernel_requests_dropped_total{reason=%q} 0\n", r)) {
			t.Errorf("/metrics: the loopback flood counted as %s:\n%s", r, grepLines(body, "pcpd_kernel_requests_dropped_total"))
		}
	}
}

// scrape fetches http://addr/metrics from inside ns (the socket is made
// in ns; a plain HTTP/1.0 GET).
func scrape(ns *netlab.NS, addr string) (string, error) {
	var c net.Conn
	if err := ns.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", addr, 2*time.Second)
		return err
	}); err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(c, "GET /metrics HTTP/1.0\r\nHost: %s\r\n\r\n", addr); err != nil {
		return "", err
	}
	b, err := io.ReadAll(c)
	return string(b), err
}

func grepLines(s, substr string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
