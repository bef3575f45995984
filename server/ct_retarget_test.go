package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestE2ERetargetedEndpointCutsOldFlow (root, namespaces; review
// h/revnatcut finding 3): an IPv6 redirect (external port P to the
// client's port X) carries a TCP connection from the Internet; the MAP is
// deleted and P mapped again to another internal port Y of the client,
// in a batch of its own after the delete or in the delete's batch. The
// old connection's next packet must not reach X. natcut re-checks a
// DNAT-ed flow by its external endpoint alone, which the new redirect
// holds, and conntrack's binding still sends the flow to X: on main the
// echo through the old connection comes back (from X) in all four rows,
// with the conntrack walk held back (default) and with KeepConnections
// (no walk at all), and with KeepConnections across a restart between
// the delete and the new MAP. The server now ends the flows of a retaken
// endpoint that go elsewhere before the new mapping's install commits
// (cutRetargeted; across a restart from what the start found in conntrack:
// seedNATPrior, without which the restart row fails as on main).
func TestE2ERetargetedEndpointCutsOldFlow(t *testing.T) {
	for i, c := range []struct {
		name      string
		keep      bool
		sameBatch bool
		restart   bool // pcpd restarted between the delete and the new MAP
	}{
		{"walk held, separate batches", false, false, false},
		{"walk held, one batch", false, true, false},
		{"KeepConnections, separate batches", true, false, false},
		{"KeepConnections, one batch", true, true, false},
		{"KeepConnections, restart between", true, false, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			var gate ctGate
			l := newLab(t, func(cfg *Config, p *policy.Config) {
				p.MinLifetime = time.Second
				cfg.KeepConnections = c.keep
			})
			l.stop()
			l.tweak = gate.tweak
			l.start()
			gate.hold()
			defer gate.release()
			port := uint16(9860 + 2*i)
			conn, src, dst := l.inbound(t, "redir6", port, time.Hour)
			if dst.Port() == port {
				t.Fatalf("MAP of %d not redirected (external %v)", port, dst)
			}
			serveEcho(t, l.topo.Client, netip.AddrPortFrom(l.topo.ClientV6, port+1))
			del := mapReq(l.topo.ClientV6, pcp.ProtoTCP, port, dst.Port(), 0, 1)
			remap := mapReq(l.topo.ClientV6, pcp.ProtoTCP, port+1, dst.Port(), time.Hour, 2)
			var r pcp.Response
			if c.sameBatch {
				req := func(r *pcp.Request) Request {
					return Request{Local: l.server6(), Source: netip.AddrPortFrom(l.topo.ClientV6, 5351), Iface: l.topo.HostLANIf, Data: pcp.AppendRequest(nil, r)}
				}
				out := l.srv.HandleBatch([]Request{req(del), req(remap)})
				if err := pcp.ParseResponse(out[1], &r); err != nil {
					t.Fatal(err)
				}
			} else {
				if d := l.pcp(del); d.Result != pcp.Success {
					t.Fatalf("delete: %+v", d)
				}
				if c.restart {
					l.stop()
					l.start()
				}
				r = l.pcp(remap)
			}
			if r.Result != pcp.Success || r.Map.ExternalPort != dst.Port() {
				t.Fatalf("MAP of %d for external port %d: %+v", port+1, dst.Port(), r)
			}
			if err := echoOnce(conn); err == nil {
				t.Errorf("the old connection still reaches port %d after %v was mapped to port %d", port, dst, port+1)
			}
			if f := l.ctFlow(t, src, dst); f != nil && f.Reverse.SrcPort == port {
				t.Errorf("still tracked to port %d: %s", port, f)
			}
		})
	}
}
