package conformance

import (
	"bytes"
	"fmt"
	"net/netip"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// NAT-PMP checks (PROTOCOL.md PMP; section numbers are RFC 6886's).

// pmp asks a NAT-PMP request on s and decodes the reply.
func (s *sock) pmp(b []byte) *pmpReply {
	raw := s.raw(b)
	r, err := parsePMP(raw)
	if err != nil {
		s.e.failf("NAT-PMP reply to %s: %v", hexdump(b), err)
	}
	return r
}

// pmpMapping creates a NAT-PMP mapping expecting success and deletes it
// at the end of the check.
func (s *sock) pmpMapping(op byte, intPort, sugg uint16, life uint32) *pmpReply {
	r := s.pmp(pmpMap(op, intPort, sugg, life))
	if r.Result != pcp.PMPSuccess || r.Op != 0x80|op {
		s.e.failf("NAT-PMP map op %d int %d → %s", op, intPort, r)
	}
	s.e.cleanup(func() {
		s.send(pmpMap(op, intPort, 0, 0))
		s.recv(time.Now().Add(s.e.Timeout / 2))
	})
	return r
}

func ver02(e *Env) Result {
	var s *sock
	switch {
	case e.Client.Is6():
		s = e.sock()
	case !e.NATPMP:
		s = e.sock4()
	default:
		e.naf("only an IPv4 path, and it serves NAT-PMP")
	}
	req := []byte{0, 1, 0, 0, 0x1f, 0x90, 0x1f, 0x90, 0, 0, 0x1c, 0x20}
	b := s.try(req)
	if b == nil {
		return failr("NAT-PMP map request from %s: no reply (RFC 6887 §9, App. A: UNSUPP_VERSION)", s.local.Addr())
	}
	r, _ := parseResponse(b)
	if r == nil || r.Version != pcp.Version || r.Result != pcp.UnsuppVersion {
		return failr("NAT-PMP map request from %s → %s, want version 2 UNSUPP_VERSION", s.local.Addr(), hexdump(b))
	}
	return pass("from %s: %s → %s", s.local.Addr(), hexdump(req), hexdump(b))
}

var pmpChecks = []Check{
	{ID: "PMP-01", Section: "RFC 6886 §1.1, RFC 6887 App. A", Level: Must, Name: "NAT-PMP only over IPv4: version 0 from IPv6 → UNSUPP_VERSION", Run: ver02},
	{ID: "PMP-02", Section: "RFC 6886 §3.5", Level: Must, Name: "unsupported NAT-PMP opcode → echo with opcode+128, result 5", Needs: []Need{NeedNATPMP}, Run: func(e *Env) Result {
		s := e.sock4()
		req := []byte{0, 7, 0, 0, 0xaa, 0xbb}
		b := s.raw(req)
		if len(b) < 4 || !bytes.Equal(b[:4], []byte{0, 0x87, 0, 5}) {
			return failr("%s → %s, want 00 87 0005 …", hexdump(req), hexdump(b))
		}
		note := ""
		if !bytes.Equal(b, []byte{0, 0x87, 0, 5, 0xaa, 0xbb}) {
			note = " (pcpd echoes the rest; the RFC does not fix the length)"
		}
		return pass("%s → %s%s", hexdump(req), hexdump(b), note)
	}},
	{ID: "PMP-03", Section: "RFC 6886 §3.2, §3.3", Level: Must, Name: "address reply 12 octets, map reply 16 octets", Needs: []Need{NeedNATPMP}, Run: func(e *Env) Result {
		s := e.sock4()
		a := s.pmp(pmpAddress())
		if len(a.Raw) != 12 || a.Op != 0x80 || a.Result != pcp.PMPSuccess || a.Ext != e.ExternalV4 {
			return failr("address request → %s, want 12 octets, success, %s", a, e.ExternalV4)
		}
		p := e.port()
		m := s.pmpMapping(2, p, p, 3600)
		if len(m.Raw) != 16 || m.IntPort != p {
			return failr("map request → %s", m)
		}
		return pass("address → %s; map → 16 octets", a.Ext)
	}},
	{ID: "PMP-04", Section: "RFC 6886 §3.3", Level: Must, Name: "suggested port granted if free; mapping carries traffic", Needs: []Need{NeedNATPMP}, Run: func(e *Env) Result {
		s := e.sock4()
		p, q := e.port(), e.port()
		m := s.pmpMapping(1, p, q, 3600)
		detail := fmt.Sprintf("UDP int %d sugg %d → %d", p, q, m.ExtPort)
		if m.ExtPort != q {
			detail += " (suggestion not honoured though free)"
		}
		if e.Data != nil {
			e.serve(protoUDP, p)
			if err := e.probe(protoUDP, netip.Addr{}, netip.AddrPortFrom(e.ExternalV4, m.ExtPort)); err != nil {
				return failr("%s; inbound UDP fails: %v", detail, err)
			}
			detail += "; inbound UDP echo works"
		}
		return pass("%s", detail)
	}},
	{ID: "PMP-05", Section: "RFC 6886 §3.3", Level: Must, Name: "existing mapping: same port, lifetime refreshed", Needs: []Need{NeedNATPMP}, Run: func(e *Env) Result {
		s := e.sock4()
		p := e.port()
		m := s.pmpMapping(2, p, p, 3600)
		again := s.pmp(pmpMap(2, p, p+5, 3600))
		if again.Result != pcp.PMPSuccess || again.ExtPort != m.ExtPort {
			return failr("repeat → %s, first had %d", again, m.ExtPort)
		}
		return pass("repeat → %d, lifetime %d", again.ExtPort, again.Life)
	}},
	{ID: "PMP-06", Section: "RFC 6886 §3.3", Level: Must, Name: "other protocol's port stays reserved for the owner", Needs: []Need{NeedNATPMP, NeedOther4}, Run: func(e *Env) Result {
		a := e.sock4()
		p := e.port()
		x := a.pmpMapping(2, p, p, 3600).ExtPort
		b := e.sockFrom(e.OtherClient4, e.Server4)
		bm := b.pmpMapping(1, e.port(), x, 3600)
		if bm.ExtPort == x {
			return failr("A holds TCP %d; B got UDP %d", x, bm.ExtPort)
		}
		am := a.pmpMapping(1, p, x, 3600)
		if am.ExtPort != x {
			return failr("A holds TCP %d; A's UDP for the same port got %d", x, am.ExtPort)
		}
		return pass("A TCP %d; B UDP → %d; A UDP → %d", x, bm.ExtPort, am.ExtPort)
	}},
	{ID: "PMP-07", Section: "RFC 6886 §3.4", Level: Must, Name: "lifetime 0 deletes: ext 0, lifetime 0; nonexistent same", Needs: []Need{NeedNATPMP}, Run: func(e *Env) Result {
		s := e.sock4()
		p := e.port()
		s.pmpMapping(2, p, p, 3600)
		for i, what := range []string{"delete", "delete again"} {
			r := s.pmp(pmpMap(2, p, 1234, 0))
			if r.Result != pcp.PMPSuccess || r.IntPort != p || r.ExtPort != 0 || r.Life != 0 || len(r.Raw) != 16 {
				return failr("%s (%d) → %s, want success, int %d, ext 0, lifetime 0", what, i, r, p)
			}
		}
		return pass("delete ×2 → success, int %d, ext 0, lifetime 0", p)
	}},
	{ID: "PMP-08", Section: "RFC 6886 §3.4", Level: Must, Name: "internal port 0 + lifetime 0 deletes all of the client's mappings of that protocol", Needs: []Need{NeedNATPMP}, Run: func(e *Env) Result {
		s := e.sock4()
		p1, p2 := e.port(), e.port()
		m1 := s.pmpMapping(1, p1, p1, 3600)
		m2 := s.pmpMapping(1, p2, p2, 3600)
		tcp := s.pmpMapping(2, p1, p1, 3600)
		udp1, udp2 := netip.AddrPortFrom(e.ExternalV4, m1.ExtPort), netip.AddrPortFrom(e.ExternalV4, m2.ExtPort)
		tcpExt := netip.AddrPortFrom(e.ExternalV4, tcp.ExtPort)
		if e.Data != nil {
			e.serve(protoUDP, p1)
			e.serve(protoUDP, p2)
			e.serve(protoTCP, p1)
			for _, a := range []netip.AddrPort{udp1, udp2} {
				if err := e.probe(protoUDP, netip.Addr{}, a); err != nil {
					return failr("before delete-all, inbound UDP to %s fails: %v", a, err)
				}
			}
			if err := e.probe(protoTCP, netip.Addr{}, tcpExt); err != nil {
				return failr("before delete-all, inbound TCP to %s fails: %v", tcpExt, err)
			}
		}
		r := s.pmp(pmpMap(1, 0, 0, 0))
		if r.Result != pcp.PMPSuccess || r.IntPort != 0 || r.Op != 0x81 || r.ExtPort != 0 || r.Life != 0 {
			return failr("delete-all UDP → %s, want success, int 0, ext 0, lifetime 0", r)
		}
		if e.Data == nil {
			return pass("delete-all UDP → %s (deletion not verified: no data plane)", r)
		}
		for _, a := range []netip.AddrPort{udp1, udp2} {
			if err := e.probe(protoUDP, netip.Addr{}, a); err == nil {
				return failr("after delete-all UDP, inbound UDP to %s still works", a)
			}
		}
		if err := e.probe(protoTCP, netip.Addr{}, tcpExt); err != nil {
			return failr("delete-all UDP closed the TCP mapping %s: %v", tcpExt, err)
		}
		return pass("UDP %d, %d closed; TCP %d still open", m1.ExtPort, m2.ExtPort, tcp.ExtPort)
	}},
	{ID: "PMP-09", Section: "RFC 6886 §3.5", Level: Must, Name: "map errors use the full reply: int copied, ext 0, lifetime 0", Needs: []Need{NeedNATPMP}, Run: func(e *Env) Result {
		s := e.sock4()
		r := s.pmp(pmpMap(2, 0, 0, 3600))
		if r.Result == pcp.PMPSuccess {
			s.send(pmpMap(2, 0, 0, 0))
			e.naf("internal port 0 with a lifetime was granted: no error to examine")
		}
		if len(r.Raw) != 16 || r.Op != 0x82 || r.IntPort != 0 || r.ExtPort != 0 || r.Life != 0 {
			return failr("error reply %s, want 16 octets, op 0x82, ext 0, lifetime 0", r)
		}
		return pass("int 0 lifetime 3600 → %s, 16 octets", r.Result)
	}},
	{ID: "PMP-10", Section: "RFC 6886 §3.3", Level: Should, Name: "granted lifetime not above the request", Needs: []Need{NeedNATPMP}, Run: func(e *Env) Result {
		s := e.sock4()
		p := e.port()
		r := s.pmpMapping(2, p, p, 7200)
		if r.Life > 7200 || r.Life == 0 {
			return failr("7200 → %d", r.Life)
		}
		q := e.port()
		r2 := s.pmpMapping(2, q, q, 60)
		note := ""
		if r2.Life > 60 {
			note = fmt.Sprintf("; 60 → %d (raised to the minimum: PROTOCOL.md (e))", r2.Life)
		}
		return pass("7200 → %d%s", r.Life, note)
	}},
	{ID: "PMP-11", Section: "RFC 6886 §3.9", Level: Must, Name: "two-way mapping: outbound from the internal port leaves from the external port", Needs: []Need{NeedNATPMP, NeedOutbound}, Run: func(e *Env) Result {
		s := e.sock4()
		p := e.port()
		m := s.pmpMapping(1, p, p, 3600)
		want := netip.AddrPortFrom(e.ExternalV4, m.ExtPort)
		got, err := e.Data.Outbound(netip.AddrPortFrom(e.Client4, p))
		if err != nil {
			return failr("outbound UDP from %s: %v", netip.AddrPortFrom(e.Client4, p), err)
		}
		if got != want {
			return failr("mapping %d → %s, but outbound from %d is seen as %s", p, want, p, got)
		}
		return pass("outbound from %s seen as %s", netip.AddrPortFrom(e.Client4, p), got)
	}},
}
