package conformance

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/internal/pcpdtest"
)

// The lab: netlab's three-namespace topology with the extra addresses the
// suite needs, and the Env hooks (sockets in the client namespace, data
// plane from the internet namespace, outside vantage point).

var (
	labTP       = netip.MustParseAddr("2001:db8:1:2::20") // second address of client c1
	labOther    = netip.MustParseAddr("2001:db8:1:3::10") // client c2
	labOther4   = netip.MustParseAddr("10.100.0.3")       // client c2
	labNotOwned = netip.MustParseAddr("2001:db8:1:5::10") // nobody's
	labAlt      = netip.MustParseAddr("2001:db8:1:3::1")  // Host's second LAN address
)

type lab struct {
	topo *netlab.Topology
}

func newLab(t *testing.T) *lab {
	t.Helper()
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	steps := []struct {
		ns   *netlab.NS
		args []string
	}{
		{topo.Client, []string{"ip", "addr", "add", labTP.String() + "/64", "dev", "eth0", "nodad"}},
		{topo.Client, []string{"ip", "addr", "add", labOther.String() + "/64", "dev", "eth0", "nodad"}},
		{topo.Client, []string{"ip", "addr", "add", labNotOwned.String() + "/64", "dev", "eth0", "nodad"}},
		{topo.Client, []string{"ip", "addr", "add", labOther4.String() + "/24", "dev", "eth0"}},
		{topo.Host, []string{"ip", "addr", "add", labAlt.String() + "/64", "dev", "lan0", "nodad"}},
		{topo.Host, []string{"ip", "addr", "add", "2001:db8:1:5::1/64", "dev", "lan0", "nodad"}},
		{topo.Internet, []string{"ip", "addr", "add", "2001:db8:ffff::3/64", "dev", "eth0", "nodad"}},
		{topo.Internet, []string{"ip", "addr", "add", "2001:db8:ffff::4/64", "dev", "eth0", "nodad"}},
		{topo.Internet, []string{"ip", "addr", "add", "198.51.100.3/24", "dev", "eth0"}},
		{topo.Internet, []string{"ip", "addr", "add", "198.51.100.4/24", "dev", "eth0"}},
		// Without SNAT, replies to the client's private IPv4 still find
		// their way back, so PMP-11 can report what source was seen.
		{topo.Internet, []string{"ip", "route", "add", "10.100.0.0/24", "via", "198.51.100.1"}},
	}
	for _, s := range steps {
		s.ns.MustRun(t, s.args...)
	}
	return &lab{topo: topo}
}

// env returns an Env for a server on the Host's LAN addresses, with every
// hook the lab offers. The caller fills in the target's policy.
func (l *lab) env(t *testing.T) *Env {
	topo := l.topo
	listen := func(ns *netlab.NS) func(netip.AddrPort) (net.PacketConn, error) {
		return func(a netip.AddrPort) (net.PacketConn, error) {
			var c net.PacketConn
			err := ns.Do(func() (err error) {
				c, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(a))
				return err
			})
			return c, err
		}
	}
	e := &Env{
		Server:       netip.AddrPortFrom(topo.HostTunnelV6, 5351),
		Client:       topo.ClientV6,
		ServerAlt:    netip.AddrPortFrom(labAlt, 5351),
		Server4:      netip.AddrPortFrom(topo.HostTunnelV4, 5351),
		Client4:      topo.ClientV4,
		ThirdParty:   labTP,
		OtherClient:  labOther,
		OtherClient4: labOther4,
		NotOwned:     labNotOwned,
		ListenPacket: listen(topo.Client),
		Outside: &Outside{
			ListenPacket: listen(topo.Internet),
			Targets:      []netip.AddrPort{netip.AddrPortFrom(topo.HostPublicV4, 5351), netip.AddrPortFrom(topo.HostWANV6, 5351)},
			Source4:      topo.InternetV4,
			Source6:      topo.InternetV6,
		},
		Data: &DataPlane{
			Serve: func(proto byte, port uint16) (io.Closer, error) {
				addr := fmt.Sprintf("[::]:%d", port)
				if proto == protoUDP {
					return topo.Client.StartUDPEcho(addr)
				}
				return topo.Client.StartTCPServer(addr)
			},
			Probe: func(proto byte, from, to netip.AddrPort) error {
				return probeFrom(topo.Internet, proto, from, to)
			},
			Sources6: []netip.Addr{topo.InternetV6, netip.MustParseAddr("2001:db8:ffff::3"), netip.MustParseAddr("2001:db8:ffff::4")},
			Sources4: []netip.Addr{topo.InternetV4, netip.MustParseAddr("198.51.100.3"), netip.MustParseAddr("198.51.100.4")},
		},
	}
	e.Data.EchoTCP = func(port uint16) (io.Closer, error) { return topo.Client.StartTCPEcho(fmt.Sprintf("[::]:%d", port)) }
	e.Data.DialTCP = func(to netip.AddrPort) (net.Conn, error) {
		var c net.Conn
		err := topo.Internet.Do(func() (err error) {
			c, err = net.DialTimeout("tcp", to.String(), time.Second)
			return err
		})
		return c, err
	}
	refl := netip.AddrPortFrom(topo.InternetV4, 7777)
	rc, err := topo.Internet.StartUDPReflector(refl.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rc.Close() })
	e.Data.Outbound = func(from netip.AddrPort) (netip.AddrPort, error) {
		return outbound(topo.Client, from, refl)
	}
	if testing.Verbose() && os.Getenv("PCPD_CONFORMANCE_TRACE") != "" {
		e.Logf = t.Logf
	}
	return e
}

// probeFrom connects from the namespace (source from, if given) to to and
// wants the netlab greeting (TCP) or echo (UDP) within a second.
func probeFrom(ns *netlab.NS, proto byte, from, to netip.AddrPort) error {
	network := "tcp"
	if proto == protoUDP {
		network = "udp"
	}
	return ns.Probe(network, from, to.String(), time.Second)
}

func TestMain(m *testing.M) { os.Exit(pcpdtest.Main(m)) }

// pcpdDaemon runs cmd/pcpd serve in the lab's Host namespace, for the
// Env's Start, Stop, Restart and Wipe hooks.
type pcpdDaemon struct {
	pcpd  *pcpdtest.Daemon
	state string // --state-dir
}

// start runs pcpd and waits until it answers ANNOUNCE.
func (d *pcpdDaemon) start() error { return d.pcpd.Start() }

// stop kills pcpd (SIGKILL: the suite's restarts are crashes).
func (d *pcpdDaemon) stop() error {
	d.pcpd.Kill()
	return nil
}

// wipe restarts pcpd with its state directory deleted (EPO-03).
func (d *pcpdDaemon) wipe() error {
	d.stop()
	if err := os.RemoveAll(d.state); err != nil {
		return err
	}
	return d.start()
}

// startPcpd starts pcpd with static ownership: c1 owns the client's
// /64 and IPv4, c2 the other client's; lifetimes from 3 s so expiry is
// testable. The suite cannot self-host without cmd/pcpd: a build failure
// skips.
func startPcpd(t *testing.T, l *lab) *pcpdDaemon {
	t.Helper()
	if _, err := pcpdtest.Build(); err != nil {
		t.Skipf("cmd/pcpd does not build, cannot self-host the suite: %v", err)
	}
	topo := l.topo
	state := filepath.Join(t.TempDir(), "state")
	d := pcpdtest.Start(t, pcpdtest.Config{
		NS: topo.Host,
		Args: []string{"serve",
			"--interface", topo.HostLANIf,
			"--client", "c1=" + topo.ClientPrefix6.String() + "," + topo.ClientPrefix4.String(),
			"--client", "c2=2001:db8:1:3::/64," + labOther4.String() + "/32",
			"--external-ipv4", topo.HostPublicV4.String(),
			"--state-dir", state,
			"--socket", filepath.Join(filepath.Dir(state), "pcpd.sock"),
			"--nft-table", "pcpdconf",
			"--min-lifetime", "3s",
			"--max-leases-per-client", "40",
			"--log-level", "warn",
		},
		Ready: pcpdtest.Announce(topo.Client, topo.ClientV6, netip.AddrPortFrom(topo.HostTunnelV6, 5351)),
	})
	return &pcpdDaemon{pcpd: d, state: state}
}

// outbound sends from the client's from to the reflector and returns the
// source address the internet saw.
func outbound(ns *netlab.NS, from, refl netip.AddrPort) (netip.AddrPort, error) {
	var seen netip.AddrPort
	err := ns.Do(func() error {
		c, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(from), net.UDPAddrFromAddrPort(refl))
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(time.Second))
		if _, err := c.Write([]byte("who am i")); err != nil {
			return err
		}
		buf := make([]byte, 128)
		n, err := c.Read(buf)
		if err != nil {
			return err
		}
		seen, err = netip.ParseAddrPort(string(buf[:n]))
		return err
	})
	return seen, err
}
