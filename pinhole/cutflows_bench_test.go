package pinhole_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pinhole"
)

// BenchmarkGuardEstablished: what the re-check of labelled flows
// (cutflows.go: "ct direction original ct state established ct label 127
// goto recheck6", then recheck6's lookups) costs an established flow's
// packets. A UDP stream, established by one reply, then bursts of 32
// datagrams one way: "pinhole flow" from the Internet to the client
// through a port pinhole (original direction: the rule's three compares,
// the goto and one lookup hit in pin6), "PEER flow" through a filtered
// one (pin6_filter: recheck6's fourth lookup; three misses first), and
// "outbound reply" from the Internet to the client on the client's own
// flow (reply direction: the rule's first compare fails). Each with the
// layout as Setup writes it and with the goto rule deleted by nft (the
// established accept first, as before). "re-check x9" inserts 8 more
// copies of the rule's matches and recheck6's lookup (no verdict) at
// guard6's head, so that (x9 - re-check) / 8 is their cost out of the
// noise. cpu-ns/datagram as in
// BenchmarkGuardNewFlow: the process's CPU, sender, host forwarding and
// receiver.
func BenchmarkGuardEstablished(b *testing.B) {
	for _, tc := range []struct {
		name     string
		peer     bool // the flow's pinhole is a filtered one
		outbound bool // the client opened the flow
		recheck  bool
		more     int // copies of the re-check's matches and lookup, without a verdict, first in guard6
	}{
		{"pinhole flow", false, false, true, 0},
		{"pinhole flow, no re-check", false, false, false, 0},
		{"pinhole flow, re-check x9", false, false, true, 8},
		{"PEER flow", true, false, true, 0},
		{"PEER flow, no re-check", true, false, false, 0},
		{"outbound reply", false, true, true, 0},
		{"outbound reply, no re-check", false, true, false, 0},
	} {
		b.Run(tc.name, func(b *testing.B) {
			topo, be := guardedTopology(b, pinhole.Config{})
			client := netip.AddrPortFrom(topo.ClientV6, 7000)
			remote := netip.AddrPortFrom(topo.InternetV6, 47000)
			p := pinhole.Pinhole{Protocol: udp, InternalAddr: client.Addr(), InternalPort: client.Port()}
			if tc.peer {
				p.RemotePrefix, p.RemotePort = netip.PrefixFrom(remote.Addr(), 128), remote.Port()
			}
			if !tc.outbound {
				apply(b, be, install(p, time.Hour))
			}
			if !tc.recheck {
				deleteRule(b, topo.Host, "pcpd", "guard6", `goto recheck6 `)
			}
			for range tc.more {
				topo.Host.MustRun(b, "nft", "insert rule inet pcpd guard6 ct direction original ct state established ct label 127 ip6 daddr . meta l4proto . th dport @pin6")
			}
			burstThrough(b, topo, client, remote, client, tc.outbound)
		})
	}
}
