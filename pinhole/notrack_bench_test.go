package pinhole_test

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// BenchmarkControlDatagram: what pcpd's table costs each request and its
// answer (a client's datagram to the host's 5351 over a veth, echoed), with
// no table (the benchmark floor's case), with the table and the datagrams
// tracked, and with them untracked (notrack.go). Besides ns/op it reports
// cpu-ns/op, the process's user + system CPU per round trip: both ends run
// in this process, and the veth delivers in the sender's softirq, so the
// kernel's netfilter work is in it; it is steadier than wall time on a
// shared machine. Each op is a burst of 32 requests, then their 32 answers.
// "owned" makes the client's prefixes an owner's, so its datagrams pass
// through its owner chain (ownermeter.go) as a client's do; the owner rate
// is out of reach.
func BenchmarkControlDatagram(b *testing.B) {
	for _, tc := range []struct {
		name  string
		table bool
		cfg   pinhole.Config
		owned bool
	}{
		{"no table", false, pinhole.Config{}, false},
		{"tracked", true, pinhole.Config{TrackControl: true}, false},
		{"notrack", true, pinhole.Config{}, false},
		{"tracked, meter", true, pinhole.Config{TrackControl: true, Meter: pinhole.Meter{Rate: 1 << 20, Burst: 1 << 20}}, false},
		{"notrack, meter", true, pinhole.Config{Meter: pinhole.Meter{Rate: 1 << 20, Burst: 1 << 20}}, false},
		{"notrack, meter, owned", true, pinhole.Config{Meter: pinhole.Meter{Rate: 1 << 20, Burst: 1 << 20}}, true},
		// The owner chain's reverse-path rule (strict above): loose, and none.
		{"notrack, meter, owned, loose", true, pinhole.Config{Meter: pinhole.Meter{Rate: 1 << 20, Burst: 1 << 20, ReversePath: pinhole.ReversePathLoose}}, true},
		{"notrack, meter, owned, off", true, pinhole.Config{Meter: pinhole.Meter{Rate: 1 << 20, Burst: 1 << 20, ReversePath: pinhole.ReversePathOff}}, true},
		// Strict, but the owner's prefix not routed through one interface
		// (Routes answers none): every datagram meets the route lookup, as
		// the bench's load did before its /48 was routed whole
		// (BENCHMARKS.md "What changed" 28). The rows above have the
		// client's prefixes routed through the LAN, so its datagrams end
		// the rule at the interface comparison.
		{"notrack, meter, owned, unrouted", true, pinhole.Config{Routes: noRoutes{}, Meter: pinhole.Meter{Rate: 1 << 20, Burst: 1 << 20}}, true},
	} {
		b.Run(tc.name, func(b *testing.B) {
			topo := netlab.NewTopology(b, netlab.TopologyOptions{})
			if tc.table {
				controlTable(b, topo, tc.cfg, tc.owned)
			}
			measureControlEcho(b, topo)
		})
	}
}

// measureControlEcho is ControlDatagram's and ControlRuleCost's measured
// part: bursts of 32 datagrams from the client to an echo on the host's
// tunnel address at pcpd's port, through whatever table the host has
// now, reporting the test process's CPU a datagram (client and echo both
// run here, so the kernel's work on both sides is in it).
func measureControlEcho(b *testing.B, topo *netlab.Topology) {
	b.Helper()
	srv := netip.AddrPortFrom(topo.HostTunnelV6, 5351)
	topo.Host.ServeUDPEcho(b, srv.String())
	var c *net.UDPConn
	if err := topo.Client.Do(func() (err error) {
		c, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(srv))
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	const burst = 32
	msg, buf := make([]byte, 60), make([]byte, 128)
	roundTrip := func() {
		for range burst {
			if _, err := c.Write(msg); err != nil {
				b.Fatal(err)
			}
		}
		c.SetReadDeadline(time.Now().Add(time.Second))
		for range burst {
			if _, err := c.Read(buf); err != nil {
				b.Fatal(err) // the socket buffers hold a burst: nothing is lost
			}
		}
	}
	reportCPUPerDatagram(b, burst, roundTrip) // 100 round trips first warm the conntrack entry, caches, goroutines
}

// controlTable sets pcpd's table up in topo's host as the daemon would
// for the control-path benchmarks: the tunnel served, the client's
// prefixes protected and, with owned, owned by one static client.
func controlTable(b *testing.B, topo *netlab.Topology, cfg pinhole.Config, owned bool) *pinhole.Backend {
	b.Helper()
	be := newBackend(b, topo.Host, cfg)
	serveTunnel(b, be, topo)
	if err := be.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
		b.Fatal(err)
	}
	if owned {
		if err := be.SetOwners([]pinhole.Owner{{ID: "static:client", Prefixes: []netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}}}, nil); err != nil {
			b.Fatal(err)
		}
	}
	return be
}
