package netlab

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// TopologyOptions chooses how the tunnel host reaches the client.
type TopologyOptions struct {
	// WireGuard puts a userspace WireGuard tunnel between Host and Client
	// (over a veth underlay); otherwise they share a plain veth link.
	WireGuard bool
	// WGCommand runs a WireGuard device; the interface name is appended.
	// Default: the wireguard-go binary built from this module.
	WGCommand []string
}

// Topology is three namespaces in a row:
//
//	Internet (eth0) ── (wan0) Host (lan0 | wgh…) ── Client (eth0 | wgc…)
//
// Host forwards IPv4 and IPv6. Internet routes the clients' /48 via Host;
// Client routes everything via Host. Host's WAN IPv4 plays its public IPv4.
type Topology struct {
	Internet, Host, Client *NS

	HostWANIf string // Host's interface towards Internet ("wan0")
	HostLANIf string // Host's interface towards Client: "lan0" or the WireGuard interface
	ClientIf  string // Client's interface towards Host: "eth0" or its WireGuard interface

	InternetV6, InternetV4       netip.Addr   // Internet's addresses
	HostWANV6, HostPublicV4      netip.Addr   // Host's addresses on wan0
	HostTunnelV6, HostTunnelV4   netip.Addr   // Host's addresses on HostLANIf: where pcpd serves
	ClientV6, ClientV4           netip.Addr   // Client's addresses
	ClientPrefix6, ClientPrefix4 netip.Prefix // what Client owns

	// WireGuard only.
	HostKey, ClientKey wgtypes.Key
	HostWGPort         int
}

var (
	internetV6     = netip.MustParseAddr("2001:db8:ffff::2")
	internetV4     = netip.MustParseAddr("198.51.100.2")
	hostWANV6      = netip.MustParseAddr("2001:db8:ffff::1")
	hostPublicV4   = netip.MustParseAddr("198.51.100.1")
	clientPrefix6  = netip.MustParsePrefix("2001:db8:1:2::/64")
	clientV6       = netip.MustParseAddr("2001:db8:1:2::10")
	clientV4       = netip.MustParseAddr("10.100.0.2")
	hostTunnelV4   = netip.MustParseAddr("10.100.0.1")
	hostLANV6      = netip.MustParseAddr("2001:db8:1:2::1")
	hostWGV6       = netip.MustParseAddr("2001:db8:1::1")
	underlayHostV4 = "10.99.0.1"
	underlayCliV4  = "10.99.0.2"
)

// BuildTopology creates the namespaces and links. On error everything made
// so far is removed.
func BuildTopology(opts TopologyOptions) (topo *Topology, err error) {
	topo = &Topology{
		HostWANIf:     "wan0",
		InternetV6:    internetV6,
		InternetV4:    internetV4,
		HostWANV6:     hostWANV6,
		HostPublicV4:  hostPublicV4,
		HostTunnelV4:  hostTunnelV4,
		ClientV6:      clientV6,
		ClientV4:      clientV4,
		ClientPrefix6: clientPrefix6,
		ClientPrefix4: netip.PrefixFrom(clientV4, 32),
	}
	defer func() {
		if err != nil {
			topo.Close()
			topo = nil
		}
	}()
	if topo.Internet, err = New("inet"); err != nil {
		return
	}
	if topo.Host, err = New("host"); err != nil {
		return
	}
	if topo.Client, err = New("cli"); err != nil {
		return
	}
	if err = Veth(topo.Internet, "eth0", topo.Host, "wan0"); err != nil {
		return
	}
	run := func(ns *NS, args ...string) {
		if err == nil {
			_, err = ns.Run(args...)
		}
	}
	run(topo.Host, "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/forwarding; echo 1 > /proc/sys/net/ipv4/ip_forward")
	run(topo.Internet, "ip", "addr", "add", "2001:db8:ffff::2/64", "dev", "eth0", "nodad")
	run(topo.Internet, "ip", "addr", "add", "198.51.100.2/24", "dev", "eth0")
	run(topo.Internet, "ip", "-6", "route", "add", "2001:db8:1::/48", "via", hostWANV6.String())
	run(topo.Host, "ip", "addr", "add", "2001:db8:ffff::1/64", "dev", "wan0", "nodad")
	run(topo.Host, "ip", "addr", "add", "198.51.100.1/24", "dev", "wan0")
	if err != nil {
		return
	}
	if opts.WireGuard {
		err = topo.buildWireGuard(opts)
	} else {
		err = topo.buildVeth()
	}
	// The IPv6 addresses receive only once the kernel's addrconf work has
	// added their local routes (WaitLocal).
	for _, w := range []struct {
		ns    *NS
		addrs []netip.Addr
	}{
		{topo.Internet, []netip.Addr{topo.InternetV6}},
		{topo.Host, []netip.Addr{topo.HostWANV6, topo.HostTunnelV6}},
		{topo.Client, []netip.Addr{topo.ClientV6}},
	} {
		if err == nil {
			err = w.ns.waitLocal(10*time.Second, w.addrs...)
		}
	}
	return
}

func (topo *Topology) buildVeth() (err error) {
	topo.HostLANIf, topo.ClientIf = "lan0", "eth0"
	topo.HostTunnelV6 = hostLANV6
	if err = Veth(topo.Host, "lan0", topo.Client, "eth0"); err != nil {
		return err
	}
	run := func(ns *NS, args ...string) {
		if err == nil {
			_, err = ns.Run(args...)
		}
	}
	run(topo.Host, "ip", "addr", "add", "2001:db8:1:2::1/64", "dev", "lan0", "nodad")
	run(topo.Host, "ip", "addr", "add", "10.100.0.1/24", "dev", "lan0")
	run(topo.Client, "ip", "addr", "add", "2001:db8:1:2::10/64", "dev", "eth0", "nodad")
	run(topo.Client, "ip", "addr", "add", "10.100.0.2/24", "dev", "eth0")
	run(topo.Client, "ip", "-6", "route", "add", "default", "via", hostLANV6.String())
	run(topo.Client, "ip", "route", "add", "default", "via", hostTunnelV4.String())
	return err
}

func (topo *Topology) buildWireGuard(opts TopologyOptions) (err error) {
	cmd := opts.WGCommand
	if cmd == nil {
		if cmd, err = DefaultWGCommand(); err != nil {
			return err
		}
	}
	topo.HostLANIf, topo.ClientIf = UniqueIfName("wgh"), UniqueIfName("wgc")
	topo.HostTunnelV6 = hostWGV6
	topo.HostWGPort = 51820
	if err = Veth(topo.Host, "ul0", topo.Client, "ul0"); err != nil {
		return err
	}
	run := func(ns *NS, args ...string) {
		if err == nil {
			_, err = ns.Run(args...)
		}
	}
	run(topo.Host, "ip", "addr", "add", underlayHostV4+"/30", "dev", "ul0")
	run(topo.Client, "ip", "addr", "add", underlayCliV4+"/30", "dev", "ul0")
	if err != nil {
		return err
	}
	if err = StartWireGuardDevice(topo.Host, topo.HostLANIf, cmd); err != nil {
		return err
	}
	if err = StartWireGuardDevice(topo.Client, topo.ClientIf, cmd); err != nil {
		return err
	}
	if topo.HostKey, err = wgtypes.GeneratePrivateKey(); err != nil {
		return err
	}
	if topo.ClientKey, err = wgtypes.GeneratePrivateKey(); err != nil {
		return err
	}
	wg, err := wgctrl.New()
	if err != nil {
		return fmt.Errorf("netlab: wgctrl: %w", err)
	}
	defer wg.Close()
	keepalive := time.Second
	err = wg.ConfigureDevice(topo.HostLANIf, wgtypes.Config{
		PrivateKey: &topo.HostKey,
		ListenPort: &topo.HostWGPort,
		Peers: []wgtypes.PeerConfig{{
			PublicKey:         topo.ClientKey.PublicKey(),
			ReplaceAllowedIPs: true,
			AllowedIPs:        []net.IPNet{ipnet(topo.ClientPrefix6), ipnet(topo.ClientPrefix4)},
		}},
	})
	if err != nil {
		return fmt.Errorf("netlab: configure %s: %w", topo.HostLANIf, err)
	}
	err = wg.ConfigureDevice(topo.ClientIf, wgtypes.Config{
		PrivateKey: &topo.ClientKey,
		Peers: []wgtypes.PeerConfig{{
			PublicKey:                   topo.HostKey.PublicKey(),
			Endpoint:                    &net.UDPAddr{IP: net.ParseIP(underlayHostV4), Port: topo.HostWGPort},
			PersistentKeepaliveInterval: &keepalive,
			ReplaceAllowedIPs:           true,
			AllowedIPs: []net.IPNet{
				ipnet(netip.MustParsePrefix("::/0")),
				ipnet(netip.MustParsePrefix("0.0.0.0/0")),
			},
		}},
	})
	if err != nil {
		return fmt.Errorf("netlab: configure %s: %w", topo.ClientIf, err)
	}
	h, c := topo.HostLANIf, topo.ClientIf
	run(topo.Host, "ip", "link", "set", h, "mtu", "1420", "up")
	run(topo.Host, "ip", "addr", "add", hostWGV6.String()+"/128", "dev", h, "nodad")
	run(topo.Host, "ip", "addr", "add", "10.100.0.1/24", "dev", h)
	run(topo.Host, "ip", "-6", "route", "add", clientPrefix6.String(), "dev", h)
	run(topo.Client, "ip", "link", "set", c, "mtu", "1420", "up")
	run(topo.Client, "ip", "addr", "add", "2001:db8:1:2::10/64", "dev", c, "nodad")
	run(topo.Client, "ip", "addr", "add", "10.100.0.2/24", "dev", c)
	run(topo.Client, "ip", "-6", "route", "add", "default", "dev", c)
	run(topo.Client, "ip", "route", "add", "default", "dev", c)
	if err != nil {
		return err
	}
	// The client's keepalive starts the handshake once its link is up.
	// Wait for it: a test's first request otherwise waits in wireguard-go
	// for it, and if that first initiation is lost (the host's device still
	// binding its socket), the retry comes only after REKEY_TIMEOUT (5 s),
	// later than a test's 3 s of request retries (TestE2ESpoofedHostSource
	// got no reply once in about 8 server runs, pcpd having seen nothing).
	return Eventually(15*time.Second, func() error {
		d, err := wg.Device(c)
		if err != nil {
			return err
		}
		if len(d.Peers) == 0 || d.Peers[0].LastHandshakeTime.IsZero() {
			return fmt.Errorf("netlab: no WireGuard handshake between %s and %s yet", c, h)
		}
		return nil
	})
}

// NewTopology is BuildTopology for tests.
func NewTopology(t testing.TB, opts TopologyOptions) *Topology {
	t.Helper()
	RequireRoot(t)
	topo, err := BuildTopology(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { topo.Close() })
	return topo
}

// Close removes the namespaces (and with them every link, address, route,
// nftables table and process inside them).
func (topo *Topology) Close() error {
	var errs []error
	for _, ns := range []*NS{topo.Client, topo.Host, topo.Internet} {
		if ns != nil {
			errs = append(errs, ns.Close())
		}
	}
	return errors.Join(errs...)
}

// RecreateHostWireGuard creates the host's WireGuard interface again
// after it was deleted, as wg-quick up does: a new device under
// HostLANIf (the old one's control socket removed first), the host's
// key, listening on port, with peer as its one peer; then the link up,
// its addresses and the route to the client's IPv6 prefix. It does not
// wait for the tunnel.
func (topo *Topology) RecreateHostWireGuard(peer wgtypes.PeerConfig, port int) error {
	ifc := topo.HostLANIf
	os.Remove(filepath.Join(SocketDir, ifc+".sock"))
	cmd, err := DefaultWGCommand()
	if err != nil {
		return err
	}
	if err := StartWireGuardDevice(topo.Host, ifc, cmd); err != nil {
		return err
	}
	wg, err := wgctrl.New()
	if err != nil {
		return fmt.Errorf("netlab: wgctrl: %w", err)
	}
	defer wg.Close()
	if err := wg.ConfigureDevice(ifc, wgtypes.Config{PrivateKey: &topo.HostKey, ListenPort: &port, Peers: []wgtypes.PeerConfig{peer}}); err != nil {
		return fmt.Errorf("netlab: configure %s: %w", ifc, err)
	}
	return topo.UpHostWireGuard()
}

// UpHostWireGuard sets the host's WireGuard interface up as wg-quick
// does: the link up, its addresses and the route to the client's IPv6
// prefix (after RecreateHostWireGuard, or its return from another
// namespace, which took them).
func (topo *Topology) UpHostWireGuard() error {
	ifc := topo.HostLANIf
	for _, args := range [][]string{
		{"ip", "link", "set", ifc, "mtu", "1420", "up"},
		{"ip", "addr", "add", topo.HostTunnelV6.String() + "/128", "dev", ifc, "nodad"},
		{"ip", "addr", "add", topo.HostTunnelV4.String() + "/24", "dev", ifc},
		{"ip", "-6", "route", "add", topo.ClientPrefix6.String(), "dev", ifc},
	} {
		if _, err := topo.Host.Run(args...); err != nil {
			return err
		}
	}
	return nil
}

func ipnet(p netip.Prefix) net.IPNet {
	return net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
