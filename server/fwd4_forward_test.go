package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// TestForwardedPortEndsUnmovable (h/fwd4): the IPv4 leases that cannot
// move off a port the host's own DNAT rules forward since they were
// granted (a PREFER_FAILURE MAP: RFC 6887 §13.2; a PEER: its remote
// peer knows its port, §12) are ended by housekeeping's read that finds
// the forward (endForwarded, after refresh): out of the store and the
// fake kernel, logged. The rest stay: a plain MAP (moved at its renewal,
// h/hunt2), a PREFER_FAILURE MAP on a port not forwarded, the other
// protocol's same port. Before the sweep a PEER renewal on the forwarded
// port is refused CANNOT_PROVIDE_EXTERNAL with nothing changed (HDR-06);
// after it both renewals are CANNOT_PROVIDE_EXTERNAL and make nothing
// (PF-04, PEER-04). Judged by the store, the fake kernel's elements and
// the log. Before h/fwd4 (on main: the PREFER_FAILURE mapping refused
// but kept until it expired, the PEER renewed on the forwarded port):
// 'PEER renewal before the sweep: SUCCESS, external port 1446: want
// CANNOT_PROVIDE_EXTERNAL' and, with endForwarded's body removed,
// 'PREFER_FAILURE MAP TCP 1445: lease present true, kernel element true
// after the sweep; want false, false'.
func TestForwardedPortEndsUnmovable(t *testing.T) {
	h, ff := forwardHarness(t)
	rem := netip.MustParseAddrPort("203.0.113.9:5000")
	pfMap := func(proto pcp.Protocol, port uint16, n byte) pcp.Response {
		r := mapReq(v4A, proto, port, port, time.Hour, n)
		r.Map.ExternalAddr = ext4
		r.Options.PreferFailure = true
		return h.do(r)
	}
	peer := func() pcp.Response {
		r := peerReq(v4A, pcp.ProtoTCP, 1446, rem, time.Hour, 9)
		r.Map.ExternalAddr, r.Map.ExternalPort = ext4, 1446
		return h.do(r)
	}
	plain := func() pcp.Response {
		r := mapReq(v4A, pcp.ProtoTCP, 1447, 1447, time.Hour, 10)
		r.Map.ExternalAddr = ext4
		return h.do(r)
	}
	type row struct {
		name  string
		proto uint8
		port  uint16 // internal = external
		peer  bool
		ends  bool
	}
	rows := []row{
		{"PREFER_FAILURE MAP TCP 1445", protoTCP, 1445, false, true},
		{"PEER TCP 1446", protoTCP, 1446, true, false /* set below */},
		{"plain MAP TCP 1447", protoTCP, 1447, false, false},
		{"PREFER_FAILURE MAP TCP 1448, not forwarded", protoTCP, 1448, false, false},
		{"PREFER_FAILURE MAP UDP 1445, only TCP forwarded", protoUDP, 1445, false, false},
	}
	rows[1].ends = true
	for _, r := range []pcp.Response{
		pfMap(pcp.ProtoTCP, 1445, 8), peer(), plain(), pfMap(pcp.ProtoTCP, 1448, 11), pfMap(pcp.ProtoUDP, 1445, 12),
	} {
		if r.Result != pcp.Success || r.Map.ExternalPort < 1445 || r.Map.ExternalPort > 1448 {
			t.Fatalf("first mappings: %v, external port %d", r.Result, r.Map.ExternalPort)
		}
	}
	state := func(r row) (leased, element bool) {
		for k, l := range h.st.Leases() {
			if k.Protocol == r.proto && k.InternalAddr == v4A && k.InternalPort == r.port && (l.Kind == store.KindPeer) == r.peer {
				leased = l.ExternalPort == r.port
			}
		}
		for p := range h.fw.Holes() {
			if p.Protocol == r.proto && p.ExternalAddr == ext4 && p.ExternalPort == r.port && (p.RemotePort == rem.Port()) == r.peer {
				element = true
			}
		}
		return leased, element
	}

	var f pinhole.ForeignDNAT
	for _, p := range []uint16{1445, 1446, 1447} {
		f.TCP.Add(p)
	}
	ff.set(&f, nil)
	h.s.hostPorts.refresh()

	// Read, not yet swept: the PEER's renewal is refused, nothing changes.
	before := h.snap()
	if r := peer(); r.Result != pcp.CannotProvideExternal {
		t.Errorf("PEER renewal before the sweep: %v, external port %d: want CANNOT_PROVIDE_EXTERNAL", r.Result, r.Map.ExternalPort)
	}
	h.unchanged(before)

	h.s.endForwarded() // housekeeping's step after the read
	for _, r := range rows {
		leased, element := state(r)
		if leased == r.ends || element == r.ends {
			t.Errorf("%s: lease present %v, kernel element %v after the sweep; want %v, %v", r.name, leased, element, !r.ends, !r.ends)
		}
	}
	if n := h.logs.FilterMessage("revoked: the host's own DNAT rules forward its external port now").Len(); n != 2 {
		t.Errorf("%d leases logged as ended by the forward, want 2", n)
	}

	// Their renewals now: refused, nothing made; the plain MAP moves.
	before = h.snap()
	if r := pfMap(pcp.ProtoTCP, 1445, 8); r.Result != pcp.CannotProvideExternal {
		t.Errorf("PREFER_FAILURE renewal after the sweep: %v, external port %d: want CANNOT_PROVIDE_EXTERNAL", r.Result, r.Map.ExternalPort)
	}
	if r := peer(); r.Result != pcp.CannotProvideExternal {
		t.Errorf("PEER renewal after the sweep: %v, external port %d: want CANNOT_PROVIDE_EXTERNAL", r.Result, r.Map.ExternalPort)
	}
	h.unchanged(before)
	if r := plain(); r.Result != pcp.Success || r.Map.ExternalPort == 1447 {
		t.Errorf("plain MAP renewal: %v, external port %d: want SUCCESS on another port", r.Result, r.Map.ExternalPort)
	}

	// A second sweep with the same read does nothing (no news).
	h.s.endForwarded()
	if n := h.logs.FilterMessage("revoked: the host's own DNAT rules forward its external port now").Len(); n != 2 {
		t.Errorf("after a second sweep: %d leases logged as ended, want 2", n)
	}
}

// TestForwardedWhileDownEndsUnmovable (h/fwd4): a PREFER_FAILURE MAP
// restored on a port the admin forwarded while pcpd was down is ended by
// the first read's sweep after the start (the first read is news).
func TestForwardedWhileDownEndsUnmovable(t *testing.T) {
	h, ff := forwardHarness(t)
	r := mapReq(v4A, pcp.ProtoTCP, 1500, 1500, time.Hour, 3)
	r.Map.ExternalAddr = ext4
	r.Options.PreferFailure = true
	if resp := h.do(r); resp.Result != pcp.Success || resp.Map.ExternalPort != 1500 {
		t.Fatalf("first mapping: %v, external port %d", resp.Result, resp.Map.ExternalPort)
	}
	var f pinhole.ForeignDNAT
	f.TCP.Add(1500)
	ff.set(&f, nil)
	h.start() // a restart on the same store and kernel
	h.s.foreign = ff
	h.s.hostPorts.refresh()
	h.s.endForwarded()
	if _, ok := h.lease(ownerA, protoTCP, v4A, 1500); ok {
		t.Errorf("the restored PREFER_FAILURE mapping on the forwarded 1500 is still leased after the first read's sweep")
	}
	for p := range h.fw.Holes() {
		if p.ExternalAddr == ext4 && p.ExternalPort == 1500 {
			t.Errorf("kernel element still on the forwarded 1500: %v", p)
		}
	}
}

// TestForwardedRangeEndsInChunks (h/fwd4): an admin's forward of a range
// holding more PEERs than one sweep transaction ends (revokeChunk) ends
// them all, each logged once, the other protocol's kept.
func TestForwardedRangeEndsInChunks(t *testing.T) {
	const n = revokeChunk + 44
	ff := &fakeForeign{}
	ff.set(&pinhole.ForeignDNAT{}, nil)
	h := newHarness(t, func(c *Config, p *policy.Config) {
		c.IPv4Ports = PortRange{First: 400, Last: 65535}
		c.RateLimit, c.RateBurst, c.OwnerBurst = 1e12, 1<<30, 1<<30
		p.MaxLeasesPerClient = 4 * n
	})
	h.startWith(nil, func(s *Server) { s.foreign = ff })
	rem := netip.MustParseAddrPort("203.0.113.9:5000")
	for i := range n {
		for _, proto := range []pcp.Protocol{pcp.ProtoTCP, pcp.ProtoUDP} {
			port := uint16(42000 + i)
			r := peerReq(v4A, proto, port, rem, time.Hour, byte(i))
			r.Map.ExternalAddr, r.Map.ExternalPort = ext4, port
			if resp := h.do(r); resp.Result != pcp.Success || resp.Map.ExternalPort != port {
				t.Fatalf("PEER %v %d: %v, external port %d", proto, port, resp.Result, resp.Map.ExternalPort)
			}
		}
	}
	var f pinhole.ForeignDNAT
	for p := uint16(1024); p < 60000; p++ {
		f.TCP.Add(p)
	}
	ff.set(&f, nil)
	h.s.hostPorts.refresh()
	h.s.endForwarded()
	tcp, udp := 0, 0
	for _, l := range h.st.Leases() {
		if l.Protocol == protoTCP {
			tcp++
		} else {
			udp++
		}
	}
	logged := h.logs.FilterMessage("revoked: the host's own DNAT rules forward its external port now").Len()
	if tcp != 0 || udp != n || logged != n {
		t.Errorf("after the sweep: %d TCP PEERs leased (want 0), %d UDP (want %d); %d logged as ended (want %d)", tcp, udp, n, logged, n)
	}
	for p := range h.fw.Holes() {
		if p.Protocol == protoTCP {
			t.Fatalf("kernel element left on a forwarded TCP port: %v", p)
		}
	}
}

// TestForwardedTupleSharing (h/fwd4): one internal tuple has one external
// endpoint, a MAP and a PEER on it share it (MAP-08, PEER-05). Once the
// host's own DNAT rules forward that endpoint: a MAP renewed there moves
// to another port and the tuple's PEER, which cannot move, ends with it
// in the same commit (logged), instead of the MAP taking the PEER's
// forwarded port again; a new PEER next to a MAP still on a forwarded port
// is refused CANNOT_PROVIDE_EXTERNAL with nothing changed. Before (main,
// and ce73124): 'MAP renewed next to a PEER on the forwarded 1446:
// SUCCESS, external port 1446: want another port', and 'new PEER next to
// a MAP on the forwarded 1450: SUCCESS, external port 1450'.
func TestForwardedTupleSharing(t *testing.T) {
	h, ff := forwardHarness(t)
	rem := netip.MustParseAddrPort("203.0.113.9:5000")
	peer := func(port, sugg uint16) pcp.Response {
		r := peerReq(v4A, pcp.ProtoTCP, port, rem, time.Hour, 9)
		r.Map.ExternalAddr, r.Map.ExternalPort = ext4, sugg
		return h.do(r)
	}
	mapping := func(port uint16) pcp.Response {
		r := mapReq(v4A, pcp.ProtoTCP, port, 0, time.Hour, 10)
		r.Map.ExternalAddr = ext4
		return h.do(r)
	}
	h.expect(peer(1446, 1446), pcp.Success)
	if r := mapping(1446); r.Result != pcp.Success || r.Map.ExternalPort != 1446 {
		t.Fatalf("MAP next to the PEER: %v, external port %d: want the PEER's 1446", r.Result, r.Map.ExternalPort)
	}
	if r := mapping(1450); r.Result != pcp.Success || r.Map.ExternalPort != 1450 {
		t.Fatalf("MAP of 1450: %v, external port %d", r.Result, r.Map.ExternalPort)
	}
	var f pinhole.ForeignDNAT
	f.TCP.Add(1446)
	f.TCP.Add(1450)
	ff.set(&f, nil)
	h.s.hostPorts.refresh() // read, not swept

	r := mapping(1446)
	if r.Result != pcp.Success || r.Map.ExternalPort == 1446 {
		t.Errorf("MAP renewed next to a PEER on the forwarded 1446: %v, external port %d: want another port", r.Result, r.Map.ExternalPort)
	}
	for k, l := range h.st.Leases() {
		if l.Kind == store.KindPeer && k.InternalPort == 1446 {
			t.Errorf("the tuple's PEER on the forwarded 1446 is still leased (on %d)", l.ExternalPort)
		}
	}
	for p := range h.fw.Holes() {
		if p.ExternalPort == 1446 {
			t.Errorf("kernel element still on the forwarded 1446: %v", p)
		}
	}
	if n := h.logs.FilterMessage("revoked: the host's own DNAT rules forward its external port now").Len(); n != 1 {
		t.Errorf("%d leases logged as ended by the forward, want 1 (the PEER)", n)
	}

	before := h.snap()
	if r := peer(1450, 0); r.Result != pcp.CannotProvideExternal {
		t.Errorf("new PEER next to a MAP on the forwarded 1450: %v, external port %d: want CANNOT_PROVIDE_EXTERNAL", r.Result, r.Map.ExternalPort)
	}
	h.unchanged(before)
}

// TestForwardedUnsettledEndsNothing (review h/revf4): a read of the
// host's DNAT rules that another process's commits moved under each try
// (pinhole.ForeignDNAT.Unsettled: it may report a forward that exists in
// no generation of the ruleset, TestForeignReadAcrossCommit) ends no
// lease: its ports are reserved, guessed (a new mapping does not get the
// port, the PEER and the PREFER_FAILURE MAP on it stay), and the next
// read that holds still ends them if the forward is real. Before (the
// answer installed as any other) the sweep ended both on the phantom
// forward; on main the test does not build (no Unsettled).
func TestForwardedUnsettledEndsNothing(t *testing.T) {
	h, ff := forwardHarness(t)
	rem := netip.MustParseAddrPort("203.0.113.9:5000")
	pf := mapReq(v4A, pcp.ProtoTCP, 1445, 1445, time.Hour, 1)
	pf.Map.ExternalAddr = ext4
	pf.Options.PreferFailure = true
	peer := peerReq(v4A, pcp.ProtoTCP, 1446, rem, time.Hour, 2)
	peer.Map.ExternalAddr, peer.Map.ExternalPort = ext4, 1446
	for _, r := range []pcp.Response{h.do(pf), h.do(peer)} {
		if r.Result != pcp.Success {
			t.Fatalf("first mappings: %v, external port %d", r.Result, r.Map.ExternalPort)
		}
	}
	held := func() (n int) {
		for _, l := range h.st.Leases() {
			if l.ExternalPort == 1445 || l.ExternalPort == 1446 {
				n++
			}
		}
		return n
	}
	var f pinhole.ForeignDNAT
	f.TCP.Add(1445)
	f.TCP.Add(1446)
	f.TCP.Add(1447)
	f.Unsettled = true
	ff.set(&f, nil)
	h.s.hostPorts.refresh()
	h.s.endForwarded()
	if n := held(); n != 2 {
		t.Errorf("%d of the PREFER_FAILURE MAP and the PEER left after the sweep of an unsettled read, want both", n)
	}
	if !h.s.hostPorts.forwarded(protoTCP, 1447) || h.s.hostPorts.forwardedSure(protoTCP, 1447) {
		t.Errorf("1447 of the unsettled read: forwarded %v, sure %v; want reserved, not sure", h.s.hostPorts.forwarded(protoTCP, 1447), h.s.hostPorts.forwardedSure(protoTCP, 1447))
	}
	if r := h.do(mapReq(v4B, pcp.ProtoTCP, 1447, 1447, time.Hour, 3)); r.Result != pcp.Success || r.Map.ExternalPort == 1447 {
		t.Errorf("MAP suggesting 1447: %v, external port %d; want another port", r.Result, r.Map.ExternalPort)
	}
	// The same forward read holding still: now they end.
	f.Unsettled = false
	ff.set(&f, nil)
	h.s.hostPorts.refresh()
	h.s.endForwarded()
	if n := held(); n != 0 {
		t.Errorf("%d of them left after a settled read's sweep, want 0", n)
	}
}
