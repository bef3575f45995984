package server

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestE2ESpoofedHostSource (root, namespaces): a mapping opens a client's
// port to the Internet, not to datagrams from the WAN that claim one of
// the host's own addresses, its gateway's, which the client may trust
// (h/peerend's probe: one from the WAN with the host's tunnel address
// 2001:db8:1::1 passed an IPv6 MAP's pinhole). For each kind of mapping a
// datagram from the Internet's own address arrives, and one from the same
// namespace, the same port, claiming the host's tunnel address neither
// arrives nor leaves a conntrack entry; through a NAT-PMP mapping (IPv4,
// DNAT-ed) likewise with the host's tunnel address 10.100.0.1, where the
// kernel drops it itself as martian by default (accept_local=0), and
// with accept_local=1, where the guard does. The all-ports MAP is TCP's (pcpd
// grants no UDP one, MAP-05): a connection from the Internet's address
// carries data, and the spoofed SYN must not reach the client (a counter
// in the client's namespace). The PEER's remotes are both
// sources, so that the PEER's own filter lets each through.
//
// Fails without the guard's local-source rule (pinhole/rules.go): the
// spoofed datagram arrives through the IPv6 MAP, PEER and all-ports MAP,
// and through the NAT-PMP mapping with accept_local=1, and its conntrack
// entry is there.
func TestE2ESpoofedHostSource(t *testing.T) {
	for i, c := range []struct {
		name string
		kind string // "map6", "peer6", "all6", "pmp4", "pmp4 accept_local"
	}{
		{"PCP MAP IPv6", "map6"},
		{"PCP PEER IPv6", "peer6"},
		{"PCP TCP all-ports MAP IPv6", "all6"},
		{"NAT-PMP IPv4 DNAT", "pmp4"},
		{"NAT-PMP IPv4 DNAT, accept_local", "pmp4 accept_local"},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := newLab(t, func(_ *Config, p *policy.Config) { p.AllowAllPorts = true })
			port := uint16(9700 + i)
			rport := port + 40000
			client, real, own := l.topo.ClientV6, l.topo.InternetV6, l.topo.HostTunnelV6
			if strings.HasPrefix(c.kind, "pmp4") {
				client, real, own = l.topo.ClientV4, l.topo.InternetV4, l.topo.HostTunnelV4
			}
			dst := netip.AddrPortFrom(client, port)
			switch c.kind {
			case "map6":
				if r := l.pcp(mapReq(client, pcp.ProtoUDP, port, port, time.Hour, 1)); r.Result != pcp.Success {
					t.Fatalf("MAP: %+v", r)
				}
			case "all6":
				if r := l.pcp(mapReq(client, pcp.ProtoTCP, 0, 0, time.Hour, 1)); r.Result != pcp.Success {
					t.Fatalf("all-ports MAP: %+v", r)
				}
				l.topo.Internet.MustRun(t, "ip", "addr", "add", netip.PrefixFrom(own, own.BitLen()).String(), "dev", "eth0", "nodad")
				serveEcho(t, l.topo.Client, dst)
				if err := echoOnce(dialIn(t, l.topo.Internet, netip.AddrPortFrom(real, rport), dst)); err != nil {
					t.Fatalf("from the Internet's %v through the all-ports MAP: %v", real, err)
				}
				// The spoofed SYN: the client's SYN-ACK goes to the host,
				// so the dial cannot succeed; what counts is whether the
				// SYN reached the client.
				l.topo.Client.MustRun(t, "nft", "-f", "-", fmt.Sprintf("table inet spoofsrc { chain in { type filter hook input priority 0; ip6 saddr %v tcp dport %d counter; }; }", own, port))
				l.topo.Internet.Do(func() error {
					d := net.Dialer{Timeout: time.Second, LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(own, rport))}
					if c, err := d.Dial("tcp", dst.String()); err == nil {
						c.Close()
					}
					return nil
				})
				if out := l.topo.Client.MustRun(t, "nft", "list", "table", "inet", "spoofsrc"); !strings.Contains(out, "counter packets 0 ") {
					t.Errorf("a SYN from the WAN claiming the host's own %v reached the client through the all-ports MAP:\n%s", own, out)
				}
				if f := l.ctFlow(t, netip.AddrPortFrom(own, rport), dst); f != nil {
					t.Errorf("the spoofed SYN's flow is tracked: %s", f)
				}
				return
			case "peer6":
				for n, rem := range []netip.Addr{real, own} {
					if r := l.pcp(peerReq(client, pcp.ProtoUDP, port, netip.AddrPortFrom(rem, rport), time.Hour, byte(n+1))); r.Result != pcp.Success {
						t.Fatalf("PEER to %v: %+v", rem, r)
					}
				}
			case "pmp4", "pmp4 accept_local":
				b := pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: pcp.PMPOpMapUDP, InternalPort: port, SuggestedExternalPort: port + 10000, Lifetime: time.Hour})
				out, err := l.exchange(netip.AddrPort{}, l.server4(), b)
				var r pcp.PMPResponse
				if err != nil || pcp.ParsePMPResponse(out, &r) != nil || r.Result != 0 {
					t.Fatalf("NAT-PMP map: %+v %v", r, err)
				}
				dst = netip.AddrPortFrom(l.topo.HostPublicV4, r.ExternalPort)
				if c.kind == "pmp4 accept_local" {
					l.topo.Host.MustRun(t, "sh", "-c", "for f in /proc/sys/net/ipv4/conf/*/accept_local; do echo 1 > $f; done")
				}
			}
			var rx *net.UDPConn
			if err := l.topo.Client.Do(func() (err error) {
				rx, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(client, port)))
				return err
			}); err != nil {
				t.Fatal(err)
			}
			defer rx.Close()
			l.topo.Internet.MustRun(t, "ip", "addr", "add", netip.PrefixFrom(own, own.BitLen()).String(), "dev", "eth0", "nodad")

			from := func(src netip.Addr) netip.Addr {
				t.Helper()
				got, err := l.topo.Internet.SendUDPFromPort(netip.AddrPortFrom(src, rport), dst, rx, 300*time.Millisecond)
				if err != nil {
					t.Fatal(err)
				}
				return got
			}
			if err := netlab.Eventually(5*time.Second, func() error {
				if got := from(real); got != real {
					return fmt.Errorf("arrived from %v", got)
				}
				return nil
			}); err != nil {
				t.Fatalf("a datagram from the Internet's %v through %v: %v", real, dst, err)
			}
			if got := from(own); got.IsValid() {
				t.Errorf("a datagram from the WAN claiming the host's own %v reached the client through %v, seen from %v", own, dst, got)
			}
			if f := l.ctFlowOf(t, protoUDP, netip.AddrPortFrom(own, rport), dst); f != nil {
				t.Errorf("the spoofed datagram's flow is tracked: %s", f)
			}
		})
	}
}
