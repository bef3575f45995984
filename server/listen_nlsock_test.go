package server

import (
	"errors"
	"net/netip"
	"testing"

	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
)

// netlinkSockets counts the netlink sockets open in ns (any process's:
// /proc/net/netlink of a thread in it), per protocol.
func netlinkSockets(t *testing.T, ns *netlab.NS) map[int]int {
	t.Helper()
	n := map[int]int{}
	err := ns.Do(func() error {
		socks, err := netlab.NetlinkSockets()
		for _, k := range socks {
			n[k.Protocol]++
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestListenerRouteSocketsOnly: the listener's netlink handle (links and
// addresses) has a route socket only. netlink.NewHandleAt without
// families opened a NETLINK_NETFILTER socket beside it, whose close waits
// for the namespace's nftables commit lock and an RCU grace period, the
// engine's transactions with it (BENCHMARKS.md items 41, 42).
func TestListenerRouteSocketsOnly(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "nlsocklis")
	h, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	addr := netip.MustParseAddr("10.94.0.1")
	ns.MustRun(t, "ip", "link", "add", "nlsock0", "type", "veth", "peer", "name", "nlsock1")
	ns.MustRun(t, "ip", "addr", "add", addr.String()+"/24", "dev", "nlsock0")
	ns.MustRun(t, "ip", "link", "set", "nlsock0", "up")
	ns.MustRun(t, "ip", "link", "set", "nlsock1", "up")
	before := netlinkSockets(t, ns)
	l := &listener{log: zaptest.NewLogger(t), ifaces: []string{"nlsock0"}, port: Port, ns: h,
		out: make(chan packet, 1), pass: followNever}
	runListener(t, l)
	if err := netlab.Eventually(followNever, func() error {
		for _, ap := range l.addrs() {
			if ap.Addr() == addr {
				return nil
			}
		}
		return errors.New("not served yet")
	}); err != nil {
		t.Fatal(err)
	}
	now := netlinkSockets(t, ns)
	if now[unix.NETLINK_ROUTE] < before[unix.NETLINK_ROUTE]+2 {
		t.Fatalf("route sockets %d → %d; want the handle's and the subscription's (is the listing blind?)",
			before[unix.NETLINK_ROUTE], now[unix.NETLINK_ROUTE])
	}
	if d := now[unix.NETLINK_NETFILTER] - before[unix.NETLINK_NETFILTER]; d != 0 {
		t.Errorf("the running listener holds %d NETLINK_NETFILTER sockets; want none", d)
	}
}
