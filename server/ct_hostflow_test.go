package server

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	mdnl "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestE2EMapEndKeepsHostFlows (root, namespaces): the host's own
// connections to a client's address (the host → the client, the client
// replies) pass no pinhole, yet the end of a mapping of that address
// flushed them with the flows the mapping admitted (h/revall "Left"): an
// IPv6 all-ports MAP's every flow to the address, a port MAP's to its
// port. Since h/spoofsrc the guard drops a forwarded packet whose source
// is one of the host's addresses, so such a flow can only be the host's:
// it is spared (Server.hostAddrs), from the host's tunnel address and
// from its WAN address (an interface pcpd does not serve) alike, while
// the Internet's connection through the mapping ends. By both walks: the
// kernel-filtered one and the generic one (a dump refused with EINVAL,
// as a kernel without CTA_FILTER does).
//
// Fails without the sparing: "the host's flow from ... was flushed" on
// every row (ctDeleter.host / keepHost removed).
func TestE2EMapEndKeepsHostFlows(t *testing.T) {
	for i, c := range []struct {
		name    string
		proto   uint8 // protoTCP or protoUDP
		all     bool  // an all-ports MAP (TCP: pcpd grants no UDP one)
		generic bool  // the walk without CTA_FILTER
	}{
		{"all-ports TCP MAP", protoTCP, true, false},
		{"TCP MAP", protoTCP, false, false},
		{"UDP MAP", protoUDP, false, false},
		{"all-ports TCP MAP, generic walk", protoTCP, true, true},
		{"TCP MAP, generic walk", protoTCP, false, true},
		{"UDP MAP, generic walk", protoUDP, false, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := newLab(t, func(_ *Config, p *policy.Config) { p.AllowAllPorts = true })
			if c.generic {
				l.stop()
				l.tweak = func(s *Server) {
					s.ctDumpFault = func([]mdnl.Message, error) ([]mdnl.Message, error) {
						return nil, &mdnl.OpError{Op: "receive", Err: unix.EINVAL}
					}
				}
				l.start()
			}
			port := uint16(9900 + i)
			client := netip.AddrPortFrom(l.topo.ClientV6, port)
			proto, mport := pcp.ProtoTCP, port
			if c.proto == protoUDP {
				proto = pcp.ProtoUDP
				l.topo.Client.ServeUDPEcho(t, client.String())
			} else {
				serveEcho(t, l.topo.Client, client)
			}
			if c.all {
				mport = 0
			}
			resp := l.pcp(mapReq(l.topo.ClientV6, proto, mport, mport, time.Hour, 1))
			if resp.Result != pcp.Success || resp.Map.ExternalPort != mport {
				t.Fatalf("MAP of %d: %+v", mport, resp)
			}
			type flow struct {
				name     string
				conn     net.Conn
				src, dst netip.AddrPort
			}
			var host []flow
			for _, a := range []netip.Addr{l.topo.HostTunnelV6, l.topo.HostWANV6} {
				conn := dialProto(t, c.proto, l.topo.Host, netip.AddrPortFrom(a, 0), client)
				if err := echoOnce(conn); err != nil {
					t.Fatalf("host %v → client: %v", a, err)
				}
				src := netip.MustParseAddrPort(conn.LocalAddr().String())
				host = append(host, flow{"the host's flow from " + a.String(), conn, src, client})
			}
			wsrc := netip.AddrPortFrom(l.topo.InternetV6, port+40000)
			wan := dialProto(t, c.proto, l.topo.Internet, wsrc, client)
			if err := echoOnce(wan); err != nil {
				t.Fatalf("through the MAP: %v", err)
			}
			for _, f := range append(host, flow{"the Internet's flow", wan, wsrc, client}) {
				if l.ctFlowOf(t, c.proto, f.src, f.dst) == nil {
					t.Fatalf("%s: no conntrack entry %v → %v", f.name, f.src, f.dst)
				}
			}
			if resp := l.pcp(mapReq(l.topo.ClientV6, proto, mport, mport, 0, 1)); resp.Result != pcp.Success {
				t.Fatalf("MAP delete: %+v", resp)
			}
			// The ruleset cut the IPv6 MAP's flows: the reply did not
			// wait for the walk (mustWaitFlush). Wait for it here.
			l.srv.waitConntrack()
			if f := l.ctFlowOf(t, c.proto, wsrc, client); f != nil {
				t.Errorf("the Internet's flow through the ended MAP is still tracked: %s", f)
			}
			if err := echoOnce(wan); err == nil {
				t.Error("the Internet's flow through the ended MAP still carries data")
			}
			for _, f := range host {
				// Before any packet of it: a TCP flow flushed is
				// picked up again (nf_conntrack_tcp_loose), and the
				// host's output passes no guard.
				if l.ctFlowOf(t, c.proto, f.src, f.dst) == nil {
					t.Errorf("%s was flushed with the MAP's", f.name)
				}
				if err := echoOnce(f.conn); err != nil {
					t.Errorf("%s ended: %v", f.name, err)
				}
			}
		})
	}
}

// dialProto connects (TCP) or connects a socket (UDP) from ns, from
// local (port 0: any), to dst.
func dialProto(t *testing.T, proto uint8, ns *netlab.NS, local, dst netip.AddrPort) net.Conn {
	t.Helper()
	if proto == protoTCP {
		return dialIn(t, ns, local, dst)
	}
	var c net.Conn
	if err := ns.Do(func() (err error) {
		c, err = net.DialUDP("udp", net.UDPAddrFromAddrPort(local), net.UDPAddrFromAddrPort(dst))
		return err
	}); err != nil {
		t.Fatalf("dial udp %v from %v: %v", dst, local, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestHostAddrs (root, a namespace): the host's addresses the walk
// spares the flows of are those the guard's "fib saddr type local" calls
// local: an address of an interface, IPv4 and IPv6 (loopback included)
// that the kernel's route lookup finds local; not one whose local route
// is gone (deleted from the local table: a spoof of it passes the
// guard), nor a tentative IPv6 one (DAD running: the host cannot send
// from it, and its lookup is not local), nor an address the host does
// not hold. Without the route lookup, the address without its local
// route was in the set.
func TestHostAddrs(t *testing.T) {
	ns := netlab.NewNS(t, "hostflw")
	h, _ := nsHandles(t, ns)
	ns.MustRun(t, "ip", "link", "set", "lo", "up")
	ns.MustRun(t, "ip", "link", "add", "hfup", "type", "veth", "peer", "name", "hfpeer")
	ns.MustRun(t, "ip", "link", "set", "hfpeer", "up")
	ns.MustRun(t, "ip", "link", "set", "hfup", "up")
	ns.MustRun(t, "ip", "addr", "add", "192.0.2.1/24", "dev", "hfup")
	ns.MustRun(t, "ip", "addr", "add", "2001:db8:77::1/64", "dev", "hfup", "nodad")
	ns.MustRun(t, "ip", "addr", "add", "198.51.100.9/24", "dev", "hfup")
	ns.MustRun(t, "ip", "route", "del", "local", "198.51.100.9", "table", "local")
	// Tentative for a long while (50 probes, 1 s apart).
	ns.MustRun(t, "sysctl", "-qw", "net.ipv6.conf.hfup.accept_dad=1", "net.ipv6.conf.hfup.dad_transmits=50")
	ns.MustRun(t, "ip", "addr", "add", "2001:db8:78::1/64", "dev", "hfup")
	s := &Server{cfg: Config{NetNS: h}, log: zap.NewNop()}
	got := s.hostAddrs()
	for _, c := range []struct {
		addr string
		want bool
	}{
		{"192.0.2.1", true},
		{"2001:db8:77::1", true},
		{"127.0.0.1", true},
		{"::1", true},
		{"198.51.100.9", false},   // its local route deleted
		{"2001:db8:78::1", false}, // tentative
		{"192.0.2.2", false},
		{"2001:db8:77::2", false},
	} {
		if has := got.has(netip.MustParseAddr(c.addr)); has != c.want {
			t.Errorf("%s: host's %v, want %v (set %v)", c.addr, has, c.want, got)
		}
	}
}

// TestRouteHandleRouteOnly (root, a namespace, and the caller's): the
// handle hostAddrs reads the addresses and local routes with, once every
// conntrack walk, holds a route socket and no NETLINK_NETFILTER one,
// whose close waits for the namespace's nftables commit lock and an RCU
// grace period (11.8 ms of a 37.4 ms walk, BENCHMARKS.md item 41).
// netlink.NewHandle(At) without families, as before, opens both: this
// fails then.
func TestRouteHandleRouteOnly(t *testing.T) {
	ns := netlab.NewNS(t, "rthandle")
	nsh, _ := nsHandles(t, ns)
	for _, c := range []struct {
		name string
		ns   netns.NsHandle
	}{
		{"namespace", nsh},
		{"caller's", netns.None()},
	} {
		t.Run(c.name, func(t *testing.T) {
			h, err := routeHandle(c.ns)
			if err != nil {
				t.Fatal(err)
			}
			defer h.Close()
			if !h.SupportsNetlinkFamily(unix.NETLINK_ROUTE) {
				t.Error("no route socket")
			}
			if h.SupportsNetlinkFamily(unix.NETLINK_NETFILTER) {
				t.Error("a NETLINK_NETFILTER socket too: its close waits for nftables' commit lock")
			}
			if _, err := h.AddrList(nil, netlink.FAMILY_ALL); err != nil {
				t.Errorf("address dump: %v", err)
			}
		})
	}
}

// BenchmarkHostAddrs: Server.hostAddrs, as every conntrack walk calls it,
// on a host with 8 and with 4 000 IPv6 addresses (besides loopback's)
// (review h/revspoof2: a route lookup per address took 4.4-7 s a walk
// with 4 000 here, and the replies of a batch that ended mappings wait
// for the walk).
func BenchmarkHostAddrs(b *testing.B) {
	for _, n := range []int{8, 4000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) { benchHostAddrs(b, n) })
	}
}

func benchHostAddrs(b *testing.B, n int) {
	netlab.RequireRoot(b)
	ns, err := netlab.New("hfbench")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ns.Close() })
	ns.MustRun(b, "ip", "link", "set", "lo", "up")
	ns.MustRun(b, "ip", "link", "add", "hfb0", "type", "veth", "peer", "name", "hfb1")
	ns.MustRun(b, "ip", "link", "set", "hfb0", "up")
	var batch strings.Builder
	for i := range n {
		fmt.Fprintf(&batch, "addr add 2001:db8:aa::%x/128 dev hfb0 nodad\n", i+1)
	}
	f := b.TempDir() + "/batch"
	if err := os.WriteFile(f, []byte(batch.String()), 0o644); err != nil {
		b.Fatal(err)
	}
	ns.MustRun(b, "ip", "-batch", f)
	h, err := ns.Handle()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { h.Close() })
	s := &Server{cfg: Config{NetNS: h}, log: zap.NewNop()}
	// The kernel adds an address's local route a moment after it.
	if err := netlab.Eventually(10*time.Second, func() error {
		if got := len(s.hostAddrs()); got < n {
			return fmt.Errorf("%d host addresses, want %d at least", got, n)
		}
		return nil
	}); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for range b.N {
		s.hostAddrs()
	}
}
