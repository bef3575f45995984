package pinhole_test

import (
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// BenchmarkGuardNewFlow: what the guards' reverse-path rule (layout: "ip6
// saddr @protected6 fib saddr . iif oif 0 counter drop") costs the
// forwarded datagrams that pay it. One-way UDP stays "new" to conntrack
// until a reply, so every datagram of such a stream goes past the
// established accept to the rule: the worst case. "client to client": from
// the client's address (protected, routed through lan0, where it arrives:
// the set lookup and the route lookup, then passed) to a second LAN's
// protected address (lan1) through a pinhole; "internet": from the
// Internet's address (not protected: the set lookup alone) through a
// pinhole to the client. Each with the rules as Setup writes them and with
// them deleted by nft (the layout before them): since h/fixspoof2 the
// route lookup's rule and, after it, "ip6 saddr @protected6 iifname !=
// @serving_ifs counter drop" (a second set lookup hit, then the ifname
// lookup; lan0 is served, serveTunnel). cpu-ns/datagram is the process's
// user + system CPU a datagram (sender and receiver both run here, and a
// veth delivers in the sender's softirq, so the host's forwarding is in
// it). Each op is a burst of 32 datagrams, then their reception.
// "internet, no local-source rule" deletes the guard's "fib saddr type
// 2-4 counter drop" (h/spoofsrc; local, broadcast, anycast since
// h/revspoof2), "internet, local-source x9" inserts 8 more copies of it
// (first in the chain: every datagram here is "new" anyway; nft writes
// "type 2-4" as two compares where pcpd writes one range, the same route
// lookup) so that its cost stands out of the noise: (x9 - none) / 9 is
// one lookup's.
func BenchmarkGuardNewFlow(b *testing.B) {
	for _, tc := range []struct {
		name     string
		internet bool
		rule     bool
		local    int // -1: the local-source rule deleted; n > 0: n more copies of it
	}{
		{"client to client", false, true, 0},
		{"client to client, no rule", false, false, 0},
		{"internet", true, true, 0},
		{"internet, no rule", true, false, 0},
		{"internet, no local-source rule", true, true, -1},
		{"internet, local-source x9", true, true, 8},
	} {
		b.Run(tc.name, func(b *testing.B) {
			topo := netlab.NewTopology(b, netlab.TopologyOptions{})
			be := newBackend(b, topo.Host, pinhole.Config{})
			serveTunnel(b, be, topo)
			lan2 := netlab.NewNS(b, "gb2")
			if err := netlab.Veth(lan2, "eth0", topo.Host, "lan1"); err != nil {
				b.Fatal(err)
			}
			other6, peer := netip.MustParsePrefix("2001:db8:1:3::/64"), netip.MustParseAddr("2001:db8:1:3::10")
			topo.Host.MustRun(b, "ip", "addr", "add", "2001:db8:1:3::1/64", "dev", "lan1", "nodad")
			lan2.MustRun(b, "ip", "addr", "add", peer.String()+"/64", "dev", "eth0", "nodad")
			lan2.MustRun(b, "ip", "-6", "route", "add", "default", "via", "2001:db8:1:3::1")
			if err := be.SetProtected([]netip.Prefix{topo.ClientPrefix6, other6, topo.ClientPrefix4}); err != nil {
				b.Fatal(err)
			}
			from, to, dst := topo.Client, lan2, netip.AddrPortFrom(peer, 7000)
			if tc.internet {
				from, to, dst = topo.Internet, topo.Client, netip.AddrPortFrom(topo.ClientV6, 7000)
			}
			apply(b, be, install(pinhole.Pinhole{Protocol: udp, InternalAddr: dst.Addr(), InternalPort: dst.Port()}, time.Hour))
			if !tc.rule {
				deleteRule(b, topo.Host, "pcpd", "guard6", `fib saddr \. iif oif 0 .*`)
				deleteRule(b, topo.Host, "pcpd", "guard6", `iifname != @serving_ifs .*`)
			}
			if tc.local < 0 {
				deleteRule(b, topo.Host, "pcpd", "guard6", `fib saddr type 2-4 .*`)
			}
			for range tc.local {
				topo.Host.MustRun(b, "nft", "insert", "rule", "inet", "pcpd", "guard6", "fib", "saddr", "type", "2-4", "counter", "drop")
			}
			rx := listenUDP(b, to, dst)
			rx.SetReadBuffer(1 << 20)
			burstsFrom(b, from, dst, rx)
		})
	}
}

// burstsFrom sends 60-byte datagrams from ns to dst in bursts and
// reports their CPU (reportBurstCPU).
func burstsFrom(b *testing.B, ns *netlab.NS, dst netip.AddrPort, rx *net.UDPConn) {
	var tx *net.UDPConn
	if err := ns.Do(func() (err error) {
		tx, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer tx.Close()
	msg := make([]byte, 60)
	reportBurstCPU(b, func() error { _, err := tx.Write(msg); return err }, rx)
}

// reportBurstCPU is reportCPUPerDatagram over bursts of 32 datagrams,
// each sent by send and all read back on rx (a read that times out is a
// drop by the ruleset or a full buffer, and fails the benchmark).
func reportBurstCPU(b *testing.B, send func() error, rx *net.UDPConn) {
	const burst = 32
	buf := make([]byte, 128)
	reportCPUPerDatagram(b, burst, func() {
		for range burst {
			if err := send(); err != nil {
				b.Fatal(err)
			}
		}
		rx.SetReadDeadline(time.Now().Add(time.Second))
		for range burst {
			if _, err := rx.Read(buf); err != nil {
				b.Fatal(err) // dropped, or a buffer overflowed
			}
		}
	})
}

// reportCPUPerDatagram warms up with 100 bursts, then times oneWay (a
// burst of burst datagrams sent and received) over the benchmark's loop
// and reports the process's CPU time (user and system: sender,
// forwarding in softirq, receiver) per datagram.
func reportCPUPerDatagram(b *testing.B, burst int, oneWay func()) {
	b.Helper()
	for range 100 {
		oneWay()
	}
	var before, after syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &before)
	b.ResetTimer()
	for b.Loop() {
		oneWay()
	}
	b.StopTimer()
	syscall.Getrusage(syscall.RUSAGE_SELF, &after)
	cpu := time.Duration(syscall.TimevalToNsec(after.Utime) - syscall.TimevalToNsec(before.Utime) +
		syscall.TimevalToNsec(after.Stime) - syscall.TimevalToNsec(before.Stime))
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N*burst), "cpu-ns/datagram")
}
