package interop

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// TestStartOSExchange replays the exchange StartOS's PCP client makes to
// the router's LAN address, port 5351, with pcp's client from the Client
// namespace: an ANNOUNCE probe; TCP and UDP MAPs as separate requests,
// lifetime 3600, suggested external port = internal port; the 80 → 443
// redirect MAP; renewals with the same nonce and the granted lifetime;
// deletes with suggested external port 0. Every step must succeed, every
// granted external port must be the requested one, and the data plane is
// checked after the maps and after the deletes. IPv6 (a pinhole on the
// client's own address, MAP-11) is the StartOS case; IPv4 (NAPT to the
// external IPv4, MAP-12) runs the same exchange.
func TestStartOSExchange(t *testing.T) {
	requireRoot(t)
	for _, fam := range []struct {
		name           string
		client, server func(l *lab) netip.Addr
		external       func(l *lab) netip.Addr // the granted external address
		flags          []string                // more pcpd serve flags
	}{
		{"IPv6",
			func(l *lab) netip.Addr { return l.topo.ClientV6 },
			func(l *lab) netip.Addr { return l.topo.HostTunnelV6 },
			func(l *lab) netip.Addr { return l.topo.ClientV6 }, nil},
		// External IPv4 ports below 1024 belong to the host's own
		// services by default (--ipv4-port-range 1024-65535); a router
		// that forwards port 80 to a StartOS server opens the range.
		{"IPv4",
			func(l *lab) netip.Addr { return l.topo.ClientV4 },
			func(l *lab) netip.Addr { return l.topo.HostTunnelV4 },
			func(l *lab) netip.Addr { return l.topo.HostPublicV4 },
			[]string{"--ipv4-port-range", "1-65535"}},
	} {
		t.Run(fam.name, func(t *testing.T) {
			l := newLab(t, fam.flags...)
			startOSExchange(t, l, fam.client(l), fam.server(l), fam.external(l))
		})
	}
}

// startOSExchange runs the exchange from client to server; extAddr is the
// external address every mapping must get.
func startOSExchange(t *testing.T, l *lab, client, server, extAddr netip.Addr) {
	topo := l.topo
	c, err := l.pcpClientFrom(client, server)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Conn.Close() })

	do := func(t *testing.T, req *pcp.Request) pcp.Response {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var resp pcp.Response
		if err := c.Do(ctx, req, &resp); err != nil {
			t.Fatalf("%v: %v", req.Opcode, err)
		}
		if resp.Result != pcp.Success {
			t.Fatalf("%v: result %v, want SUCCESS", req.Opcode, resp.Result)
		}
		return resp
	}

	const (
		appPort   = 5443 // one service port, mapped for TCP and for UDP
		httpsPort = 443  // the redirect's internal port
		httpPort  = 80   // the redirect's external port
		lifetime  = 3600 * time.Second
	)
	topo.Client.ServeTCP(t, netip.AddrPortFrom(client, appPort).String())
	topo.Client.ServeUDPEcho(t, netip.AddrPortFrom(client, appPort).String())
	topo.Client.ServeTCP(t, netip.AddrPortFrom(client, httpsPort).String())

	type mapping struct {
		name     string
		proto    pcp.Protocol
		internal uint16
		external uint16 // suggested, and what must be granted
		req      *pcp.Request
		granted  time.Duration
	}
	maps := []*mapping{
		{name: "TCP", proto: pcp.ProtoTCP, internal: appPort, external: appPort},
		{name: "UDP", proto: pcp.ProtoUDP, internal: appPort, external: appPort},
		{name: "redirect 80→443", proto: pcp.ProtoTCP, internal: httpsPort, external: httpPort},
	}
	// reach checks the data plane through m's external port.
	reach := func(m *mapping) error {
		at := netip.AddrPortFrom(extAddr, m.external)
		if m.proto == pcp.ProtoUDP {
			return l.reachUDP(at)
		}
		return l.reachTCP(at)
	}
	blocked := func(m *mapping) error {
		proto := "tcp"
		if m.proto == pcp.ProtoUDP {
			proto = "udp"
		}
		return l.blocked(proto, netip.AddrPortFrom(extAddr, m.external))
	}

	steps := []struct {
		id  string
		run func(t *testing.T)
	}{
		{"ANN-01 ANNOUNCE probe", func(t *testing.T) {
			resp := do(t, pcp.NewAnnounce(client))
			if resp.Opcode != pcp.OpAnnounce {
				t.Fatalf("opcode %v, want ANNOUNCE", resp.Opcode)
			}
		}},
		{"closed before the mappings", func(t *testing.T) {
			for _, m := range maps {
				if err := blocked(m); err != nil {
					t.Errorf("%s: %v", m.name, err)
				}
			}
		}},
		{"MAP-09 TCP and UDP maps, 80→443 redirect", func(t *testing.T) {
			for _, m := range maps {
				m.req = pcp.NewMap(client, m.proto, m.internal, lifetime)
				m.req.Map.ExternalPort = m.external
				resp := do(t, m.req)
				if resp.Map.ExternalPort != m.external {
					t.Fatalf("%s: granted external port %d, want the suggested %d", m.name, resp.Map.ExternalPort, m.external)
				}
				if resp.Map.ExternalAddr != extAddr {
					t.Errorf("%s: external address %s, want %s", m.name, resp.Map.ExternalAddr, extAddr)
				}
				if resp.Lifetime != lifetime {
					t.Errorf("%s: granted lifetime %v, want %v", m.name, resp.Lifetime, lifetime)
				}
				m.granted = resp.Lifetime
				if err := reach(m); err != nil {
					t.Errorf("%s: internet → %s does not reach the service on %d: %v", m.name, netip.AddrPortFrom(extAddr, m.external), m.internal, err)
				}
			}
		}},
		{"LIFE-03 renew with the same nonce and granted lifetime", func(t *testing.T) {
			for _, m := range maps {
				renew := *m.req
				renew.Lifetime = m.granted
				resp := do(t, &renew)
				if resp.Map.ExternalPort != m.external || resp.Lifetime != m.granted {
					t.Errorf("%s: renewal granted port %d lifetime %v, want %d %v", m.name, resp.Map.ExternalPort, resp.Lifetime, m.external, m.granted)
				}
				if err := reach(m); err != nil {
					t.Errorf("%s: after renewal: %v", m.name, err)
				}
			}
		}},
		{"MAP-16 delete with suggested external port 0", func(t *testing.T) {
			for _, m := range maps {
				del := *m.req
				del.Lifetime = 0
				del.Map.ExternalPort = 0
				resp := do(t, &del)
				if resp.Lifetime != 0 {
					t.Errorf("%s: delete reply lifetime %v, want 0 (MAP-17)", m.name, resp.Lifetime)
				}
				if err := blocked(m); err != nil {
					t.Errorf("%s: %v", m.name, err)
				}
			}
		}},
	}
	for _, s := range steps {
		if !t.Run(s.id, s.run) {
			t.Fatalf("step %q failed; later steps depend on it", s.id)
		}
	}
}
