package server

import (
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// Helpers shared by the firewall check's repair-and-arm tests
// (ct_rearm_test.go, ct_left9_test.go).

// checkedLab is a lab whose firewall checks the test runs itself
// (TamperInterval an hour).
func checkedLab(t *testing.T) *lab {
	t.Helper()
	return newLab(t, func(cfg *Config, _ *policy.Config) {
		cfg.TamperInterval = time.Hour // the test runs the checks
		cfg.NoFirewallWatch = true     // and only the test (no firewall watch)
	})
}

// rearmFaultLab is a checkedLab whose server's firewall (its writes and
// its cut) is a rearmFault over the lab's Backend, failing nothing yet.
func rearmFaultLab(t *testing.T) (*lab, *rearmFault) {
	t.Helper()
	l := checkedLab(t)
	f := &rearmFault{Backend: l.fw}
	l.restartWith(func(s *Server) { s.fw = f; s.cutter = f })
	return l, f
}

// twoFlows opens an IPv6 MAP of port and a NAT-PMP mapping of port+1,
// each with a connection from the Internet through it, and returns the
// connections, quiet (waitQuiet: the test's "flush ruleset" comes next),
// and the MAP's pinhole, which the ruleset must cut (fatal if not:
// nothing to test).
func (l *lab) twoFlows(t *testing.T, port uint16) (c6, c4 net.Conn, pin pinhole.Pinhole) {
	t.Helper()
	c6, _, dst6 := l.inbound(t, "map6", port, time.Hour)
	c4, _, _ = l.inbound(t, "pmp", port+1, time.Hour)
	pin = pinhole.Pinhole{Protocol: protoTCP, InternalAddr: dst6.Addr(), InternalPort: dst6.Port()}
	if !l.fw.CutsFlows(pin) {
		t.Fatal("CutsFlows false before the reload: nothing to test")
	}
	l.waitQuiet(t, c6, c4)
	return c6, c4, pin
}

// flowsEcho wants both flows of twoFlows to carry data; when (" after
// the repair", or "") says at which step.
func flowsEcho(t *testing.T, c6, c4 net.Conn, when string) {
	t.Helper()
	if err := echoOnce(c6); err != nil {
		t.Errorf("the IPv6 MAP's flow%s: %v", when, err)
	}
	if err := echoOnce(c4); err != nil {
		t.Errorf("the NAT-PMP mapping's flow%s: %v", when, err)
	}
}

// quietBound bounds waitQuiet's wait: a hang, not a latency bound (a
// delayed ACK leaves within the kernel's 200 ms at most here).
const quietBound = 5 * time.Second

// waitQuiet waits until no segment of the Internet's connections conns
// (through a mapping to an echo service of the client's) is in flight or
// owed: every byte sent is acknowledged at both ends (tcpi_unacked 0 for
// the Internet's socket and for the client's, read with sock_diag in the
// Client namespace). The Internet's ACK of an echo's reply is delayed
// (≈ 40 ms): sent after a test's next "nft flush ruleset" (pcpd stopped,
// or before the repair's Setup), it reached a host with no nat chain at
// all, so nothing applied the NAT-PMP flow's DNAT binding (its conntrack
// entry intact, labelled), the host's own stack got the segment and
// answered with a RST, and the Internet's socket was reset: 12 of 60
// runs of TestE2EReloadRepairArmsCut failed "the NAT-PMP mapping's flow
// after the restart: write: connection reset by peer" (the host's
// TcpOutRsts 0 → 1 between the flush and the start). Not pcpd's: any
// segment of such a flow in that window is reset so, pcpd running or
// not. Quiet flows carry nothing the test did not send.
func (l *lab) waitQuiet(t *testing.T, conns ...net.Conn) {
	t.Helper()
	h, err := l.topo.Client.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	nh, err := netlink.NewHandleAt(h, unix.NETLINK_INET_DIAG) // sock_diag in the Client namespace
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	if err := netlab.Eventually(quietBound, func() error {
		for _, c := range conns {
			n, err := unackedOf(c)
			if err != nil {
				return err
			}
			if n > 0 {
				return fmt.Errorf("%v → %v: %d segments unacknowledged at the Internet's end", c.LocalAddr(), c.RemoteAddr(), n)
			}
			// The client's socket sees the Internet's address and port
			// (the mappings translate the destination only).
			peer := netip.MustParseAddrPort(c.LocalAddr().String())
			fam := uint8(unix.AF_INET6)
			if peer.Addr().Is4() {
				fam = unix.AF_INET
			}
			socks, err := nh.SocketDiagTCPInfo(fam)
			if err != nil {
				return err
			}
			found := false
			for _, s := range socks {
				d, _ := netip.AddrFromSlice(s.InetDiagMsg.ID.Destination)
				if netip.AddrPortFrom(d.Unmap(), s.InetDiagMsg.ID.DestinationPort) != peer || s.TCPInfo == nil {
					continue
				}
				found = true
				if n := s.TCPInfo.Unacked; n > 0 {
					return fmt.Errorf("%v → %v: %d segments unacknowledged at the client's end", c.LocalAddr(), c.RemoteAddr(), n)
				}
			}
			if !found {
				return fmt.Errorf("no socket of the client's with peer %v", peer)
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// unackedOf is tcpi_unacked of c's socket.
func unackedOf(c net.Conn) (uint32, error) {
	sc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		return 0, err
	}
	var info *unix.TCPInfo
	var gerr error
	if err := sc.Control(func(fd uintptr) {
		info, gerr = unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO)
	}); err != nil {
		return 0, err
	}
	if gerr != nil {
		return 0, gerr
	}
	return info.Unacked, nil
}
