package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// TestReservedPortsAfterRestart: an operator who finds a client holding a
// public IPv4 port the host needs (a client took 18080 before the host's
// own service was deployed there) reserves it in the configuration
// (--reserved-ports, or narrows --ipv4-ports) and restarts pcpd. The
// configuration says such ports are never handed out; after the restart
// and the client's next renewal the public port must no longer be
// DNAT-ed to the client, in the kernel and for real traffic. Today the
// stored lease is restored as it was and every renewal keeps it
// (renewals never ask usable), so the reservation has no effect until the
// client stops renewing or the operator revokes it by hand.
func TestReservedPortsAfterRestart(t *testing.T) {
	const internal, public = 8080, 18080
	cases := []struct {
		name    string
		reserve func(*Config)
	}{
		{"reserved-ports", func(c *Config) { c.ReservedPorts = []uint16{public} }},
		{"ipv4-ports", func(c *Config) { c.IPv4Ports = PortRange{20000, 30000} }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t)
			l.topo.Client.ServeTCP(t, netip.AddrPortFrom(l.topo.ClientV4, internal).String())
			pub := netip.AddrPortFrom(l.topo.HostPublicV4, public)
			req := mapReq(l.topo.ClientV4, pcp.ProtoTCP, internal, public, time.Hour, 1)
			if r := l.pcp(req); r.Result != 0 || r.Map.ExternalPort != public {
				t.Fatalf("MAP: %v, external %d", r.Result, r.Map.ExternalPort)
			}
			if !l.reach(pub) {
				t.Fatal("mapping passes no traffic")
			}
			l.stop()
			tc.reserve(&l.cfg)
			l.start()
			// The client renews as usual (same nonce, same suggestion).
			r := l.pcp(req)
			if r.Result == 0 && r.Map.ExternalPort == public {
				t.Errorf("renewal after the restart kept the now reserved %v", pub)
			}
			for _, e := range l.kernelHoles() {
				if p := e.Pinhole; p.ExternalAddr == pub.Addr() && p.ExternalPort == public && p.Protocol == protoTCP {
					t.Errorf("kernel still forwards reserved %v to %v:%d", pub, p.InternalAddr, p.InternalPort)
				}
			}
			if l.reach(pub) {
				t.Errorf("a connection to reserved %v still reaches the client", pub)
			}
		})
	}
}
