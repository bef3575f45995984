package server

import (
	"net/netip"
	"testing"
	"time"

	vnetlink "github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// Review of h/ctall (h/revall, 2026-12-05).

// TestSpareWildDelivery: a wildcard filter's flow (an ended IPv6
// all-ports MAP's) is spared by a live lease only where that
// lease would deliver it (pinhole.Pinhole.AdmitsFlow with the reply
// tuple's source), as the filtered and generic walks spare an exact
// filter's flows (review h/revctl). A redirect 8080 → 8443 made while the
// all-ports MAP was live admits packets sent to 8080 but DNATs them to
// 8443: a connection the all-ports MAP admitted at 8080 itself is
// admitted by no live mapping. Fails with pinhole.Pinhole.Admits (the
// sent address only): the untranslated 8080 flow, and a flow an ended
// redirect delivered at 443 to plain port MAP 80's port, kept.
func TestSpareWildDelivery(t *testing.T) {
	h := newHarness(t, func(_ *Config, p *policy.Config) { p.AllowAllPorts = true })
	resp := h.do(mapReq(addrA, pcp.ProtoTCP, 8443, 8080, time.Hour, 1))
	h.expect(resp, pcp.Success)
	if resp.Map.ExternalPort != 8080 {
		t.Fatalf("redirect got external port %d, want 8080", resp.Map.ExternalPort)
	}
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 80, 80, time.Hour, 2)), pcp.Success)
	ap := netip.AddrPortFrom
	for _, c := range []struct {
		name    string
		dst, to uint16
		keep    bool
	}{
		{"redirect, delivered at its internal port", 8080, 8443, true},
		{"redirect's port, untranslated (the all-ports MAP's)", 8080, 8080, false},
		{"redirect's port, delivered at another port", 8080, 9000, false},
		{"plain port MAP, untranslated", 80, 80, true},
		{"plain port MAP's port, delivered at 443 (an ended redirect's)", 80, 443, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			hs := []ctHit{{t: ctTarget{addr: addrA, proto: protoTCP, port: c.dst}, src: remote, to: ap(addrA, c.to)}}
			h.s.spareLive(hs)
			if hs[0].keep != c.keep {
				t.Errorf("kept %v, want %v", hs[0].keep, c.keep)
			}
			// The generic walk's (no CTA_FILTER) wildcard filter.
			w := ctFilter{t: ctTarget{addr: addrA, proto: protoTCP}}
			k := keepLive{nf: w.netlinkFilter(), s: h.s}
			fl := &vnetlink.ConntrackFlow{FamilyType: unix.AF_INET6}
			fl.Forward = vnetlink.IPTuple{Protocol: protoTCP, SrcIP: remote.Addr().AsSlice(), SrcPort: remote.Port(), DstIP: addrA.AsSlice(), DstPort: c.dst}
			fl.Reverse = vnetlink.IPTuple{Protocol: protoTCP, SrcIP: addrA.AsSlice(), SrcPort: c.to, DstIP: remote.Addr().AsSlice(), DstPort: remote.Port()}
			if ended := k.MatchConntrackFlow(fl); ended == c.keep {
				t.Errorf("generic walk: ended %v, want %v", ended, !c.keep)
			}
		})
	}
}

// TestE2EAllPortsEndRedirectTakenEndsFlow (root, namespaces): an IPv6
// TCP all-ports MAP admits a connection to port 9850; then, in one batch,
// the client maps port 9851 with external port 9850 (a redirect: the
// kernel DNATs new packets to 9850 over to 9851) and deletes the
// all-ports MAP. The connection to 9850 itself is admitted by no live
// mapping, yet the redirect, live by the end, "admitted" it as sent
// (pinhole.Pinhole.Admits), so spareWild (now spareLive) kept it, tracked and carrying
// data. Fails that way with Admits in spareLive: the flow still tracked
// after the batch's flush.
func TestE2EAllPortsEndRedirectTakenEndsFlow(t *testing.T) {
	l := newLab(t, func(_ *Config, p *policy.Config) {
		p.MinLifetime = time.Second
		p.AllowAllPorts = true
	})
	const port = 9850
	if resp := l.pcp(mapReq(l.topo.ClientV6, pcp.ProtoTCP, 0, 0, time.Hour, 1)); resp.Result != pcp.Success {
		t.Fatalf("all-ports MAP: %+v", resp)
	}
	serveEcho(t, l.topo.Client, netip.AddrPortFrom(l.topo.ClientV6, port))
	serveEcho(t, l.topo.Client, netip.AddrPortFrom(l.topo.ClientV6, port+1))
	src, dst := netip.AddrPortFrom(l.topo.InternetV6, port+40000), netip.AddrPortFrom(l.topo.ClientV6, port)
	conn := dialIn(t, l.topo.Internet, src, dst)
	if err := echoOnce(conn); err != nil {
		t.Fatalf("through the all-ports MAP: %v", err)
	}
	req := func(r *pcp.Request) Request {
		return Request{Local: l.server6(), Source: netip.AddrPortFrom(l.topo.ClientV6, 5351), Iface: l.topo.HostLANIf, Data: pcp.AppendRequest(nil, r)}
	}
	out := l.srv.HandleBatch([]Request{
		req(mapReq(l.topo.ClientV6, pcp.ProtoTCP, port+1, port, time.Hour, 2)),
		req(mapReq(l.topo.ClientV6, pcp.ProtoTCP, 0, 0, 0, 1)),
	})
	for i, b := range out {
		var r pcp.Response
		if err := pcp.ParseResponse(b, &r); err != nil || r.Result != pcp.Success {
			t.Fatalf("request %d: %+v %v", i, r, err)
		}
		if i == 0 && r.Map.ExternalPort != port {
			t.Fatalf("MAP of %d got external port %d, want %d (the redirect)", port+1, r.Map.ExternalPort, port)
		}
	}
	if n := len(l.srv.Leases()); n != 1 {
		t.Fatalf("%d leases, want the redirect only", n)
	}
	// HandleBatch returned without waiting for the walk (the ruleset
	// cut the IPv6 MAP's flows: mustWaitFlush); wait for it.
	l.srv.waitConntrack()
	if f := l.ctFlow(t, src, dst); f != nil {
		t.Errorf("the all-ports MAP's connection is still tracked: %s", f)
	}
	if err := echoOnce(conn); err == nil {
		t.Error("the all-ports MAP's connection still carries data")
	}
}
