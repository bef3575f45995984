package reliability

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// cmsgOf is one control message (level, type) carrying data.
func cmsgOf(level, typ int, data []byte) []byte {
	b := make([]byte, unix.CmsgSpace(len(data)))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level, h.Type = int32(level), int32(typ)
	h.SetLen(unix.CmsgLen(len(data)))
	copy(b[unix.CmsgLen(0):], data)
	return b
}

// pmpMap is a NAT-PMP mapping request (RFC 6886 §3.3) for TCP.
func pmpMap(port uint16, life time.Duration) []byte {
	b := make([]byte, 12)
	b[1] = 2 // TCP
	binary.BigEndian.PutUint16(b[4:], port)
	binary.BigEndian.PutUint16(b[6:], port)
	binary.BigEndian.PutUint32(b[8:], uint32(life/time.Second))
	return b
}

// TestLocalUserOtherSpoofPaths (review h/revh3 of h/hunt3): other ways
// for the unprivileged local user of TestLocalUserCannotSpeakForPeer to
// send to pcpd as the WireGuard peer than an IPv6 socket bound to the
// peer's address: an IPv4-mapped IPv6 socket (IPV6_FREEBIND) to the
// IPv4 serving socket, IPv4 with IP_FREEBIND and with IP_PKTINFO's
// source, IPv6 with SO_BINDTODEVICE to the WireGuard interface (no
// privilege since Linux 5.7) or IPV6_PKTINFO naming it, and attaching
// to the WireGuard device's tun queue. Judged by the kernel's sets and
// pcpd's leases: none may change anything in the peer's name.
func TestLocalUserOtherSpoofPaths(t *testing.T) {
	l := newLab(t, labOptions{wireGuard: true})
	l.start()
	cli, cli4 := l.topo.ClientV6, l.topo.ClientV4
	s6, s4 := l.server6(), l.server4()
	var wg int
	if err := l.topo.Host.Do(func() error {
		ifc, err := net.InterfaceByName(l.topo.HostLANIf)
		if err == nil {
			wg = ifc.Index
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	mapped := netip.AddrFrom16(cli4.As16())
	dst4 := &unix.SockaddrInet4{Port: int(s4.Port()), Addr: s4.Addr().As4()}
	dst6 := &unix.SockaddrInet6{Port: int(s6.Port()), Addr: s6.Addr().As16()}

	cases := []struct {
		name string
		send func() error
	}{
		{"v4-mapped IPv6 socket, IPV6_FREEBIND, to the IPv4 serving address", func() error {
			fd, err := spoofSocket(unix.AF_INET6, mapped, "")
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			to := &unix.SockaddrInet6{Port: int(s4.Port()), Addr: netip.AddrFrom16(s4.Addr().As16()).As16()}
			return firstErr(unix.Sendto(fd, mapNonce(cli4, 9320, time.Hour, 20, netip.Addr{}), 0, to),
				unix.Sendto(fd, pmpMap(9321, time.Hour), 0, to))
		}},
		{"IPv4, IP_FREEBIND", func() error {
			fd, err := spoofSocket(unix.AF_INET, cli4, "")
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			return firstErr(unix.Sendto(fd, mapNonce(cli4, 9322, time.Hour, 21, netip.Addr{}), 0, dst4),
				unix.Sendto(fd, pmpMap(9323, time.Hour), 0, dst4))
		}},
		{"IPv4, IP_PKTINFO source", func() error {
			fd, err := spoofSocket(unix.AF_INET, netip.Addr{}, "")
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			pi := unix.Inet4Pktinfo{Ifindex: int32(wg), Spec_dst: cli4.As4()}
			oob := cmsgOf(unix.IPPROTO_IP, unix.IP_PKTINFO, unsafe.Slice((*byte)(unsafe.Pointer(&pi)), unsafe.Sizeof(pi)))
			return firstErr(unix.Sendmsg(fd, mapNonce(cli4, 9324, time.Hour, 22, netip.Addr{}), oob, dst4, 0),
				unix.Sendmsg(fd, pmpMap(9325, time.Hour), oob, dst4, 0))
		}},
		{"IPv6, SO_BINDTODEVICE the WireGuard interface, IPV6_FREEBIND", func() error {
			fd, err := spoofSocket(unix.AF_INET6, cli, l.topo.HostLANIf)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			return unix.Sendto(fd, mapNonce(cli, 9326, time.Hour, 23, netip.Addr{}), 0, dst6)
		}},
		{"IPv6, IPV6_PKTINFO source and WireGuard interface", func() error {
			fd, err := spoofSocket(unix.AF_INET6, netip.Addr{}, "")
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			pi := unix.Inet6Pktinfo{Addr: cli.As16(), Ifindex: uint32(wg)}
			oob := cmsgOf(unix.IPPROTO_IPV6, unix.IPV6_PKTINFO, unsafe.Slice((*byte)(unsafe.Pointer(&pi)), unsafe.Sizeof(pi)))
			return unix.Sendmsg(fd, mapNonce(cli, 9327, time.Hour, 24, netip.Addr{}), oob, dst6, 0)
		}},
		{"attach to the WireGuard device's tun", func() error {
			fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
			if err != nil {
				return fmt.Errorf("open: %w", err)
			}
			defer unix.Close(fd)
			for _, flags := range []uint16{unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_VNET_HDR, unix.IFF_TUN | unix.IFF_NO_PI, unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_VNET_HDR | unix.IFF_MULTI_QUEUE} {
				ifr, err := unix.NewIfreq(l.topo.HostLANIf)
				if err != nil {
					return err
				}
				ifr.SetUint16(flags)
				if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err == nil {
					t.Errorf("user nobody attached to the WireGuard device %s (flags %#x)", l.topo.HostLANIf, flags)
				} else {
					t.Logf("TUNSETIFF %s flags %#x: %v", l.topo.HostLANIf, flags, err)
				}
			}
			return nil
		}},
	}
	before := kernelSet(l.kernel())
	for _, tc := range cases {
		err := asUserIn(l.topo.Host, nobody, tc.send)
		t.Logf("%s: %v", tc.name, err)
	}
	time.Sleep(time.Second)
	if appeared, vanished := kernelDiff(before, kernelSet(l.kernel())); len(appeared)+len(vanished) > 0 {
		t.Errorf("user nobody changed the kernel in the peer's name: appeared %v, vanished %v", appeared, vanished)
	}
	for _, ls := range l.leases() {
		if p := ls.InternalPort; p >= 9320 && p < 9330 {
			t.Errorf("lease made by user nobody: %+v", ls)
		}
	}
}

func firstErr(errs ...error) error {
	for _, e := range errs {
		if e != nil {
			return e
		}
	}
	return nil
}

// spoofSocket is a UDP socket of family fam with IP_FREEBIND or
// IPV6_FREEBIND (no privilege needed), bound to src if valid and to the
// device dev if not "" (no privilege needed since Linux 5.7).
func spoofSocket(fam int, src netip.Addr, dev string) (int, error) {
	fd, err := unix.Socket(fam, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	if dev != "" {
		if err := unix.SetsockoptString(fd, unix.SOL_SOCKET, unix.SO_BINDTODEVICE, dev); err != nil {
			unix.Close(fd)
			return -1, fmt.Errorf("SO_BINDTODEVICE %s: %w", dev, err)
		}
	}
	if fam == unix.AF_INET {
		unix.SetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_FREEBIND, 1)
	} else {
		unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_FREEBIND, 1)
	}
	if !src.IsValid() {
		return fd, nil
	}
	var sa unix.Sockaddr = &unix.SockaddrInet6{Addr: src.As16()}
	if fam == unix.AF_INET {
		sa = &unix.SockaddrInet4{Addr: src.As4()}
	}
	if err := unix.Bind(fd, sa); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("bind %s: %w", src, err)
	}
	return fd, nil
}
