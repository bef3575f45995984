package pinhole_test

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// BenchmarkAttachedCutEstablished: what pcpd_cut (attcut.go) costs an
// established flow's packets attached, as BenchmarkNATCutEstablished for
// natcut. A UDP stream, established by one reply, then bursts of 32
// datagrams from the Internet to the client, beneath attCutRuleset's
// admin chain (without its label rule; its open port is UDP here):
// "NAPT flow" through an IPv4 NAPT mapping (labelled, DNAT-ed: pcpd_cut's
// first rule's four compares, the goto and napt4's hit), "pinhole flow"
// through an IPv6 port pinhole (labelled, not DNAT-ed: the first rule
// fails at its third compare, the second's three compares, the goto and
// pin6's hit), "admin's flow" to the port the admin's own rule opens
// (unlabelled: both rules' first compare fails; every packet the host
// receives pays that). Each with the layout as Setup writes it, with
// pcpd_cut flushed ("no cut"), and with 64 more copies of the path's
// matches and lookup, without a verdict, at pcpd_cut's head ("x65"), so
// that (x65 - plain) / 64 is their cost out of the noise. cpu-ns/datagram:
// the process's CPU, sender, host forwarding and receiver.
func BenchmarkAttachedCutEstablished(b *testing.B) {
	const (
		napt4Copy = "ct label 90 ct direction original ct status dnat ct state established,new ip daddr . meta l4proto . th dport @pcpd_napt4"
		pin6Copy  = "ct label 90 ct direction original ct state established ip6 daddr . meta l4proto . th dport @pcpd_pin6"
	)
	for _, tc := range []struct {
		name string
		flow string // "napt", "pin", "admin"
		cut  bool
		copy string
	}{
		{"NAPT flow", "napt", true, ""},
		{"NAPT flow, no cut", "napt", false, ""},
		{"NAPT flow, cut x65", "napt", true, napt4Copy},
		{"pinhole flow", "pin", true, ""},
		{"pinhole flow, no cut", "pin", false, ""},
		{"pinhole flow, cut x65", "pin", true, pin6Copy},
		{"admin's flow", "admin", true, ""},
		{"admin's flow, no cut", "admin", false, ""},
		{"admin's flow, cut x65", "admin", true, napt4Copy},
	} {
		b.Run(tc.name, func(b *testing.B) {
			topo := netlab.NewTopology(b, netlab.TopologyOptions{})
			loadNft(b, topo.Host, strings.NewReplacer("HOSTPUB", topo.HostPublicV4.String(), "CLIENT4", topo.ClientV4.String(),
				"CLIENT6", topo.ClientV6.String(), "\t\tct label set 5\n", "", "tcp dport 7350", "udp dport 7350").Replace(attCutRuleset))
			be := newBackend(b, topo.Host, pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd"})
			serveTunnel(b, be, topo)
			if err := be.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
				b.Fatal(err)
			}
			client := netip.AddrPortFrom(topo.ClientV6, 7000)
			remote := netip.AddrPortFrom(topo.InternetV6, 47000)
			dst := client
			switch tc.flow {
			case "pin":
				apply(b, be, install(pinhole.Pinhole{Protocol: udp, InternalAddr: client.Addr(), InternalPort: client.Port()}, time.Hour))
			case "napt":
				client = netip.AddrPortFrom(topo.ClientV4, 7000)
				remote = netip.AddrPortFrom(topo.InternetV4, 47000)
				dst = netip.AddrPortFrom(topo.HostPublicV4, 17000)
				apply(b, be, install(pinhole.Pinhole{Protocol: udp, InternalAddr: client.Addr(), InternalPort: client.Port(),
					ExternalAddr: dst.Addr(), ExternalPort: dst.Port()}, time.Hour))
			case "admin":
				client = netip.AddrPortFrom(topo.ClientV6, 7350)
				dst = client
			}
			if !tc.cut {
				topo.Host.MustRun(b, "nft", "flush", "chain", "inet", "filter", "pcpd_cut")
			}
			if tc.copy != "" {
				for range 64 {
					topo.Host.MustRun(b, "nft", "insert rule inet filter pcpd_cut "+tc.copy)
				}
			}
			burstThrough(b, topo, client, remote, dst, false)
		})
	}
}
