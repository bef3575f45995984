package main

import (
	"bufio"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// scrapeOnce opens a connection to addr, sends one keep-alive GET /metrics and
// reports whether a full response header arrived within wait.
func scrapeOnce(t *testing.T, addr string, wait time.Duration) (net.Conn, bool) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(wait))
	if _, err := c.Write([]byte("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")); err != nil {
		return c, false
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return c, false
	}
	resp.Body.Close()
	return c, resp.StatusCode == http.StatusOK
}

// The metrics address is reachable by every local user (loopback by
// default). A keep-alive connection left idle after one scrape must not
// hold one of pcpd's file descriptors forever, and the endpoint must not
// hold more connections at once than a bound: else anyone on the host can
// open LimitNOFILE of them, and pcpd, out of descriptors, can no longer
// open its state's WAL segments, conntrack sockets or new listen sockets.
func TestMetricsServerBoundsConnections(t *testing.T) {
	oldIdle, oldMax := metricsIdleTimeout, metricsMaxConns
	defer func() { metricsIdleTimeout, metricsMaxConns = oldIdle, oldMax }()
	start := func(t *testing.T, idle time.Duration, max int) string {
		metricsIdleTimeout, metricsMaxConns = idle, max
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv := newMetricsServer(prometheus.NewRegistry(), false)
		go srv.Serve(limitListener(ln, metricsMaxConns))
		t.Cleanup(func() { srv.Close() })
		return ln.Addr().String()
	}

	t.Run("idle keep-alive connection is closed", func(t *testing.T) {
		addr := start(t, 300*time.Millisecond, 4)
		c, ok := scrapeOnce(t, addr, 5*time.Second)
		defer c.Close()
		if !ok {
			t.Fatal("no answer to a scrape")
		}
		c.SetReadDeadline(time.Now().Add(10 * metricsIdleTimeout))
		var b [1]byte
		if _, err := c.Read(b[:]); err == nil {
			t.Fatal("server sent data on an idle connection")
		} else if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Fatalf("idle connection still open %v after its scrape (idle timeout %v)", 10*metricsIdleTimeout, metricsIdleTimeout)
		}
	})

	t.Run("at most metricsMaxConns at once", func(t *testing.T) {
		// Idle timeout far beyond the test: only the bound frees a slot.
		addr := start(t, time.Minute, 4)
		var conns []net.Conn
		answered := 0
		for i := 0; i < metricsMaxConns+4; i++ {
			c, ok := scrapeOnce(t, addr, 200*time.Millisecond)
			conns = append(conns, c)
			if ok {
				answered++
			}
		}
		if answered != metricsMaxConns {
			t.Fatalf("%d connections held and answered at once, want %d", answered, metricsMaxConns)
		}
		// Closing one held connection (and the unanswered ones, which
		// wait ahead in the backlog) lets a new one in.
		conns[0].Close()
		for _, c := range conns[metricsMaxConns:] {
			c.Close()
		}
		c, ok := scrapeOnce(t, addr, 2*time.Second)
		conns = append(conns, c)
		for _, c := range conns {
			c.Close()
		}
		if !ok {
			t.Fatal("no scrape answered after a held connection closed")
		}
	})
}

// A wildcard metrics address serves the unauthenticated endpoint on every
// interface, the WAN included: pcpd serves it (some operators firewall it
// themselves) but logs a warning naming the address; a specific address
// (loopback, a management network's, localhost) gets none.
func TestWildcardMetricsWarning(t *testing.T) {
	for _, tt := range []struct {
		addr string
		warn bool
	}{
		{":9351", true},
		{"0.0.0.0:9351", true},
		{"[::]:9351", true},
		{"[::ffff:0.0.0.0]:9351", true},
		{"127.0.0.1:9351", false},
		{"[::1]:9351", false},
		{"localhost:9351", false},
		{"192.0.2.1:9351", false},
		{"[2001:db8::1]:9351", false},
	} {
		t.Run(tt.addr, func(t *testing.T) {
			core, logs := observer.New(zap.InfoLevel)
			warnWildcardMetrics(zap.New(core), tt.addr)
			got := logs.FilterLevelExact(zap.WarnLevel).FilterField(zap.String("metrics", tt.addr)).Len()
			if want := map[bool]int{true: 1, false: 0}[tt.warn]; got != want || logs.Len() != want {
				t.Fatalf("%d warnings naming %s (%d entries: %v), want %d", got, tt.addr, logs.Len(), logs.All(), want)
			}
		})
	}
}
