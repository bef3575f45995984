package interop

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/pcpd/pcpd/control"
	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/internal/pcpdtest"
	"github.com/pcpd/pcpd/pcp"
)

func TestMain(m *testing.M) {
	code := pcpdtest.Main(m)
	if tsBuild.dir != "" {
		os.RemoveAll(tsBuild.dir)
	}
	os.Exit(code)
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("interop: needs root (network namespaces, nftables); CI runs it as root: sudo go test ./interop/")
	}
}

// requireTool skips when an external client is not installed.
func requireTool(t testing.TB, name, pkg string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Skipf("interop: %s not installed (Debian package %s): %v", name, pkg, err)
	}
}

// lab is netlab's veth topology with pcpd serving on the Host's lan0:
// client c1 owns the Client's /64 and its IPv4, mapped to the Host's
// public 198.51.100.1.
type lab struct {
	topo   *netlab.Topology
	pcpd   *pcpdtest.Daemon
	socket string // pcpd's control socket
}

// newLab starts the lab; extra are more pcpd serve flags.
func newLab(t *testing.T, extra ...string) *lab {
	t.Helper()
	requireRoot(t)
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	dir := t.TempDir()
	args := []string{"serve",
		"--interface", topo.HostLANIf,
		"--client", "c1=" + topo.ClientPrefix6.String() + "," + topo.ClientPrefix4.String(),
		"--external-ipv4", topo.HostPublicV4.String(),
		"--state-dir", filepath.Join(dir, "state"),
		"--socket", filepath.Join(dir, "pcpd.sock"),
		"--log-level", "warn",
	}
	d := pcpdtest.Start(t, pcpdtest.Config{
		NS:    topo.Host,
		Args:  append(args, extra...),
		Ready: pcpdtest.Announce(topo.Client, topo.ClientV6, netip.AddrPortFrom(topo.HostTunnelV6, pcp.Port)),
	})
	return &lab{topo: topo, pcpd: d, socket: filepath.Join(dir, "pcpd.sock")}
}

// waitReleased waits until pcpd holds no lease on external (its
// control socket's listing), then ends the mapping of the client's
// internal proto port itself with a delete whose reply it waits for. A
// client that does not wait for the answer to its own delete (Tailscale's
// release sends it and returns) may otherwise probe before pcpd has
// processed it: pcpd's promise (PMP-12) is no data once the delete is
// answered. The listing shows that the client's own delete ended the
// lease; the test's delete, answered after pcpd's batches before it
// (or, read first, deleting the mapping itself: then the lease would have
// been listed), makes the probe after it wait for the kernel.
func (l *lab) waitReleased(t *testing.T, external netip.AddrPort, internal netip.Addr, proto pcp.Protocol, port uint16) {
	t.Helper()
	cc := &control.Client{Path: l.socket, Timeout: 5 * time.Second}
	if err := netlab.Eventually(10*time.Second, func() error {
		held := 0
		if _, err := cc.Leases(context.Background(), func(le control.Lease) error {
			if netip.AddrPortFrom(le.ExternalAddress, le.ExternalPort) == external {
				held++
			}
			return nil
		}); err != nil {
			return err
		}
		if held > 0 {
			return fmt.Errorf("pcpd still holds %d lease(s) on %s after the client's delete", held, external)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	c, err := l.pcpClientFrom(internal, l.topo.HostTunnelV4)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var resp pcp.Response
	if err := c.Do(ctx, pcp.NewMap(internal, proto, port, 0), &resp); err != nil {
		t.Fatalf("delete of %v %d: %v", proto, port, err)
	}
	if resp.Result != pcp.Success {
		t.Fatalf("delete of %v %d: %v, want SUCCESS", proto, port, resp.Result)
	}
}

// pcpClient returns pcp's client on a socket opened inside the Client
// namespace (a socket stays in the namespace it was created in), aimed at
// pcpd's IPv6 LAN address. The caller closes c.Conn.
func (l *lab) pcpClient() (*pcp.Client, error) {
	return l.pcpClientFrom(l.topo.ClientV6, l.topo.HostTunnelV6)
}

// pcpClientFrom is pcpClient from the client address from to the server
// address server.
func (l *lab) pcpClientFrom(from, server netip.Addr) (*pcp.Client, error) {
	var conn *net.UDPConn
	err := l.topo.Client.Do(func() (err error) {
		conn, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(from, 0)))
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("interop: client socket: %w", err)
	}
	return &pcp.Client{
		Conn:           conn,
		Server:         netip.AddrPortFrom(server, pcp.Port),
		InitialTimeout: 250 * time.Millisecond,
	}, nil
}

// Data-plane checks. A mapping is "open" when a connection from the
// Internet namespace reaches the service in the Client namespace. pcpd
// replies only once the kernel holds the pinhole, but the first packets on
// a fresh topology may wait for neighbour discovery: Eventually absorbs it.
const (
	openWait   = 5 * time.Second
	closedWait = 700 * time.Millisecond
)

// reachTCP reports whether Internet reaches the greeting service at addr.
func (l *lab) reachTCP(addr netip.AddrPort) error {
	return netlab.Eventually(openWait, func() error {
		return l.topo.Internet.DialTCP(addr.String(), time.Second)
	})
}

// reachUDP reports whether Internet gets the echo from the service at addr.
func (l *lab) reachUDP(addr netip.AddrPort) error {
	return netlab.Eventually(openWait, func() error {
		return l.topo.Internet.ProbeUDP(addr.String(), 500*time.Millisecond)
	})
}

// serve starts the Client's greeting (tcp) or echo (udp) service at addr
// until the test ends.
func (l *lab) serve(t *testing.T, proto string, addr netip.AddrPort) {
	t.Helper()
	if proto == "tcp" {
		l.topo.Client.ServeTCP(t, addr.String())
	} else {
		l.topo.Client.ServeUDPEcho(t, addr.String())
	}
}

// reach is reachTCP or reachUDP by proto.
func (l *lab) reach(proto string, addr netip.AddrPort) error {
	if proto == "tcp" {
		return l.reachTCP(addr)
	}
	return l.reachUDP(addr)
}

// checkPMPMapDelete is RFC 6886 §3.3-3.4 for one NAT-PMP client: a
// service on the Client's IPv4 proto/port is closed to the internet
// before mapIt (which maps port to the same external port for an hour and
// checks the client's view of the reply), open after it (PMP-04, PMP-11),
// and closed again after deleteIt (lifetime 0, PMP-07).
func (l *lab) checkPMPMapDelete(t *testing.T, proto string, port uint16, mapIt, deleteIt func(t *testing.T)) {
	t.Helper()
	l.serve(t, proto, netip.AddrPortFrom(l.topo.ClientV4, port))
	public := netip.AddrPortFrom(l.topo.HostPublicV4, port)
	if err := l.blocked(proto, public); err != nil {
		t.Fatalf("before the mapping: %v", err)
	}
	mapIt(t)
	if err := l.reach(proto, public); err != nil {
		t.Fatalf("PMP-11: internet → %s %s does not reach the client after the mapping: %v", proto, public, err)
	}
	deleteIt(t)
	if err := l.blocked(proto, public); err != nil {
		t.Fatalf("PMP-07: %v", err)
	}
}

// blocked returns nil when proto traffic from Internet to addr does NOT
// reach the service. After a delete one attempt is enough: pcpd replies
// only after the kernel change.
func (l *lab) blocked(proto string, addr netip.AddrPort) error {
	var err error
	switch proto {
	case "tcp":
		err = l.topo.Internet.DialTCP(addr.String(), closedWait)
	case "udp":
		err = l.topo.Internet.ProbeUDP(addr.String(), closedWait)
	default:
		return fmt.Errorf("interop: unknown protocol %q", proto)
	}
	if err == nil {
		return fmt.Errorf("interop: %s %s still reachable from the internet after delete", proto, addr)
	}
	return nil
}
