package server

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// auditFigureServer is the figures' server (root; PCPD_AUDIT_WATCH_N=N
// IPv4 NAPT mappings, skipped if unset): N stored mappings restored by
// Start into a namespace of its own, TamperInterval and AuditInterval an
// hour, its log observed (from after the start).
func auditFigureServer(t *testing.T) (s *Server, ns *netlab.NS, logs *observer.ObservedLogs, n int) {
	t.Helper()
	netlab.RequireRoot(t)
	n, _ = strconv.Atoi(os.Getenv("PCPD_AUDIT_WATCH_N"))
	if n == 0 {
		t.Skip("PCPD_AUDIT_WATCH_N=N not set")
	}
	dir := t.TempDir()
	now := time.Now()
	srvAddr := netip.MustParseAddrPort("[2001:db8::1]:5351")
	ls := make([]store.Lease, n)
	for i := range ls {
		a := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		port := uint16(1024 + i%60000)
		if port >= 5350 {
			port += 2 // pcpd's own
		}
		proto := uint8(6)
		if i >= 60000 {
			proto = 17
		}
		ls[i] = store.Lease{
			Key:          store.Key{Owner: "static:bench", Protocol: proto, InternalAddr: a, InternalPort: 443},
			ExternalAddr: benchExt4, ExternalPort: port, ClientAddr: netip.AddrPortFrom(a, 5350), ServerAddr: srvAddr,
			Created: now, Expires: now.Add(time.Hour), Kind: store.KindMap, Nonce: [12]byte{byte(i)},
		}
	}
	commitLeases(t, dir, ls)
	ls = nil
	st, state, err := store.Open(dir, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	ns = netlab.NewNS(t, "auditgo-fig")
	conn, _ := ns.LastingNftConn(t)
	fw, err := pinhole.New(conn, pinhole.Config{})
	if err != nil {
		t.Fatal(err)
	}
	own, err := policy.NewStatic(map[string][]netip.Prefix{"bench": {netip.MustParsePrefix("2001:db8::/32"), netip.MustParsePrefix("10.0.0.0/8")}})
	if err != nil {
		t.Fatal(err)
	}
	pol, err := policy.New(policy.Config{MaxLeasesPerClient: 1 << 20, MaxLeases: 1 << 20}, own)
	if err != nil {
		t.Fatal(err)
	}
	nsh, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	s, err = New(Config{RateLimit: 1e12, RateBurst: 1 << 30, KeepConnections: true, ExternalIPv4: benchExt4,
		TamperInterval: time.Hour, AuditInterval: time.Hour, NetNS: nsh}, Deps{Firewall: fw, Store: st, State: state, Policy: pol}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t1 := time.Now()
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Logf("start over %d IPv4 mappings: %v (%d leases)", n, time.Since(t1), s.tab.len())
	core, logs := observer.New(zap.DebugLevel)
	s.log = zap.New(core)
	return s, ns, logs, n
}

// TestAuditWatchBlockFigure (h/auditgo; root; PCPD_AUDIT_WATCH_N=N IPv4
// NAPT mappings, at most auditMaxLeases: a figure, run it under the
// bench lock) starts a server over N stored IPv4 mappings in a namespace
// of its own, runs watchFirewall (the watch, then the start's audit,
// whose dump reads every napt4 and snat4 element), adds a hole by hand
// ("nft add element ... pin6", 1 h) 300 ms later, while the dump runs,
// and logs how long until the watch has undone it (a per-element GET
// every 2 ms) and when the audit ended. Before h/auditgo the watch's
// pass waited for the audit: the undo came after the dump.
func TestAuditWatchBlockFigure(t *testing.T) {
	s, ns, logs, n := auditFigureServer(t)
	nsh, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	hole := netip.MustParseAddr("2001:db8:ff::1")
	gone := func() bool {
		_, errs, err := pin6Ends(int(nsh), []netip.Addr{hole}, 443)
		if err != nil {
			t.Fatal(err)
		}
		return errors.Is(errs[0], errNoElement)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	started := time.Now()
	go func() { defer close(done); s.watchFirewall(ctx) }()
	time.Sleep(300 * time.Millisecond)
	ns.MustRun(t, "nft", "add", "element", "inet", "pcpd", "pin6", "{ "+hole.String()+" . tcp . 443 timeout 1h }")
	added := time.Now()
	for !gone() {
		if time.Since(added) > 5*time.Minute {
			t.Fatal("the hole by hand not undone in 5 min")
		}
		time.Sleep(2 * time.Millisecond)
	}
	undone := time.Since(added)
	var auditEnd time.Time
	for auditEnd.IsZero() && time.Since(added) < 5*time.Minute {
		for _, e := range logs.All() {
			if strings.HasPrefix(e.Message, "firewall audit done") {
				auditEnd = e.Time
				t.Logf("audit: %v", e.ContextMap())
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	<-done
	t.Logf("N=%d: hole added %v after the watch started; undone %v after the add; the start's audit ended %v after the add (%v after the watch started)",
		n, added.Sub(started).Round(time.Millisecond), undone.Round(10*time.Microsecond), auditEnd.Sub(added).Round(time.Millisecond), auditEnd.Sub(started).Round(time.Millisecond))
}

// TestAuditStopFigure (h/auditend; root; PCPD_AUDIT_WATCH_N=N IPv4 NAPT
// mappings: a figure, run it under the bench lock) runs Serve over the
// figures' server (auditFigureServer), cancels its ctx 1 s later, while
// the start's audit dumps (4.5-10 s at 100 000), as SIGTERM does
// (cmd/pcpd), and logs how long Serve took to return. Before h/auditend
// Serve waited out the dump's rest.
func TestAuditStopFigure(t *testing.T) {
	s, _, logs, n := auditFigureServer(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	time.Sleep(time.Second)
	if logs.FilterMessageSnippet("firewall audit done").Len() > 0 {
		t.Fatal("the start's audit ended within 1 s: no dump to stop")
	}
	stopped := time.Now()
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	took := time.Since(stopped)
	t.Logf("N=%d: Serve returned %v after its ctx ended 1 s into the start's audit (audit done logged: %d; audits running after: %d)",
		n, took.Round(time.Millisecond), logs.FilterMessageSnippet("firewall audit done").Len(), auditGoroutines())
}
