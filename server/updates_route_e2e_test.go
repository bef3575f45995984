package server

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
)

// TestE2EUpdateLeavesByClientsRoute (root, namespaces; issue 9, review
// h/revsu left 2; UPD-03): pcpd serves the lab's WireGuard interface and
// a LAN (ln1). The tunnel's client maps through 10.100.0.1; the admin
// then moves that address to ln1 and keeps the client routed through the
// tunnel (a /32 route). On ln1 a host claims the client's address (it
// answers ARP for 10.100.0.2). The operator revokes the mapping: the
// update must not leave on ln1, where the client is not (its serving
// address's socket is bound there now); the impostor must get nothing,
// and the update is counted dropped{no_socket}: no socket of that
// address is on the client's route, and no other address's stands in
// (the client takes responses only from the address it sends to).
// Before h/upd2 the update left by the address's socket whatever its
// interface: the impostor received the client's NOT_AUTHORIZED, its
// nonce with it.
//
// The client's route is the main table's /32, or (review h/revu2) a
// source rule: the admin's multi-homing form, "ip rule from 10.100.0.1
// lookup 100" with the /32 in table 100, the main table still reaching
// 10.100.0.0/24 on ln1. The kernel routes the serving address's
// datagrams to the client through the tunnel; the socket, bound to ln1,
// sends by ln1 all the same (a bound socket's lookup skips table 100's
// route, not on ln1, and takes main's). Before h/revu2 the route check
// asked the kernel for the client's route with no source, which the rule
// does not match: ln1, the socket's interface, and the update left there
// to the impostor.
func TestE2EUpdateLeavesByClientsRoute(t *testing.T) {
	for _, tc := range []struct {
		name  string
		route func(t *testing.T, l *lab, cli4, srv4 netip.Addr)
	}{
		{"main table", func(t *testing.T, l *lab, cli4, _ netip.Addr) {
			l.topo.Host.MustRun(t, "ip", "route", "add", cli4.String()+"/32", "dev", l.topo.HostLANIf)
		}},
		{"source rule", func(t *testing.T, l *lab, cli4, srv4 netip.Addr) {
			l.topo.Host.MustRun(t, "ip", "route", "add", cli4.String()+"/32", "dev", l.topo.HostLANIf, "table", "100")
			l.topo.Host.MustRun(t, "ip", "rule", "add", "from", srv4.String(), "lookup", "100", "pref", "100")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) { testUpdateLeavesByClientsRoute(t, tc.route) })
	}
}

func testUpdateLeavesByClientsRoute(t *testing.T, route func(t *testing.T, l *lab, cli4, srv4 netip.Addr)) {
	l := newLab(t)
	c2 := netlab.NewNS(t, "c2")
	if err := netlab.Veth(l.topo.Host, "ln1", c2, "eth0"); err != nil {
		t.Fatal(err)
	}
	cli4 := l.topo.ClientV4
	c2.MustRun(t, "ip", "addr", "add", cli4.String()+"/24", "dev", "eth0")

	l.stop()
	l.cfg.Interfaces = []string{l.topo.HostLANIf, "ln1"}
	l.cfg.AnnounceMulticast = false
	l.start()
	u := l.updateClient(t)
	if r := u.do(mapReq(cli4, pcp.ProtoTCP, 9501, 0, time.Hour, 22)); r.Result != pcp.Success {
		t.Fatalf("MAP: %v", r.Result)
	}
	clientPort := netip.MustParseAddrPort(u.c.LocalAddr().String()).Port()

	// The impostor listens where the update goes.
	imp := c2.MustListenUDP(t, netip.AddrPortFrom(cli4, clientPort))
	var (
		mu  sync.Mutex
		got []string
	)
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := imp.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			var r pcp.Response
			what := fmt.Sprintf("% x", buf[:min(n, 4)])
			if pcp.ParseResponse(buf[:n], &r) == nil {
				what = fmt.Sprintf("%v %v nonce %x", r.Opcode, r.Result, r.Map.Nonce[:1])
			}
			mu.Lock()
			got = append(got, what+" from "+from.String())
			mu.Unlock()
		}
	}()

	srv4 := l.topo.HostTunnelV4
	l.topo.Host.MustRun(t, "ip", "addr", "del", srv4.String()+"/24", "dev", l.topo.HostLANIf)
	l.topo.Host.MustRun(t, "ip", "addr", "add", srv4.String()+"/24", "dev", "ln1")
	route(t, l, cli4, srv4)
	if err := netlab.Eventually(10*time.Second, func() error {
		for _, c := range l.srv.lis.sockets() {
			if c.local == l.server4() && c.kname == "ln1" {
				return nil
			}
		}
		return fmt.Errorf("%v not served on ln1", l.server4())
	}); err != nil {
		t.Fatal(err)
	}

	if _, err := l.srv.Revoke(context.Background(), RevokeFilter{Opens: []Opening{{Protocol: 6, InternalAddr: cli4, InternalPort: 9501}}}); err != nil {
		t.Fatalf("revoke: %v", err)
	}
	noSocket := l.srv.m.updatesDropped.WithLabelValues("no_socket")
	err := netlab.Eventually(10*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(got) > 0 || counterValue(t, noSocket) > 0 {
			return nil
		}
		return fmt.Errorf("no datagram on ln1, nothing dropped")
	})
	mu.Lock()
	defer mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if len(got) > 0 {
		t.Errorf("the tunnel client's update left on ln1, to the host there claiming its address: %v", got)
	}
	if n := counterValue(t, noSocket); n != 1 {
		t.Errorf("dropped{no_socket} %v, want 1", n)
	}
	if len(l.srv.Leases()) != 0 {
		t.Errorf("leases after the revoke: %v", l.srv.Leases())
	}
}
