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
// all-ports MAP's) is spared by a lease live throughout only where that
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
	end := h.clock.Now()
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
			hs := []ctWildHit{{t: ctTarget{addr: addrA, proto: protoTCP, port: c.dst}, src: remote, to: ap(addrA, c.to), end: end}}
			h.s.spareWild(hs)
			if hs[0].keep != c.keep {
				t.Errorf("kept %v, want %v", hs[0].keep, c.keep)
			}
			// The generic walk's (no CTA_FILTER) wildcard filter.
			w := ctFilter{t: ctTarget{addr: addrA, proto: protoTCP}}
			w.setEnd(end)
			k := keepLive{nf: w.netlinkFilter(), s: h.s, end: w.end()}
			fl := &vnetlink.ConntrackFlow{FamilyType: unix.AF_INET6}
			fl.Forward = vnetlink.IPTuple{Protocol: protoTCP, SrcIP: remote.Addr().AsSlice(), SrcPort: remote.Port(), DstIP: addrA.AsSlice(), DstPort: c.dst}
			fl.Reverse = vnetlink.IPTuple{Protocol: protoTCP, SrcIP: addrA.AsSlice(), SrcPort: c.to, DstIP: remote.Addr().AsSlice(), DstPort: remote.Port()}
			if ended := k.MatchConntrackFlow(fl); ended == c.keep {
				t.Errorf("generic walk: ended %v, want %v", ended, !c.keep)
			}
		})
	}
}
