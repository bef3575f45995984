package server

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestE2EOtherInterfaceCannotActAsPeer: WireGuard checks a packet's source
// only against the peers of the interface it arrived on (policy.WireGuard's
// doc). A peer on a second served interface whose AllowedIPs are too short
// to own anything (a full-tunnel ::/0, which policy ignores for ownership)
// may still send from any source there, the first interface's client's
// addresses included; pcpd, which looks the source up without the arrival
// interface, must not take such a request as that client's (SEC-02: each
// peer maps only addresses it may source). The attacker's MAP for the
// client's address must change nothing: no lease, no pinhole, and the
// client's port stays closed to the Internet (real TCP).
func TestE2EOtherInterfaceCannotActAsPeer(t *testing.T) {
	l := newLab(t)
	victim := netip.AddrPortFrom(l.topo.ClientV6, 2222)
	l.topo.Client.ServeTCP(t, victim.String())
	second := l.serveSecondWG(t, 51898)
	if l.reach(victim) {
		t.Fatal("open before any MAP")
	}

	// The attacker: its own namespace and underlay, a full-tunnel peer of
	// the second interface, sending from the client's address.
	serverAddr := netip.MustParseAddr("2001:db8:2::1")
	att := l.fullTunnelAttacker(t, "rvq", second, 51898, netip.MustParsePrefix("10.98.0.0/30"), serverAddr)

	req := pcp.AppendRequest(nil, mapReq(l.topo.ClientV6, pcp.ProtoTCP, victim.Port(), 0, time.Hour, 7))
	var reply []byte
	err := att.Do(func() error {
		c, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(l.topo.ClientV6, 0)),
			net.UDPAddrFromAddrPort(netip.AddrPortFrom(serverAddr, Port)))
		if err != nil {
			return err
		}
		defer c.Close()
		buf := make([]byte, 1100)
		for range 6 {
			c.Write(req)
			c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
			if n, err := c.Read(buf); err == nil {
				reply = buf[:n]
				return nil
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var resp pcp.Response
	if reply != nil {
		if err := pcp.ParseResponse(reply, &resp); err != nil {
			t.Fatalf("reply % x: %v", reply, err)
		}
		t.Logf("attacker's MAP from %s over %s answered %v", l.topo.ClientV6, second, resp.Result)
	}
	time.Sleep(300 * time.Millisecond)
	if ls := l.srv.Leases(); len(ls) != 0 {
		t.Errorf("a peer of %s made leases as the client of %s: %+v", second, l.topo.HostLANIf, ls)
	}
	if hs := l.kernelHoles(); len(hs) != 0 {
		t.Errorf("kernel pinholes after the attacker's MAP: %v", hs)
	}
	if l.reach(victim) {
		t.Errorf("%v reachable from the Internet after another interface's peer asked for it", victim)
	}
}

// boundOwnership is ownership bound to interfaces, as WireGuard's (tests
// only): each owner's sources are its own only on its one interface.
// Not embedded: the policy's table fast path would see the Static.
type boundOwnership struct {
	own *policy.Static
	on  map[policy.OwnerID]string
}

func (b boundOwnership) Lookup(a netip.Addr) (policy.Owner, bool) { return b.own.Lookup(a) }
func (b boundOwnership) Owners() []policy.Owner                   { return b.own.Owners() }
func (b boundOwnership) LookupOn(a netip.Addr, iface string) (policy.Owner, bool) {
	if o, ok := b.own.Lookup(a); ok && b.on[o.ID] == iface {
		return o, true
	}
	return policy.Owner{}, false
}

// TestOwnerArrivalInterface: every path that decides a request's owner
// passes the interface the request arrived on (Request.Iface, the
// reader's socket's): the engine's MAP and NAT-PMP (HandleBatch), and
// the readers' early answers (earlyTallied). A source is its owner's only
// on the owner's interface; elsewhere, or with no interface known
// (Handle), it is nobody's: NOT_AUTHORIZED, and nothing changes.
func TestOwnerArrivalInterface(t *testing.T) {
	st, err := policy.NewStatic(map[string][]netip.Prefix{
		"a": {netip.MustParsePrefix("2001:db8:a::/48"), netip.MustParsePrefix("10.0.0.0/28")},
		"b": {netip.MustParsePrefix("2001:db8:b::/48"), netip.MustParsePrefix("10.0.0.16/28")},
	})
	if err != nil {
		t.Fatal(err)
	}
	h := newHarness(t)
	h.own = boundOwnership{own: st, on: map[policy.OwnerID]string{"static:a": "wg0", "static:b": "wg1"}}
	h.start()
	pmpReq := pcp.AppendPMPRequest(nil, &pcp.PMPRequest{Opcode: pcp.PMPOpMapTCP, InternalPort: 8080, Lifetime: time.Hour})
	for i, tc := range []struct {
		src   netip.Addr
		iface string
		pmp   bool
		ok    bool
	}{
		{addrA, "wg1", false, false}, // b's interface, as a
		{addrA, "", false, false},
		{addrA, "eth0", false, false},
		{addrB, "wg0", false, false},
		{v4A, "wg1", true, false},
		{v4A, "", true, false},
		{addrA, "wg0", false, true},
		{addrB, "wg1", false, true},
		{v4A, "wg0", true, true},
	} {
		b, local := pcp.AppendRequest(nil, mapReq(tc.src, pcp.ProtoTCP, uint16(1000+i), 0, time.Hour, 1)), local6
		if tc.pmp {
			b, local = pmpReq, local4
		}
		src := netip.AddrPortFrom(tc.src, 40000)
		if !tc.pmp {
			// The reader's early answer: a refusal there, the engine's
			// (not handled) otherwise.
			reply, handled := h.s.earlyTallied(nil, nil, b, src, tc.iface, h.clock.Now())
			if handled == tc.ok || !tc.ok && (len(reply) < 4 || pcp.ResultCode(reply[3]) != pcp.NotAuthorized) {
				t.Errorf("early: %v on %q: handled %v, reply % x", tc.src, tc.iface, handled, reply)
			}
		}
		before := h.snap()
		out := h.s.HandleBatch([]Request{{Local: local, Source: src, Iface: tc.iface, Data: b}})[0]
		var got bool
		if tc.pmp {
			var r pcp.PMPResponse
			if err := pcp.ParsePMPResponse(out, &r); err != nil {
				t.Fatalf("reply % x: %v", out, err)
			}
			got = r.Result == pcp.PMPSuccess
			if !got && r.Result != pcp.PMPNotAuthorized {
				t.Errorf("NAT-PMP: %v on %q: %v", tc.src, tc.iface, r.Result)
			}
		} else {
			var r pcp.Response
			if err := pcp.ParseResponse(out, &r); err != nil {
				t.Fatalf("reply % x: %v", out, err)
			}
			got = r.Result == pcp.Success
			if !got && r.Result != pcp.NotAuthorized {
				t.Errorf("engine: %v on %q: %v", tc.src, tc.iface, r.Result)
			}
		}
		if got != tc.ok {
			t.Errorf("engine: %v on %q: success %v, want %v", tc.src, tc.iface, got, tc.ok)
		}
		if !tc.ok {
			h.unchanged(before)
		}
	}
	// Handle knows no interface: a's request is nobody's.
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 2000, 0, time.Hour, 1)), pcp.NotAuthorized)
}
