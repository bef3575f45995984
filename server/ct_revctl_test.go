package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
)

// Review of h/ctleft (h/revctl, 2026-12-05).

// TestE2EEndpointRetakenEndsOldFlow (root, namespaces): an IPv6 PCP MAP
// of port 9800 is deleted and, in the same batch, the client maps its
// port 9801 with external port 9800: a redirect (the kernel now DNATs
// 9800 to 9801). The connection the deleted MAP admitted, to port 9800
// itself, is admitted by no live mapping: the redirect sends new packets
// to 9801. It used to survive: the redirect, live when the MAP ended,
// "admitted every flow to the endpoint" (pinhole.Pinhole.Admits looks
// at where a flow was sent, not where the kernel delivers it), so the
// flush dropped the filter. IPv4 NAT-PMP cannot do it this way (MAP-22:
// the freed port's quarantine lets only the same internal endpoint
// reclaim it). Fails that way without the fix: the flow is still
// tracked after the batch's flush.
func TestE2EEndpointRetakenEndsOldFlow(t *testing.T) {
	l := newLab(t, func(_ *Config, p *policy.Config) { p.MinLifetime = time.Second })
	const port = 9800
	conn, src, dst := l.inbound(t, "map6", port, time.Hour)
	serveEcho(t, l.topo.Client, netip.AddrPortFrom(l.topo.ClientV6, port+1))
	req := func(r *pcp.Request) Request {
		return Request{Local: l.server6(), Source: netip.AddrPortFrom(l.topo.ClientV6, 5351), Iface: l.topo.HostLANIf, Data: pcp.AppendRequest(nil, r)}
	}
	out := l.srv.HandleBatch([]Request{
		req(mapReq(l.topo.ClientV6, pcp.ProtoTCP, port, port, 0, 1)),
		req(mapReq(l.topo.ClientV6, pcp.ProtoTCP, port+1, port, time.Hour, 2)),
	})
	var r pcp.Response
	if err := pcp.ParseResponse(out[1], &r); err != nil || r.Result != pcp.Success {
		t.Fatalf("MAP of %d: %+v %v", port+1, r, err)
	}
	if r.Map.ExternalPort != port {
		t.Fatalf("MAP of %d got external port %d, want %d (the redirect)", port+1, r.Map.ExternalPort, port)
	}
	if n := len(l.srv.Leases()); n != 1 {
		t.Fatalf("%d leases, want the redirect only", n)
	}
	// HandleBatch returns once the batch's flush ran.
	if f := l.ctFlow(t, src, dst); f != nil {
		t.Errorf("the deleted MAP's connection is still tracked: %s", f)
	}
	if err := echoOnce(conn); err == nil {
		t.Error("the deleted MAP's connection still carries data")
	}
}

// TestCtAdmitsDelivery: a live pinhole spares a flow only if it admits
// the packet as sent (pinhole.Pinhole.Admits) and the kernel would deliver
// it where the flow goes (the reply tuple's source): an IPv4 NAPT or IPv6
// redirect to its internal endpoint, a plain IPv6 pinhole to the address
// and port it admits. Before, where the flow was delivered was not looked
// at: a mapping that took over the external endpoint (DNAT-ing it to
// another internal port or host) spared the flows of the one that ended.
func TestCtAdmitsDelivery(t *testing.T) {
	a4, b4 := netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("10.0.0.3")
	ext := netip.MustParseAddr("192.0.2.1")
	a6 := netip.MustParseAddr("2001:db8::2")
	rem := netip.MustParseAddrPort("198.51.100.7:40000")
	rem6 := netip.MustParseAddrPort("[2001:db8:9::7]:40000")
	ap := netip.AddrPortFrom
	napt := pinhole.Pinhole{Protocol: 6, InternalAddr: a4, InternalPort: 80, ExternalAddr: ext, ExternalPort: 5000}
	redir := pinhole.Pinhole{Protocol: 6, InternalAddr: a6, InternalPort: 443, ExternalAddr: a6, ExternalPort: 80}
	plain := pinhole.Pinhole{Protocol: 6, InternalAddr: a6, InternalPort: 80}
	all := pinhole.Pinhole{Protocol: 6, InternalAddr: a6}
	for _, c := range []struct {
		name    string
		p       pinhole.Pinhole
		src     netip.AddrPort
		dst, to netip.AddrPort
		want    bool
	}{
		{"NAPT, its internal endpoint", napt, rem, ap(ext, 5000), ap(a4, 80), true},
		{"NAPT, another internal port", napt, rem, ap(ext, 5000), ap(a4, 81), false},
		{"NAPT, another internal host", napt, rem, ap(ext, 5000), ap(b4, 80), false},
		{"NAPT, another external port", napt, rem, ap(ext, 5001), ap(a4, 80), false},
		{"redirect, its internal port", redir, rem6, ap(a6, 80), ap(a6, 443), true},
		{"redirect, another internal port", redir, rem6, ap(a6, 80), ap(a6, 8443), false},
		{"redirect, untranslated flow", redir, rem6, ap(a6, 80), ap(a6, 80), false},
		{"plain, untranslated", plain, rem6, ap(a6, 80), ap(a6, 80), true},
		{"plain, a flow an ended redirect DNAT-ed elsewhere", plain, rem6, ap(a6, 80), ap(a6, 443), false},
		{"all-ports, untranslated", all, rem6, ap(a6, 80), ap(a6, 80), true},
		{"all-ports, DNAT-ed to a port it admits", all, rem6, ap(a6, 80), ap(a6, 443), true},
	} {
		t.Run(c.name, func(t *testing.T) {
			a := ctAdmits{{addr: c.dst.Addr(), proto: 6, port: c.dst.Port()}: {c.p}}
			if got := a.admitted(ctTarget{addr: c.dst.Addr(), proto: 6, port: c.dst.Port()}, c.src, c.to); got != c.want {
				t.Errorf("admitted %v, want %v", got, c.want)
			}
		})
	}
}
