package server

import (
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestNAPTToSubnetBroadcast: a client whose prefix holds the broadcast
// address of one of the host's own subnets (a router peer routing part of
// the tunnel subnet here; in static mode, `--client lan=192.168.1.0/24` on
// the router whose LAN that is) must not map a public port to that
// broadcast address. The DNAT-ed packet is routed as a local broadcast:
// it goes to the host's INPUT, past the forward guard, and every host
// socket bound to the wildcard address on that port receives it, so the
// internet reaches the host's internal-only UDP services (a resolver, a
// DHCP server). The host's unicast addresses are never openable
// (DESIGN.md); its broadcast addresses are the host too.
func TestNAPTToSubnetBroadcast(t *testing.T) {
	// The daemon's own host-address set (cmd/pcpd serve), read in the
	// Host namespace.
	host := new(policy.HostSet)
	l := newLab(t, func(_ *Config, pc *policy.Config) { pc.HostAddrs = host.Contains })
	if err := l.topo.Host.Do(host.Refresh); err != nil {
		t.Fatal(err)
	}
	for _, a := range []netip.Addr{l.topo.HostTunnelV4, l.topo.HostTunnelV6, l.topo.HostPublicV4, l.topo.HostWANV6} {
		if !host.Contains(a) {
			t.Fatalf("the host's %v is not in its host-address set", a)
		}
	}
	bcast := netip.MustParseAddr("10.100.0.255") // of the host's 10.100.0.1/24
	routed := netip.MustParsePrefix("10.100.0.128/25")
	ipnet := func(p netip.Prefix) net.IPNet {
		return net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
	}
	if err := l.wgc.ConfigureDevice(l.topo.HostLANIf, wgtypes.Config{Peers: []wgtypes.PeerConfig{{
		PublicKey: l.topo.ClientKey.PublicKey(), UpdateOnly: true, ReplaceAllowedIPs: true,
		AllowedIPs: []net.IPNet{ipnet(l.topo.ClientPrefix6), ipnet(l.topo.ClientPrefix4), ipnet(routed)},
	}}}); err != nil {
		t.Fatal(err)
	}
	if err := netlab.Eventually(3*time.Second, func() error {
		if o, ok := l.wg.Lookup(bcast); !ok || o.ID == "" {
			return errors.New("widened AllowedIPs not seen yet")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// An internal-only service of the host, on the wildcard address.
	var svc *net.UDPConn
	if err := l.topo.Host.Do(func() (err error) {
		svc, err = net.ListenUDP("udp4", &net.UDPAddr{Port: 9999})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer svc.Close()

	r := mapReq(l.topo.ClientV4, pcp.ProtoUDP, 9999, 19999, time.Hour, 1)
	r.Options.ThirdParty = bcast
	resp := l.pcp(r)
	t.Logf("MAP UDP %v:9999 (THIRD_PARTY): %v, external %v:%d", bcast, resp.Result, resp.Map.ExternalAddr, resp.Map.ExternalPort)
	if resp.Result == 0 {
		t.Errorf("mapped the host's subnet broadcast %v", bcast)
	}
	pub := netip.AddrPortFrom(l.topo.HostPublicV4, resp.Map.ExternalPort)
	if resp.Result != 0 {
		pub = netip.AddrPortFrom(l.topo.HostPublicV4, 19999)
	}
	var c *net.UDPConn
	if err := l.topo.Internet.Do(func() (err error) {
		c, err = net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(l.topo.InternetV4, 0)), net.UDPAddrFromAddrPort(pub))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 64)
	for range 3 {
		c.Write([]byte("hello from the internet"))
		svc.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		if _, from, err := svc.ReadFromUDPAddrPort(buf); err == nil {
			t.Errorf("a datagram from the internet to %v reached the host's own service on *:9999 (from %v)", pub, from)
			break
		}
	}
}
