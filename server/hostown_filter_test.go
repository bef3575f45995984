package server

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
)

// TestHostOwnFilterDeliveryPaths (review h/revh3 of h/hunt3): the
// serving sockets' filter (hostOwnFilter) against the ways a local
// unprivileged user's datagram reaches a socket bound to a served
// interface, judged by what the socket receives: from another address
// through loopback, bound to the served interface or not (dropped), from
// the served address itself (taken), IPv4 too (the filter's other
// offsets); on sockets serving loopback itself, only the served
// address's own (h/local9). A VRF, whose loop back goes through the VRF device and not
// loopback, is not tried: this kernel has no VRF.
func TestHostOwnFilterDeliveryPaths(t *testing.T) {
	ns := netlab.NewNS(t, "hof")
	for _, args := range [][]string{
		{"ip", "link", "add", "d0", "type", "veth", "peer", "name", "d0p"},
		{"ip", "link", "set", "d0", "up"},
		{"ip", "link", "set", "d0p", "up"},
		{"ip", "addr", "add", "2001:db8:5::1/64", "dev", "d0", "nodad"},
		{"ip", "addr", "add", "2001:db8:5::2/64", "dev", "d0", "nodad"},
		{"ip", "addr", "add", "10.5.0.1/24", "dev", "d0"},
		{"ip", "addr", "add", "10.5.0.2/24", "dev", "d0"},
	} {
		ns.MustRun(t, args...)
	}
	l := &listener{log: zaptest.NewLogger(t)}
	open := func(ifc string, ap netip.AddrPort) int {
		var fd int
		if err := ns.Do(func() error {
			idx, err := indexOf(ifc)
			if err != nil {
				return err
			}
			pc, err := l.open(ifc, idx, ap)
			if err != nil {
				return err
			}
			t.Cleanup(func() { pc.Close() })
			rc, _ := pc.SyscallConn()
			return rc.Control(func(f uintptr) { fd, err = unix.Dup(int(f)) })
		}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fd) })
		return fd
	}
	s0 := open("d0", netip.MustParseAddrPort("[2001:db8:5::1]:5351"))
	s4 := open("d0", netip.MustParseAddrPort("10.5.0.1:5351"))
	// Sockets serving loopback itself (--interface lo): every datagram
	// came through it (h/local9: before, they had no filter).
	sl6 := open("lo", netip.MustParseAddrPort("[::1]:5351"))
	sl4 := open("lo", netip.MustParseAddrPort("127.0.0.1:5351"))
	got := func(fd int) bool {
		buf := make([]byte, 64)
		n, _, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT)
		return err == nil && n > 0
	}
	send := func(src, dst netip.Addr, dev string) error {
		return ns.Do(func() error {
			if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, ^uintptr(0), 65534, ^uintptr(0)); e != 0 {
				return e
			}
			defer unix.RawSyscall(unix.SYS_SETRESUID, ^uintptr(0), 0, ^uintptr(0))
			fam := unix.AF_INET6
			if src.Is4() {
				fam = unix.AF_INET
			}
			fd, err := unix.Socket(fam, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			if dev != "" {
				if err := unix.SetsockoptString(fd, unix.SOL_SOCKET, unix.SO_BINDTODEVICE, dev); err != nil {
					return fmt.Errorf("SO_BINDTODEVICE %s: %w", dev, err)
				}
			}
			if src.Is4() {
				unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_FREEBIND, 1)
				if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: src.As4()}); err != nil {
					return err
				}
				return unix.Sendto(fd, []byte("x"), 0, &unix.SockaddrInet4{Port: 5351, Addr: dst.As4()})
			}
			unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_FREEBIND, 1)
			if err := unix.Bind(fd, &unix.SockaddrInet6{Addr: src.As16()}); err != nil {
				return err
			}
			return unix.Sendto(fd, []byte("x"), 0, &unix.SockaddrInet6{Port: 5351, Addr: dst.As16()})
		})
	}
	for _, tc := range []struct {
		name     string
		src, dst string
		dev      string
		fd       int
		want     bool
	}{
		{"spoofed, through loopback", "2001:db8:5::10", "2001:db8:5::1", "", s0, false},
		{"spoofed, bound to the served interface", "2001:db8:5::10", "2001:db8:5::1", "d0", s0, false},
		{"the host's own", "2001:db8:5::1", "2001:db8:5::1", "", s0, true},
		{"another host address, through loopback", "2001:db8:5::2", "2001:db8:5::1", "", s0, false},
		{"the host's own IPv4", "10.5.0.1", "10.5.0.1", "", s4, true},
		{"another host IPv4 address, through loopback", "10.5.0.2", "10.5.0.1", "", s4, false},
		{"spoofed IPv4 (IP_FREEBIND)", "10.5.0.10", "10.5.0.1", "", s4, false},
		{"loopback socket: spoofed IPv6", "2001:db8:5::10", "::1", "", sl6, false},
		{"loopback socket: the host's own IPv6", "::1", "::1", "", sl6, true},
		{"loopback socket: another 127/8 address (no privilege needed)", "127.0.0.2", "127.0.0.1", "", sl4, false},
		{"loopback socket: the host's own IPv4", "127.0.0.1", "127.0.0.1", "", sl4, true},
	} {
		err := send(netip.MustParseAddr(tc.src), netip.MustParseAddr(tc.dst), tc.dev)
		time.Sleep(50 * time.Millisecond)
		g := got(tc.fd)
		t.Logf("%s: send %v, received %v", tc.name, err, g)
		if err == nil && g != tc.want {
			t.Errorf("%s: from %s to %s (device %q): received %v, want %v", tc.name, tc.src, tc.dst, tc.dev, g, tc.want)
		}
	}
}

func indexOf(ifc string) (int, error) {
	i, err := net.InterfaceByName(ifc)
	if err != nil {
		return 0, err
	}
	return i.Index, nil
}
