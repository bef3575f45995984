package pinhole_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// BenchmarkNATCutEstablished: what natcut (natcut.go: "ct label 126 ct
// direction original ct state established,new goto recheck_nat" in a
// prerouting base chain at -150, then recheck_nat's lookups) costs an
// established flow's packets, as BenchmarkGuardEstablished for recheck6.
// A UDP stream, established by one reply, then bursts of 32 datagrams
// from the Internet to the client: "NAPT flow" through an IPv4 NAPT
// mapping (labelled: the rule's three compares, the goto and the first
// lookup's hit in napt4), "pinhole flow" through an IPv6 port pinhole
// (not labelled 126: natcut's first compare fails; every packet the host
// receives pays that). Each with the layout as Setup writes it and with
// natcut's rule deleted by nft ("no natcut"); "x65" inserts 64 more
// copies of the rule's matches and recheck_nat's napt4 lookup (for the
// pinhole flow the first compare fails) without a verdict at natcut's
// head, so that (x65 - plain) / 64 is their cost out of the noise (8
// copies, as BenchmarkGuardEstablished, were within it on this box). cpu-ns/datagram: the process's CPU,
// sender, host forwarding and receiver (reportCPUPerDatagram).
func BenchmarkNATCutEstablished(b *testing.B) {
	for _, tc := range []struct {
		name   string
		napt   bool
		natcut bool
		more   int
	}{
		{"NAPT flow", true, true, 0},
		{"NAPT flow, no natcut", true, false, 0},
		{"NAPT flow, natcut x65", true, true, 64},
		{"pinhole flow", false, true, 0},
		{"pinhole flow, no natcut", false, false, 0},
		{"pinhole flow, natcut x65", false, true, 64},
	} {
		b.Run(tc.name, func(b *testing.B) {
			topo, be := guardedTopology(b, pinhole.Config{})
			client := netip.AddrPortFrom(topo.ClientV6, 7000)
			remote := netip.AddrPortFrom(topo.InternetV6, 47000)
			dst := client
			p := pinhole.Pinhole{Protocol: udp, InternalAddr: client.Addr(), InternalPort: client.Port()}
			if tc.napt {
				client = netip.AddrPortFrom(topo.ClientV4, 7000)
				remote = netip.AddrPortFrom(topo.InternetV4, 47000)
				dst = netip.AddrPortFrom(topo.HostPublicV4, 17000)
				p = pinhole.Pinhole{Protocol: udp, InternalAddr: client.Addr(), InternalPort: client.Port(),
					ExternalAddr: dst.Addr(), ExternalPort: dst.Port()}
			}
			apply(b, be, install(p, time.Hour))
			if !tc.natcut {
				deleteRule(b, topo.Host, "pcpd", "natcut", `goto recheck_nat `)
			}
			for range tc.more {
				topo.Host.MustRun(b, "nft", "insert rule inet pcpd natcut ct label 126 ct direction original ct state established,new ip daddr . meta l4proto . th dport @napt4")
			}
			burstThrough(b, topo, client, remote, dst, false)
		})
	}
}

// burstThrough opens a UDP flow from remote (in the internet namespace)
// to dst, which the ruleset DNATs or admits to client (in the client
// namespace), with one round trip, so the flow is established (outbound:
// the client's own flow, opened by one datagram from client to remote),
// then reports the CPU its bursts from the remote cost (reportBurstCPU).
func burstThrough(b *testing.B, topo *netlab.Topology, client, remote, dst netip.AddrPort, outbound bool) {
	b.Helper()
	rx := listenUDP(b, topo.Client, client)
	rx.SetReadBuffer(1 << 20)
	tx := listenUDP(b, topo.Internet, remote)
	msg, buf := make([]byte, 60), make([]byte, 128)
	rx.SetReadDeadline(time.Now().Add(time.Second))
	tx.SetReadDeadline(time.Now().Add(time.Second))
	if !outbound {
		if _, err := tx.WriteToUDPAddrPort(msg, dst); err != nil {
			b.Fatal(err)
		}
		_, from, err := rx.ReadFromUDPAddrPort(buf)
		if err != nil {
			b.Fatal(err)
		}
		remote = from
	}
	if _, err := rx.WriteToUDPAddrPort(msg, remote); err != nil {
		b.Fatal(err)
	}
	if _, err := tx.Read(buf); err != nil {
		b.Fatal(err)
	}
	reportBurstCPU(b, func() error { _, err := tx.WriteToUDPAddrPort(msg, dst); return err }, rx)
}
