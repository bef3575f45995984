package server

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// TestLoopbackServesOnlyHost (issue 9, review h/revh3, LOW): pcpd serving
// loopback (--interface lo) with static ownership (client a:
// 2001:db8:a::/48, bound to no interface) takes only the host's own
// requests there. User nobody in the namespace binds client a's address
// (IPV6_FREEBIND, no privilege) and sends a MAP over loopback to the
// served address: judged by the kernel, no pinhole of a's address
// appears, and no reply comes. Before, the loopback socket had no filter
// (hostOwnFilter): the MAP was granted and its pinhole installed. The
// host's own ANNOUNCE (from the served address) is still answered.
func TestLoopbackServesOnlyHost(t *testing.T) {
	netlab.RequireRoot(t)
	ns, h, own := loopbackNS(t, "lohost")
	conn, err := ns.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	fw, err := pinhole.New(conn, pinhole.Config{})
	if err != nil {
		t.Fatal(err)
	}
	pol, err := policy.New(policy.Config{}, own)
	if err != nil {
		t.Fatal(err)
	}
	sv := startServingOn(t, Config{Interfaces: []string{"lo"}, Listen: []netip.AddrPort{netip.AddrPortFrom(loopbackSrv, 0)}, NetNS: h, KeepConnections: true},
		fw, pol, zaptest.NewLogger(t))
	t.Cleanup(func() { sv.stop() })
	if err := sv.listening(); err != nil {
		t.Fatal(err)
	}
	s := sv.s

	// exchange sends b from src as user nobody, 3 times, and returns the
	// first reply within a second of a send (nil: none).
	exchange := func(src netip.Addr, b []byte) (reply []byte, err error) {
		err = ns.Do(func() error {
			if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, ^uintptr(0), 65534, ^uintptr(0)); e != 0 {
				return e
			}
			defer unix.RawSyscall(unix.SYS_SETRESUID, ^uintptr(0), 0, ^uintptr(0))
			fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				return err
			}
			defer unix.Close(fd)
			if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_FREEBIND, 1); err != nil {
				return err
			}
			if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 1}); err != nil {
				return err
			}
			if err := unix.Bind(fd, &unix.SockaddrInet6{Addr: src.As16()}); err != nil {
				return err
			}
			buf := make([]byte, 1100)
			for range 3 {
				if err := unix.Sendto(fd, b, 0, &unix.SockaddrInet6{Port: Port, Addr: loopbackSrv.As16()}); err != nil {
					return err
				}
				n, _, err := unix.Recvfrom(fd, buf, 0)
				if err == nil {
					reply = buf[:n]
					return nil
				}
				if !errors.Is(err, unix.EAGAIN) {
					return err
				}
			}
			return nil
		})
		return reply, err
	}

	req := mapReq(addrA, pcp.ProtoTCP, 9400, 9400, time.Hour, 1)
	reply, err := exchange(addrA, pcp.AppendRequest(nil, req))
	if err != nil {
		t.Fatal(err)
	}
	var got []pinhole.Entry
	if got, err = fw.List(); err != nil {
		t.Fatal(err)
	}
	for _, e := range got {
		if e.Pinhole.InternalAddr == addrA {
			t.Errorf("user nobody, from client a's %v over loopback: pinhole %v in the kernel (reply % x); want none: loopback serves only the host", addrA, e.Pinhole, reply)
		}
	}
	if reply != nil {
		t.Errorf("user nobody, from client a's %v over loopback: reply % x, want none (dropped by the socket's filter)", addrA, reply)
	}
	if n := s.Status().Leases; n != 0 {
		t.Errorf("%d leases, want none", n)
	}

	// The host's own request: from the served address itself.
	reply, err = exchange(loopbackSrv, pcp.AppendRequest(nil, pcp.NewAnnounce(loopbackSrv)))
	if err != nil {
		t.Fatal(err)
	}
	var resp pcp.Response
	if err := pcp.ParseResponse(reply, &resp); err != nil || resp.Result != pcp.Success {
		t.Errorf("the host's own ANNOUNCE from %v: reply % x (%v), want SUCCESS", loopbackSrv, reply, err)
	}
}
