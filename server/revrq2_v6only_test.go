package server

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
)

// TestServingSocketsOwnFamilyV6Only (review h/revrq2; no defect found;
// root): the readers drop an IPv4-mapped source (review h/revreq) on the
// ground that every serving socket is bound to one address of its own
// family, so real IPv4 never arrives as mapped. Kept true here: for the
// interface's addresses and for explicit --listen rows a wildcard or
// mapped form never binds; every IPv6 socket has IPV6_V6ONLY; a real IPv4
// and a real IPv6 request each reach the engine's queue with their own
// family's source, from the socket of that family (with a dual-stack
// socket the IPv4 one would come mapped and be dropped as bad-source).
// The kernel itself sets IPV6_V6ONLY on a bind to a specific non-mapped
// IPv6 address (a "udp" socket instead of "udp6" still passes): the claim
// rests on the bound address, which the explicit rows check.
func TestServingSocketsOwnFamilyV6Only(t *testing.T) {
	srv, cli := netlab.NewNS(t, "v6os"), netlab.NewNS(t, "v6oc")
	if err := netlab.Veth(cli, "eth0", srv, "pcpv"); err != nil {
		t.Fatal(err)
	}
	srv.MustRun(t, "ip", "addr", "add", "10.77.0.1/24", "dev", "pcpv")
	srv.MustRun(t, "ip", "addr", "add", "2001:db8:77::1/64", "dev", "pcpv", "nodad")
	cli.MustRun(t, "ip", "addr", "add", "10.77.0.2/24", "dev", "eth0")
	cli.MustRun(t, "ip", "addr", "add", "2001:db8:77::2/64", "dev", "eth0", "nodad")
	v4, v6 := netip.MustParseAddr("10.77.0.1"), netip.MustParseAddr("2001:db8:77::1")
	for _, tc := range []struct {
		name     string
		explicit []string
		want     []netip.Addr // served addresses (link-local aside)
	}{
		{"interface addresses", nil, []netip.Addr{v4, v6}},
		{"explicit own addresses", []string{"10.77.0.1:0", "[2001:db8:77::1]:0"}, []netip.Addr{v4, v6}},
		{"explicit wildcards", []string{"0.0.0.0:0", "[::]:0"}, nil},
		{"explicit mapped", []string{"[::ffff:10.77.0.1]:0"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, nh := nsHandles(t, srv)
			out := make(chan packet, 16)
			l := &listener{log: zap.NewNop(), ifaces: []string{"pcpv"}, port: Port, ns: h, out: out}
			for _, e := range tc.explicit {
				l.explicit = append(l.explicit, netip.MustParseAddrPort(e))
			}
			l.resync(nh)
			defer l.closeAll()
			served := map[netip.Addr]bool{}
			for _, c := range l.sockets() {
				a := c.local.Addr()
				if a.IsUnspecified() || a.Is4In6() {
					t.Errorf("socket bound to %v", c.local)
				}
				var fam, v6only int
				var serr error
				if err := c.rc.Control(func(fd uintptr) {
					sa, err := unix.Getsockname(int(fd))
					if serr = err; err != nil {
						return
					}
					switch sa.(type) {
					case *unix.SockaddrInet4:
						fam = unix.AF_INET
					case *unix.SockaddrInet6:
						fam = unix.AF_INET6
						v6only, serr = unix.GetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_V6ONLY)
					}
				}); err != nil || serr != nil {
					t.Fatalf("%v: %v %v", c.local, err, serr)
				}
				if want := map[bool]int{true: unix.AF_INET, false: unix.AF_INET6}[a.Is4()]; fam != want {
					t.Errorf("%v: socket family %d, want %d", c.local, fam, want)
				}
				if fam == unix.AF_INET6 && v6only != 1 {
					t.Errorf("%v: IPV6_V6ONLY %d: IPv4 would arrive IPv4-mapped (and be dropped as bad-source)", c.local, v6only)
				}
				if !a.IsLinkLocalUnicast() {
					served[a] = true
				}
			}
			if len(served) != len(tc.want) {
				t.Fatalf("serving %v, want %v", served, tc.want)
			}
			for _, a := range tc.want {
				if !served[a] {
					t.Fatalf("serving %v, want %v", served, tc.want)
				}
				to := netip.AddrPortFrom(a, Port)
				if err := cli.Do(func() error {
					c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(to))
					if err != nil {
						return err
					}
					defer c.Close()
					_, err = c.Write([]byte{2, 0, 0, 0})
					return err
				}); err != nil {
					t.Fatal(err)
				}
				select {
				case p := <-out:
					if p.src.Addr().Is4() != a.Is4() || p.src.Addr().Is4In6() || p.conn.local != to {
						t.Errorf("a datagram to %v arrived from %v on %v", to, p.src, p.conn.local)
					}
				case <-time.After(5 * time.Second):
					t.Errorf("a datagram to %v never reached the queue", to)
				}
			}
		})
	}
}
