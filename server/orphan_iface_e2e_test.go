package server

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
)

// TestE2EOrphanAnnouncedOnItsInterface (issue 9, h/swap2): pcpd serves
// two interfaces, the lab's WireGuard one (the tunnel's client) and a
// LAN (ln1, a second client). At start the kernel holds pinholes no
// lease explains (orphans: leases lost with the store) of both clients;
// each client must get the unsolicited ANNOUNCE (ANN-03, ANN-04: on
// every serving path, from the address it sends its requests to), and
// the LAN's IPv4 client the NAT-PMP address announcement too, each from
// its own interface's serving address, and nothing from another one.
// Before, every orphan was announced from the first serving socket of
// its family (sorted by address: the tunnel's here), bound to the
// tunnel: the LAN client got nothing (IPv4 asked ARP for it on the
// tunnel). Judged by the datagrams the clients receive on port 5350.
func TestE2EOrphanAnnouncedOnItsInterface(t *testing.T) {
	l := newLab(t)
	c2 := netlab.NewNS(t, "c2")
	if err := netlab.Veth(l.topo.Host, "ln1", c2, "eth0"); err != nil {
		t.Fatal(err)
	}
	// Above the tunnel's 2001:db8:1::1 and 10.100.0.1: the tunnel's
	// sockets sort first.
	srv6, srv4 := netip.MustParseAddr("2001:db8:1:3::1"), netip.MustParseAddr("10.100.1.1")
	cli6, cli4 := netip.MustParseAddr("2001:db8:1:3::10"), netip.MustParseAddr("10.100.1.10")
	l.topo.Host.MustRun(t, "ip", "addr", "add", srv6.String()+"/64", "dev", "ln1", "nodad")
	l.topo.Host.MustRun(t, "ip", "addr", "add", srv4.String()+"/24", "dev", "ln1")
	c2.MustRun(t, "ip", "addr", "add", cli6.String()+"/64", "dev", "eth0", "nodad")
	c2.MustRun(t, "ip", "addr", "add", cli4.String()+"/24", "dev", "eth0")
	l.topo.Host.WaitLocal(t, srv6)
	c2.WaitLocal(t, cli6)

	l.stop()
	tunnel6 := l.topo.ClientV6
	if err := l.fw.Apply([]pinhole.Op{
		{Kind: pinhole.Install, Pinhole: hole(6, cli6, 8443, cli6, 8443), Timeout: time.Hour},
		{Kind: pinhole.Install, Pinhole: hole(6, cli4, 8443, l.topo.HostPublicV4, 18443), Timeout: time.Hour},
		{Kind: pinhole.Install, Pinhole: hole(6, tunnel6, 8443, tunnel6, 8443), Timeout: time.Hour},
	}); err != nil {
		t.Fatal(err)
	}
	type got struct {
		at, from string
		what     string
	}
	var (
		mu   sync.Mutex
		seen []got
	)
	listen := func(ns *netlab.NS, at, network string) {
		var c *net.UDPConn
		if err := ns.Do(func() (err error) {
			c, err = net.ListenUDP(network, &net.UDPAddr{Port: pcp.ClientPort})
			return err
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		go func() {
			buf := make([]byte, 2048)
			for {
				n, from, err := c.ReadFromUDPAddrPort(buf)
				if err != nil {
					return
				}
				what := fmt.Sprintf("% x", buf[:min(n, 4)])
				switch {
				case n >= 2 && buf[0] == pcp.Version && buf[1] == 0x80|byte(pcp.OpAnnounce):
					what = "ANNOUNCE"
				case n >= 2 && buf[0] == 0 && buf[1] == 128:
					what = "NAT-PMP address"
				}
				mu.Lock()
				seen = append(seen, got{at, netip.AddrPortFrom(from.Addr().Unmap(), from.Port()).String(), what})
				mu.Unlock()
			}
		}()
	}
	listen(c2, "LAN client", "udp6")
	listen(c2, "LAN client", "udp4")
	listen(l.topo.Client, "tunnel client", "udp6")

	l.cfg.Interfaces = []string{l.topo.HostLANIf, "ln1"}
	l.cfg.AnnounceMulticast = false
	l.start()
	want := []got{
		{"LAN client", netip.AddrPortFrom(srv6, Port).String(), "ANNOUNCE"},
		{"LAN client", netip.AddrPortFrom(srv4, Port).String(), "ANNOUNCE"},
		{"LAN client", netip.AddrPortFrom(srv4, Port).String(), "NAT-PMP address"},
		{"tunnel client", netip.AddrPortFrom(l.topo.HostTunnelV6, Port).String(), "ANNOUNCE"},
	}
	// The rounds: right after the start, then 250, 500, 1000 ms ... on;
	// the start's audit finds the orphans meanwhile.
	err := netlab.Eventually(10*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		for _, w := range want {
			if !slices.Contains(seen, w) {
				return fmt.Errorf("%s got no %s from %s", w.at, w.what, w.from)
			}
		}
		return nil
	})
	mu.Lock()
	defer mu.Unlock()
	if err != nil {
		t.Errorf("orphans' announcements: %v (received: %v)", err, seen)
	}
	for _, s := range seen {
		if !slices.Contains(want, s) {
			t.Errorf("%s got %s from %s: not its interface's serving address", s.at, s.what, s.from)
		}
	}
}
