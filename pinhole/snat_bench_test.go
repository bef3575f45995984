package pinhole_test

import (
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// BenchmarkSNATNewFlow: what postrouting's first rule, "oifname
// @serving_ifs return" (TestNAPT4SNATOnlyTowardsWAN), costs a new flow.
// The nat chains see a flow's first packet only, so every datagram here
// is a new flow: from the mapped internal endpoint 10.100.0.2:5000 (an
// unfiltered NAPT mapping) to a destination address and port not used
// before in the run (the host's UDP conntrack timeout is 1 s, so the
// table stays small). "to the WAN": out wan0, translated (the rule's
// lookup misses, then the SNAT map's hits); "to a served LAN": out lan1,
// which is served (the rule returns; without it, translated as to the
// WAN). Each with the layout as Setup writes it and with the rule deleted
// by nft (the layout before it). The receiving namespace drops every
// datagram before its conntrack (counted: the expected source must be
// seen). cpu-ns/datagram is the process's user + system CPU a datagram
// (as BenchmarkGuardNewFlow: the sender's softirq forwards it through
// the host). Each op is a burst of 32 datagrams.
func BenchmarkSNATNewFlow(b *testing.B) {
	for _, tc := range []struct {
		name string
		lan  bool
		rule bool
	}{
		{"to the WAN", false, true},
		{"to the WAN, no rule", false, false},
		{"to a served LAN", true, true},
		{"to a served LAN, no rule", true, false},
	} {
		b.Run(tc.name, func(b *testing.B) {
			topo := netlab.NewTopology(b, netlab.TopologyOptions{})
			be := newBackend(b, topo.Host, pinhole.Config{})
			peer := netlab.NewNS(b, "edgesb")
			if err := netlab.Veth(topo.Host, "lan1", peer, "eth0"); err != nil {
				b.Fatal(err)
			}
			topo.Host.MustRun(b, "ip", "addr", "add", "10.100.1.1/24", "dev", "lan1")
			peer.MustRun(b, "ip", "addr", "add", "10.100.1.2/24", "dev", "eth0")
			topo.Host.MustRun(b, "ip", "route", "add", "203.0.113.0/24", "via", topo.InternetV4.String())
			topo.Host.MustRun(b, "ip", "route", "add", "10.101.0.0/16", "via", "10.100.1.2")
			topo.Host.MustRun(b, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=1")
			if err := be.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
				b.Fatal(err)
			}
			setServed(b, be, []string{topo.HostLANIf, "lan1"}, topo.HostTunnelV4)
			in := netip.AddrPortFrom(topo.ClientV4, 5000)
			pub := netip.AddrPortFrom(topo.HostPublicV4, 15000)
			apply(b, be, install(pinhole.Pinhole{Protocol: udp, InternalAddr: in.Addr(), InternalPort: in.Port(),
				ExternalAddr: pub.Addr(), ExternalPort: pub.Port()}, time.Hour))
			if !tc.rule {
				deleteRule(b, topo.Host, "pcpd", "postrouting", `oifname @serving_ifs .*return `)
			}
			sink, net3, seen := topo.Internet, "203.0.113", pub
			if tc.lan {
				sink, net3, seen = peer, "10.101.0", in
				if !tc.rule {
					seen = pub
				}
			}
			loadNft(b, sink, fmt.Sprintf(`table inet sink {
	chain pre {
		type filter hook prerouting priority raw - 10; policy accept;
		ip saddr %s udp sport %d counter drop
		udp sport %d counter drop
	}
}
`, seen.Addr(), seen.Port(), in.Port()))
			var tx *net.UDPConn
			if err := topo.Client.Do(func() (err error) {
				tx, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(in))
				return err
			}); err != nil {
				b.Fatal(err)
			}
			defer tx.Close()
			tx.SetWriteBuffer(1 << 20)
			const burst = 32
			msg := make([]byte, 60)
			var dsts [250]netip.Addr
			for k := range dsts {
				dsts[k] = netip.MustParseAddr(net3 + "." + strconv.Itoa(1+k))
			}
			i := 0
			send := func() {
				for range burst {
					// 250 addresses × 50 000 ports: a new flow each
					// time for 12.5 M datagrams.
					dst := netip.AddrPortFrom(dsts[i/50000%250], uint16(10000+i%50000))
					i++
					if _, err := tx.WriteToUDPAddrPort(msg, dst); err != nil {
						b.Fatal(err)
					}
				}
			}
			reportCPUPerDatagram(b, burst, send)
			time.Sleep(100 * time.Millisecond)
			out := nftList(b, sink, "chain", "inet", "sink", "pre")
			c := regexp.MustCompile(`counter packets (\d+)`).FindAllStringSubmatch(out, -1)
			if len(c) != 2 {
				b.Fatalf("sink counters:\n%s", out)
			}
			want, _ := strconv.Atoi(c[0][1])
			other, _ := strconv.Atoi(c[1][1])
			sent := (100 + b.N) * burst
			b.ReportMetric(float64(want)/float64(sent), "arrived-as-expected")
			if other != 0 || want == 0 {
				b.Fatalf("%d of %d datagrams arrived from %v, %d from another source", want, sent, seen, other)
			}
		})
	}
}
