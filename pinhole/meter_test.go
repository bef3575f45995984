package pinhole_test

import (
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// udpCounter is a UDP socket in a namespace that counts what it receives.
type udpCounter struct {
	pc net.PacketConn
	n  atomic.Int64
}

func countUDP(t *testing.T, ns *netlab.NS, addr netip.AddrPort) *udpCounter {
	t.Helper()
	c := &udpCounter{}
	if err := ns.Do(func() (err error) {
		c.pc, err = net.ListenPacket("udp", addr.String())
		return err
	}); err != nil {
		t.Fatalf("listen %v: %v", addr, err)
	}
	t.Cleanup(func() { c.pc.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			if _, _, err := c.pc.ReadFrom(buf); err != nil {
				return
			}
			c.n.Add(1)
		}
	}()
	return c
}

// settle waits until the count stops moving (the reader has drained the
// socket) and returns it.
func (c *udpCounter) settle() int64 {
	last := c.n.Load()
	for {
		time.Sleep(100 * time.Millisecond)
		now := c.n.Load()
		if now == last {
			return now
		}
		last = now
	}
}

// received sends n datagrams from src to dst inside ns, as fast as the
// sender goes but in small bursts so a socket buffer never overflows, and
// returns how many more the counter saw.
func received(t *testing.T, ns *netlab.NS, src netip.Addr, dst netip.AddrPort, n int, c *udpCounter) int64 {
	t.Helper()
	before := c.settle()
	err := ns.Do(func() error {
		conn, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(src, 0)), net.UDPAddrFromAddrPort(dst))
		if err != nil {
			return err
		}
		defer conn.Close()
		msg := make([]byte, 60)
		for i := range n {
			if _, err := conn.Write(msg); err != nil {
				return err
			}
			if i%64 == 63 {
				time.Sleep(time.Millisecond)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("send from %v to %v: %v", src, dst, err)
	}
	return c.settle() - before
}

// TestRequestMeterPKT08 (issue 9): the kernel drops datagrams to pcpd's
// port from a source (IPv6 /64, IPv4 address) sending above the meter's
// rate before they reach the socket; other sources and other ports are not
// affected, and a full meter set lets new sources through uncounted.
func TestRequestMeterPKT08(t *testing.T) {
	const (
		rate, burst = 20, 40
		flood       = 600
		// The most a source may get through: the burst, the rate over the
		// flood's duration (well under a second), and slack.
		most = burst + rate + 20
	)
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	// No owners: every source is one no owner holds, and the shared
	// bucket of those (TestUnownedMeterS4) is set out of reach so that
	// the per-source meter is what is seen here.
	b := newBackend(t, topo.Host, pinhole.Config{Meter: pinhole.Meter{Rate: rate, Burst: burst, Ports: []uint16{5351}, Size: 2,
		UnownedRate: 1 << 20, UnownedBurst: 1 << 20}})
	// pcpd serves on the WAN too here: the Internet's sources are
	// metered on Host's WAN addresses.
	setServed(t, b, []string{topo.HostLANIf, topo.HostWANIf}, topo.HostTunnelV6, topo.HostTunnelV4, topo.HostWANV6, topo.HostPublicV4)

	// The rules read as intended: one raw prerouting chain picks out the
	// datagrams to pcpd's port on an address it serves and hands them to
	// the meter (and notrack), and no input chain is left to pass.
	ruleset := nftList(t, topo.Host, "table", "inet", "pcpd")
	for _, want := range []string{
		"chain control_in {\n\t\ttype filter hook prerouting priority raw; policy accept;\n\t\tudp dport 5351 ip6 daddr @served6 iifname @serving_ifs goto control_local\n\t\tudp dport 5351 ip daddr @served4 iifname @serving_ifs goto control_local\n\t}",
		"chain control_local {\n\t\tip6 saddr @served6 ip6 saddr != fe80::/10 iif != \"lo\" counter packets 0 bytes 0 drop\n" +
			"\t\tip6 saddr @served6 iif != \"lo\" fib saddr . iif type local counter packets 0 bytes 0 drop\n" +
			"\t\tip saddr @served4 iif != \"lo\" counter packets 0 bytes 0 drop\n" +
			"\t\tiif \"lo\" limit rate over 20/second burst 40 packets counter packets 0 bytes 0 drop\n" +
			"\t\tiif \"lo\" notrack accept\n\t\tip6 saddr vmap @owners6\n" +
			"\t\tip saddr vmap @owners4\n\t\tgoto unowned\n\t}",
		"chain control_meter {\n" +
			"\t\tupdate @meter6 { ip6 saddr & ffff:ffff:ffff:ffff:: timeout 10s limit rate over 20/second burst 40 packets } drop\n" +
			"\t\tupdate @meter4 { ip saddr timeout 10s limit rate over 20/second burst 40 packets } drop\n" +
			"\t\tnotrack\n\t\taccept\n\t}",
	} {
		if !strings.Contains(ruleset, want) {
			t.Fatalf("table lacks %q:\n%s", want, ruleset)
		}
	}
	if strings.Contains(ruleset, "hook input") {
		t.Fatalf("table has an input chain:\n%s", ruleset)
	}
	set := nftList(t, topo.Host, "set", "inet", "pcpd", "meter6")
	for _, want := range []string{"size 2", "flags dynamic,timeout", "timeout 10s"} {
		if !strings.Contains(set, want) {
			t.Fatalf("meter6 lacks %q:\n%s", want, set)
		}
	}

	// A second address in the client's /64 shares its bucket; Internet
	// gets extra addresses as more sources.
	sameV6 := netip.MustParseAddr("2001:db8:1:2::11")
	topo.Client.MustRun(t, "ip", "addr", "add", sameV6.String()+"/64", "dev", topo.ClientIf, "nodad")
	// Another /64 than Internet's own (2001:db8:ffff::/64); only sent
	// from, never answered, so Host needs no route back.
	otherV6 := netip.MustParseAddr("2001:db8:fffe::3")
	otherV4 := netip.MustParseAddr("198.51.100.3")
	topo.Internet.MustRun(t, "ip", "addr", "add", otherV6.String()+"/128", "dev", "eth0", "nodad")
	topo.Internet.MustRun(t, "ip", "addr", "add", otherV4.String()+"/24", "dev", "eth0")

	for _, fam := range []struct {
		name                string
		flooder, same       netip.Addr
		flooderNS           *netlab.NS
		dst                 netip.AddrPort
		other, third        netip.Addr
		otherDst, otherPort netip.AddrPort
	}{
		{name: "ipv6", flooder: topo.ClientV6, same: sameV6, flooderNS: topo.Client,
			dst:   netip.AddrPortFrom(topo.HostTunnelV6, 5351),
			other: topo.InternetV6, third: otherV6, otherDst: netip.AddrPortFrom(topo.HostWANV6, 5351),
			otherPort: netip.AddrPortFrom(topo.HostTunnelV6, 5352)},
		{name: "ipv4", flooder: topo.ClientV4, flooderNS: topo.Client,
			dst:   netip.AddrPortFrom(topo.HostTunnelV4, 5351),
			other: topo.InternetV4, third: otherV4, otherDst: netip.AddrPortFrom(topo.HostPublicV4, 5351),
			otherPort: netip.AddrPortFrom(topo.HostTunnelV4, 5352)},
	} {
		t.Run(fam.name, func(t *testing.T) {
			srv := countUDP(t, topo.Host, fam.dst)
			srvOther := countUDP(t, topo.Host, fam.otherDst)
			srvPort := countUDP(t, topo.Host, fam.otherPort)

			if got := received(t, fam.flooderNS, fam.flooder, fam.dst, flood, srv); got < burst || got > most {
				t.Errorf("flood of %d from %v: socket got %d, want %d..%d", flood, fam.flooder, got, burst, most)
			}
			if fam.same.IsValid() {
				// Same /64, right after the flood: the bucket is empty.
				if got := received(t, fam.flooderNS, fam.same, fam.dst, 100, srv); got > rate {
					t.Errorf("100 from %v (flooder's /64): socket got %d, want at most %d", fam.same, got, rate)
				}
			}
			// Another source, within its burst: everything arrives.
			if got := received(t, topo.Internet, fam.other, fam.otherDst, burst/2, srvOther); got != burst/2 {
				t.Errorf("%d from %v (another source): socket got %d, want all", burst/2, fam.other, got)
			}
			// The flooder to a port pcpd does not serve: not metered.
			if got := received(t, fam.flooderNS, fam.flooder, fam.otherPort, flood, srvPort); got != flood {
				t.Errorf("flood of %d from %v to port %d: socket got %d, want all", flood, fam.flooder, fam.otherPort.Port(), got)
			}
			// The set (size 2) holds the flooder and the other source: a
			// third source is not tracked, so not dropped, however fast.
			if got := received(t, topo.Internet, fam.third, fam.otherDst, flood, srvOther); got != flood {
				t.Errorf("flood of %d from %v with the meter set full: socket got %d, want all (the meter must not drop untracked sources)", flood, fam.third, got)
			}
			elems := nftList(t, topo.Host, "set", "inet", "pcpd", "meter"+fam.name[3:])
			if strings.Contains(elems, fam.third.String()) {
				t.Errorf("meter set holds %v beyond its size:\n%s", fam.third, elems)
			}
		})
	}
}
