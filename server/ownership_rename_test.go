package server

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
)

// TestE2ERenamedInterfaceKeepsNoOwnership (review of the F3 fix,
// h/revown): a request's owner follows its arrival interface by kernel
// name (Request.Iface, the socket's kname). The listener takes a new
// kernel name at once (a netlink event re-creates the socket, bound to the
// new interface index), but policy.WireGuard learns names only when it
// re-reads (every 5 s by default, or on a miss; a stale hit asks for no
// re-read). So when the two served interfaces trade names (the client's
// renamed away, the one with a full-tunnel peer renamed to the client's
// old name), that peer's MAP from the client's address arrives on a
// socket named like the client's interface, and the stale per-interface
// table of that name takes it as the client's. Refresh is an hour here
// to make the window deterministic; it is 5 s in pcpd. Operator-
// triggered, and in standalone mode the kernel owner meter's strict
// reverse-path check (by interface index) would drop the datagram first.
// Fails on main: the attacker's lease is made as the client's.
func TestE2ERenamedInterfaceKeepsNoOwnership(t *testing.T) {
	l := newLab(t)
	// Refresh is an hour: the window stays open.
	port := 51897
	second := l.serveSecondWGAs(t, "rvo", port, time.Hour)

	// The server's address on the second interface survives the renames'
	// link downs.
	for _, ifc := range []string{"all", "default", second, l.topo.HostLANIf} {
		l.topo.Host.MustRun(t, "sysctl", "-qw", "net.ipv6.conf."+ifc+".keep_addr_on_down=1")
	}
	// The attacker: a full-tunnel peer of the second interface, sending
	// from the client's address.
	serverAddr := netip.MustParseAddr("2001:db8:3::1")
	att := l.fullTunnelAttacker(t, "rvo", second, port, netip.MustParsePrefix("10.97.0.0/30"), serverAddr)

	req := pcp.AppendRequest(nil, mapReq(l.topo.ClientV6, pcp.ProtoTCP, 2222, 0, time.Hour, 7))
	attack := func(tries int) {
		t.Helper()
		if err := att.Do(func() error {
			c, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(l.topo.ClientV6, 0)),
				net.UDPAddrFromAddrPort(netip.AddrPortFrom(serverAddr, Port)))
			if err != nil {
				return err
			}
			defer c.Close()
			for range tries {
				c.Write(req)
				time.Sleep(250 * time.Millisecond)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	// Before the rename F3's fix holds (a miss re-reads: settle after).
	attack(4)
	if ls := l.srv.Leases(); len(ls) != 0 {
		t.Fatalf("before the rename the attacker made leases: %+v", ls)
	}

	// The two served interfaces trade names; the ownership is not re-read.
	client, tmp := l.topo.HostLANIf, netlab.UniqueIfName("rvot")
	l.topo.Host.MustRun(t, "ip", "link", "set", client, "down")
	l.topo.Host.MustRun(t, "ip", "link", "set", client, "name", tmp)
	l.topo.Host.MustRun(t, "ip", "link", "set", second, "down")
	l.topo.Host.MustRun(t, "ip", "link", "set", second, "name", client)
	l.topo.Host.MustRun(t, "ip", "link", "set", client, "up")
	l.topo.Host.MustRun(t, "ip", "link", "set", tmp, "up")
	attack(16) // 4 s: the listener's 2-s pass at the latest
	for _, le := range l.srv.Leases() {
		if le.InternalAddr == l.topo.ClientV6 {
			t.Errorf("after %s and %s traded names, %s's full-tunnel peer made a lease as the client: %+v", client, second, second, le)
		}
	}
}
