package conformance

import (
	"bytes"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// MAP, lifetime and PEER checks (PROTOCOL.md MAP, LIFE, PEER).

func ext(r *response) netip.AddrPort { return netip.AddrPortFrom(r.ExtAddr, r.ExtPort) }

// peerReq builds a PEER request from s to the remote peer.
func (s *sock) peerReq(intPort uint16, remote netip.AddrPort, lifetime uint32) request {
	return request{Op: opPeer, Lifetime: lifetime, Client: s.local.Addr(), Nonce: nonce(), Proto: protoTCP, IntPort: intPort, RemotePort: remote.Port(), Remote: remote.Addr()}
}

// peerSupported ends the check as NA if r says PEER is not implemented.
func (e *Env) peerSupported(r *response) {
	if r.Result == pcp.UnsuppOpcode {
		e.naf("PEER unsupported (UNSUPP_OPCODE)")
	}
}

// peer443 sends a TCP PEER request from port p to the remote's port 443,
// ends the check as NA if PEER is unsupported and wants SUCCESS.
func (s *sock) peer443(p uint16) (request, *response) {
	pr := s.peerReq(p, netip.AddrPortFrom(s.e.remote(), 443), 600)
	r := s.ask(pr.bytes())
	s.e.peerSupported(r)
	s.e.expectResult(r, pcp.Success, "PEER")
	return pr, r
}

// mapFiltered sends a TCP MAP of port p (suggesting p) with the FILTER
// options opts, ends the check as NA if FILTER is unsupported, wants
// SUCCESS (what names the request) and deletes the mapping at the end of
// the check.
func (s *sock) mapFiltered(p uint16, what string, opts ...[]byte) (request, *response) {
	m := s.newMap(protoTCP, p, p, 600, opts...)
	r := s.ask(m.bytes())
	s.e.unsupported(r, "FILTER")
	s.e.expectResult(r, pcp.Success, what)
	s.e.cleanup((&mapping{s: s, req: m, r: r}).deleteQuietly)
	return m, r
}

// withinLifetime reports whether got is want minus at most slack seconds.
func withinLifetime(got, want, slack uint32) bool { return got <= want && got+slack >= want }

var mapChecks = []Check{
	{ID: "MAP-01", Section: "RFC 6887 §11.3", Level: Impl, Name: "MAP checks in order: protocol/port, THIRD_PARTY, ownership, protocol", Run: func(e *Env) Result {
		s := e.sock()
		var did []string
		if e.ThirdParty.IsValid() && e.OtherClient.IsValid() {
			m := s.newMap(0, e.port(), 0, 600, thirdParty(e.OtherClient))
			e.wantError(s, m.bytes(), pcp.MalformedRequest, "protocol 0 port ≠ 0 + THIRD_PARTY of another client")
			m = s.newMap(132, e.port(), 0, 600, thirdParty(e.OtherClient))
			e.wantError(s, m.bytes(), pcp.NotAuthorized, "protocol 132 + THIRD_PARTY of another client")
			did = append(did, "proto 0/port≠0 + foreign TP → 03; proto 132 + foreign TP → 02")
		}
		if e.NotOwned.IsValid() {
			n := e.sockFrom(e.NotOwned, e.Server)
			m := n.newMap(132, e.port(), 0, 600)
			e.wantError(n, m.bytes(), pcp.NotAuthorized, "protocol 132 from a non-owned source")
			did = append(did, "proto 132 from a non-owned source → 02")
		}
		if len(did) == 0 {
			e.naf("needs THIRD_PARTY with another client, or a non-owned source")
		}
		return pass("%s", strings.Join(did, "; "))
	}},
	{ID: "MAP-02", Section: "RFC 6887 §11.3", Level: Must, Name: "MAP reply copies nonce, protocol, internal port", Run: func(e *Env) Result {
		s := e.sock()
		m := s.mapTCP()
		r := m.r
		switch {
		case r.Nonce != m.req.Nonce || r.Proto != protoTCP || r.IntPort != m.req.IntPort:
			return failr("reply nonce/proto/port %x/%d/%d, request %x/%d/%d", r.Nonce, r.Proto, r.IntPort, m.req.Nonce, m.req.Proto, m.req.IntPort)
		case r.ExtPort == 0 || !r.ExtAddr.IsValid() || r.ExtAddr.IsUnspecified():
			return failr("no external address or port: %s", ext(r))
		case r.Lifetime == 0:
			return failr("lifetime 0 on a successful MAP")
		case !bytes.Equal(r.Raw[37:40], []byte{0, 0, 0}):
			return failr("reserved octets 37-39 = %s", hexdump(r.Raw[37:40]))
		}
		return pass("int %d → %s, lifetime %d", m.req.IntPort, ext(r), r.Lifetime)
	}},
	{ID: "MAP-03", Section: "RFC 6887 §11.3, §15.1", Level: Must, Name: "protocol 0 with a non-zero port → MALFORMED_REQUEST", Run: func(e *Env) Result {
		s := e.sock()
		m := s.newMap(0, e.port(), 0, 600)
		e.wantError(s, m.bytes(), pcp.MalformedRequest, "protocol 0, port ≠ 0")
		m.Lifetime = 0
		e.wantError(s, m.bytes(), pcp.MalformedRequest, "protocol 0, port ≠ 0, lifetime 0")
		return pass("lifetime 600 and 0 → 03")
	}},
	{ID: "MAP-04", Section: "RFC 6887 §11.3", Level: Must, Name: "unsupported protocol → UNSUPP_PROTOCOL", Run: func(e *Env) Result {
		s := e.sock()
		var seen []string
		for _, proto := range []byte{132, 253} {
			m := s.newMap(proto, e.port(), 0, 600)
			r := s.ask(m.bytes())
			if r.Result == pcp.Success {
				(&mapping{s: s, req: m, r: r}).deleteQuietly()
				seen = append(seen, fmt.Sprintf("%d supported", proto))
				continue
			}
			e.expectResult(r, pcp.UnsuppProtocol, fmt.Sprintf("protocol %d", proto))
			seen = append(seen, fmt.Sprintf("%d → 09", proto))
		}
		return pass("%v", seen)
	}},
	{ID: "MAP-05", Section: "RFC 6887 §11.3", Level: Must, Name: "port 0 / protocol 0 wildcards: whole, or UNSUPP_PROTOCOL", Run: func(e *Env) Result {
		s := e.sock()
		var seen []string
		for _, proto := range []byte{protoTCP, protoUDP, 0} {
			m := s.newMap(proto, 0, 0, 600)
			r := s.ask(m.bytes())
			if r.Result == pcp.Success {
				(&mapping{s: s, req: m, r: r}).deleteQuietly()
				if r.ExtPort != 0 {
					return failr("protocol %d port 0 → SUCCESS with external port %d (a wildcard must be granted whole)", proto, r.ExtPort)
				}
				seen = append(seen, fmt.Sprintf("%d/0 granted", proto))
				continue
			}
			e.expectResult(r, pcp.UnsuppProtocol, fmt.Sprintf("protocol %d port 0", proto))
			seen = append(seen, fmt.Sprintf("%d/0 → 09", proto))
		}
		return pass("%v", seen)
	}},
	{ID: "MAP-06", Section: "RFC 6887 §11.3", Level: Must, Name: "only the requested protocol is opened", Needs: []Need{NeedData}, Run: func(e *Env) Result {
		s := e.sock()
		m := s.mapTCP()
		p := m.req.IntPort
		e.serve(protoTCP, p)
		e.serve(protoUDP, p)
		if err := e.probe(protoTCP, netip.Addr{}, ext(m.r)); err != nil {
			return failr("TCP to %s after TCP MAP: %v", ext(m.r), err)
		}
		if err := e.probe(protoUDP, netip.Addr{}, ext(m.r)); err == nil {
			return failr("UDP to %s reaches the client after a TCP-only MAP", ext(m.r))
		}
		return pass("TCP %s open, UDP dropped", ext(m.r))
	}},
	{ID: "MAP-07", Section: "RFC 6887 §11.3", Level: Must, Name: "existing mapping keeps its external port whatever is suggested", Run: func(e *Env) Result {
		s := e.sock()
		m := s.mapTCP()
		renew := m.req
		renew.ExtPort = m.r.ExtPort + 7
		r := s.ask(renew.bytes())
		e.expectResult(r, pcp.Success, "renewal")
		if ext(r) != ext(m.r) {
			return failr("renewal suggesting %d moved %s to %s", renew.ExtPort, ext(m.r), ext(r))
		}
		return pass("renewal suggesting %d kept %s", renew.ExtPort, ext(r))
	}},
	{ID: "MAP-08", Section: "RFC 6887 §11.3", Level: Should, Name: "MAP on a PEER mapping's tuple reuses its external port", Run: func(e *Env) Result {
		s := e.sock()
		p := e.port()
		_, r := s.peer443(p)
		m := s.create(s.newMap(protoTCP, p, 0, 600))
		if ext(m.r) != ext(r) {
			return failr("PEER external %s, MAP on the same tuple %s", ext(r), ext(m.r))
		}
		return pass("PEER and MAP share %s", ext(r))
	}},
	{ID: "MAP-09", Section: "RFC 6887 §11.3", Level: Must, Name: "taken suggestion → SUCCESS with another port", Run: func(e *Env) Result {
		s := e.sock()
		m1 := s.mapTCP()
		m2 := s.newMap(protoTCP, e.port(), m1.r.ExtPort, 600)
		m2.ExtAddr = m1.r.ExtAddr
		r := s.create(m2).r
		if ext(r) == ext(m1.r) {
			return failr("two internal ports got %s", ext(r))
		}
		return pass("%s taken → %s", ext(m1.r), ext(r))
	}},
	{ID: "MAP-10", Section: "RFC 6887 §11.3", Level: Must, Name: "external UDP 5351/5350 never mapped (IPv4)", Needs: []Need{NeedExternalV4}, Run: func(e *Env) Result {
		return pcpPorts(e, e.sock4())
	}},
	{ID: "MAP-10", Section: "RFC 6887 §11.3", Level: Impl, Name: "external UDP 5351/5350 never mapped (main family)", Run: func(e *Env) Result {
		return pcpPorts(e, e.sock())
	}},
	{ID: "MAP-11", Section: "RFC 6887 §11.1, PROTOCOL.md (d)", Level: Impl, Name: "IPv6: external address = internal, suggested port honoured", Run: func(e *Env) Result {
		if !e.Client.Is6() {
			e.naf("main client is IPv4")
		}
		s := e.sock()
		p, q := e.port(), e.port()
		m := s.create(s.newMap(protoTCP, p, q, 600))
		if ext(m.r) != netip.AddrPortFrom(e.Client, q) {
			return failr("int %d sugg %d → %s, want %s", p, q, ext(m.r), netip.AddrPortFrom(e.Client, q))
		}
		detail := fmt.Sprintf("int %d sugg %d → %s", p, q, ext(m.r))
		if e.Data != nil {
			e.serve(protoTCP, p)
			if err := e.probe(protoTCP, netip.Addr{}, ext(m.r)); err == nil {
				detail += "; inbound to the redirect port works"
			} else {
				detail += fmt.Sprintf("; inbound to the redirect port fails (%v)", err)
			}
		}
		return pass("%s", detail)
	}},
	{ID: "MAP-12", Section: "RFC 6887 §11.3", Level: Must, Name: "IPv4 mapping on the external IPv4 carries traffic", Needs: []Need{NeedExternalV4}, Run: func(e *Env) Result {
		s := e.sock4()
		p, q := e.port(), e.port()
		m := s.create(s.newMap(protoTCP, p, q, 600))
		if m.r.ExtAddr != e.ExternalV4 {
			return failr("external %s, want %s", ext(m.r), e.ExternalV4)
		}
		detail := fmt.Sprintf("int %d sugg %d → %s", p, q, ext(m.r))
		if m.r.ExtPort != q {
			detail += " (suggestion not honoured)"
		}
		if e.Data != nil {
			e.serve(protoTCP, p)
			if err := e.probe(protoTCP, netip.Addr{}, ext(m.r)); err != nil {
				return failr("%s; inbound TCP fails: %v", detail, err)
			}
			detail += "; inbound TCP works"
		}
		return pass("%s", detail)
	}},
	{ID: "MAP-12", Section: "RFC 6887 §11.3", Level: Impl, Name: "IPv4 without a suggestion: external port = internal port", Needs: []Need{NeedExternalV4}, Run: func(e *Env) Result {
		s := e.sock4()
		p := e.port()
		m := s.create(s.newMap(protoTCP, p, 0, 600))
		if m.r.ExtPort != p {
			return failr("int %d, no suggestion → %s", p, ext(m.r))
		}
		return pass("int %d → %s", p, ext(m.r))
	}},
	{ID: "MAP-12", Section: "RFC 6887 §11.3", Level: Impl, Name: "IPv4 mapping is two-way: outbound leaves from the external port", Needs: []Need{NeedExternalV4, NeedOutbound}, Run: func(e *Env) Result {
		s := e.sock4()
		p := e.port()
		m := s.create(s.newMap(protoUDP, p, p, 600))
		got, err := e.Data.Outbound(netip.AddrPortFrom(e.Client4, p))
		if err != nil {
			return failr("outbound UDP from %s: %v", netip.AddrPortFrom(e.Client4, p), err)
		}
		if got != ext(m.r) {
			return failr("mapping %d → %s, but outbound from %d is seen as %s", p, ext(m.r), p, got)
		}
		return pass("outbound from %s seen as %s", netip.AddrPortFrom(e.Client4, p), got)
	}},
	{ID: "MAP-13", Section: "RFC 6887 §10, §11.3, EID 3621", Level: Impl, Name: "suggested address of the other family: own family granted", Run: func(e *Env) Result {
		if !e.Client.Is6() {
			e.naf("main client is IPv4")
		}
		s := e.sock()
		p := e.port()
		m := s.newMap(protoTCP, p, p, 600)
		m.ExtAddr = netip.IPv4Unspecified()
		r := s.create(m).r
		if !r.ExtAddr.Is6() {
			return failr("IPv6 client suggesting ::ffff:0.0.0.0 → %s", ext(r))
		}
		return pass("→ %s", ext(r))
	}},
	{ID: "MAP-14", Section: "RFC 6887 §11.3, PROTOCOL.md (c)", Level: Must, Name: "existing mapping, other nonce: the declared nonce policy", Run: func(e *Env) Result {
		s := e.sock()
		m := s.mapTCP()
		again := m.req
		again.Nonce = nonce()
		r := s.ask(again.bytes())
		if e.NonceReplaces {
			e.expectResult(r, pcp.Success, "new nonce (policy: replace)")
			e.cleanup((&mapping{s: s, req: again, r: r}).deleteQuietly)
			return pass("new nonce replaced the mapping (declared policy (c)); %s", ext(r))
		}
		e.expectResult(r, pcp.NotAuthorized, "new nonce (policy: strict)")
		if !withinLifetime(r.Lifetime, m.r.Lifetime, 5) {
			return failr("NOT_AUTHORIZED lifetime %d, mapping has ≈ %d left", r.Lifetime, m.r.Lifetime)
		}
		return pass("NOT_AUTHORIZED, lifetime %d = remaining", r.Lifetime)
	}},
	{ID: "MAP-15", Section: "RFC 6887 §11.3", Level: Should, Name: "per-client quota → USER_EX_QUOTA for new mappings only", Needs: []Need{NeedOther}, Run: func(e *Env) Result {
		if e.Quota == 0 {
			e.naf("no per-client quota declared")
		}
		s := e.sockFrom(e.OtherClient, e.Server)
		var first *mapping
		for i := 0; i < e.Quota; i++ {
			m := s.mapTCP()
			if first == nil {
				first = m
			}
		}
		over := s.newMap(protoTCP, e.port(), 0, 600)
		r := s.ask(over.bytes())
		if r.Result == pcp.Success {
			(&mapping{s: s, req: over, r: r}).deleteQuietly()
		}
		e.expectResult(r, pcp.UserExQuota, fmt.Sprintf("mapping %d of quota %d", e.Quota+1, e.Quota))
		if r.Lifetime != shortLifetime {
			return failr("USER_EX_QUOTA lifetime %d, want 30 (short class)", r.Lifetime)
		}
		rn := s.ask(first.req.bytes())
		e.expectResult(rn, pcp.Success, "renewal at quota")
		return pass("%d granted, next → 10 (lifetime 30), renewal → 00", e.Quota)
	}},
	{ID: "MAP-16", Section: "RFC 6887 §15.1", Level: Must, Name: "lifetime 0 deletes the mapping", Run: func(e *Env) Result {
		s := e.sock()
		m := s.mapTCP()
		if e.Data != nil {
			e.serve(protoTCP, m.req.IntPort)
			if err := e.probe(protoTCP, netip.Addr{}, ext(m.r)); err != nil {
				return failr("before delete, inbound TCP to %s fails: %v", ext(m.r), err)
			}
		}
		r := s.ask(m.deleteReq().bytes())
		e.expectResult(r, pcp.Success, "delete")
		if r.Lifetime != 0 {
			return failr("delete reply lifetime %d, want 0", r.Lifetime)
		}
		detail := "SUCCESS lifetime 0"
		if e.Data != nil {
			if err := e.probe(protoTCP, netip.Addr{}, ext(m.r)); err == nil {
				return failr("after delete, inbound TCP to %s still works", ext(m.r))
			}
			detail += ", inbound closed"
		}
		if e.Data == nil {
			detail += " (deletion not verified: no data plane)"
		}
		return pass("%s", detail)
	}},
	{ID: "MAP-17", Section: "RFC 6887 §15.1, EID 3621", Level: Should, Name: "delete reply copies suggested port and address", Run: func(e *Env) Result {
		s := e.sock()
		m := s.mapTCP()
		del := m.deleteReq()
		del.ExtPort = 1234
		r := s.ask(del.bytes())
		e.expectResult(r, pcp.Success, "delete")
		if r.Lifetime != 0 || r.ExtPort != 1234 || r.ExtAddr != zeroAddr(e.Client) {
			return failr("delete suggesting %d → lifetime %d, %s (want 0, %s)", 1234, r.Lifetime, ext(r), netip.AddrPortFrom(zeroAddr(e.Client), 1234))
		}
		return pass("→ lifetime 0, %s", ext(r))
	}},
	{ID: "MAP-18", Section: "RFC 6887 §15.1", Level: Must, Name: "deleting a nonexistent mapping → SUCCESS, same reply", Run: func(e *Env) Result {
		s := e.sock()
		d := s.newMap(protoTCP, e.port(), 0, 0)
		r1 := s.ask(d.bytes())
		e.expectResult(r1, pcp.Success, "delete of nothing")
		r2 := s.ask(d.bytes())
		if diff := diffReplies(r1.Raw, r2.Raw); diff != "" {
			return failr("two deletes differ: %s", diff)
		}
		return pass("SUCCESS ×2, identical")
	}},
	{ID: "MAP-19", Section: "RFC 6887 §15.1, PROTOCOL.md (c)", Level: Must, Name: "delete with another nonce: the declared nonce policy", Run: func(e *Env) Result {
		s := e.sock()
		m := s.mapTCP()
		del := m.deleteReq()
		del.Nonce = nonce()
		r := s.ask(del.bytes())
		if e.NonceReplaces {
			e.expectResult(r, pcp.Success, "delete with a new nonce (policy: replace)")
			return pass("honoured (declared policy (c))")
		}
		e.expectResult(r, pcp.NotAuthorized, "delete with a new nonce (policy: strict)")
		if !withinLifetime(r.Lifetime, m.r.Lifetime, 5) {
			return failr("NOT_AUTHORIZED lifetime %d, mapping has ≈ %d left", r.Lifetime, m.r.Lifetime)
		}
		return pass("NOT_AUTHORIZED, lifetime %d = remaining", r.Lifetime)
	}},
	{ID: "MAP-20", Section: "RFC 6887 §15.1", Level: Must, Name: "MAP cannot delete a PEER mapping → NOT_AUTHORIZED", Run: func(e *Env) Result {
		s := e.sock()
		p := e.port()
		pr, _ := s.peer443(p)
		del := s.newMap(protoTCP, p, 0, 0)
		del.Nonce = pr.Nonce
		e.wantError(s, del.bytes(), pcp.NotAuthorized, "MAP delete of a PEER-only tuple")
		return pass("→ 02")
	}},
	{ID: "MAP-21", Section: "RFC 6887 §11, §15.1", Level: Must, Name: "pinhole survives TCP FIN", Needs: []Need{NeedData}, Run: func(e *Env) Result {
		s := e.sock()
		m := s.mapTCP()
		e.serve(protoTCP, m.req.IntPort)
		for i := 1; i <= 3; i++ {
			if err := e.probe(protoTCP, netip.Addr{}, ext(m.r)); err != nil {
				return failr("connection %d to %s: %v", i, ext(m.r), err)
			}
		}
		return pass("3 successive connections (each closed) to %s", ext(m.r))
	}},
	{ID: "MAP-22", Section: "RFC 6887 §15", Level: Should, Name: "freed IPv4 port not given to another client at once", Needs: []Need{NeedExternalV4, NeedOther4}, Run: func(e *Env) Result {
		a := e.sock4()
		m := a.mapTCP()
		r := a.ask(m.deleteReq().bytes())
		e.expectResult(r, pcp.Success, "delete")
		b := e.sockFrom(e.OtherClient4, e.Server4)
		bm := b.newMap(protoTCP, e.port(), m.r.ExtPort, 600)
		br := b.create(bm).r
		if br.ExtPort == m.r.ExtPort {
			return failr("port %d freed by %s went to %s at once", m.r.ExtPort, e.Client4, e.OtherClient4)
		}
		rm := a.create(m.req).r
		if rm.ExtPort != m.r.ExtPort {
			return failr("owner could not reclaim %d (got %d)", m.r.ExtPort, rm.ExtPort)
		}
		return pass("other client got %d instead of %d; owner reclaimed %d", br.ExtPort, m.r.ExtPort, rm.ExtPort)
	}},

	{ID: "LIFE-01", Section: "RFC 6887 §15", Level: Should, Name: "lifetime clamped to [min, max]", Run: func(e *Env) Result {
		s := e.sock()
		lo := uint32(min(e.MinLifetime, 120*time.Second) / time.Second)
		m := s.create(s.newMap(protoTCP, e.port(), 0, 1))
		if m.r.Lifetime < lo {
			return failr("requested 1 s, granted %d (< %d)", m.r.Lifetime, lo)
		}
		h := s.create(s.newMap(protoTCP, e.port(), 0, 0xffffffff))
		if h.r.Lifetime == 0xffffffff {
			return failr("requested 2^32-1, granted 2^32-1 (no maximum)")
		}
		return pass("1 → %d; 2^32-1 → %d", m.r.Lifetime, h.r.Lifetime)
	}},
	{ID: "LIFE-03", Section: "RFC 6887 §15", Level: Impl, Name: "renewal sets the new lifetime (may shorten)", Run: func(e *Env) Result {
		s := e.sock()
		m := s.mapTCP()
		short := m.req
		short.Lifetime = 300
		r := s.ask(short.bytes())
		e.expectResult(r, pcp.Success, "renewal 300")
		if r.Lifetime != 300 {
			return failr("600 then 300 → %d", r.Lifetime)
		}
		return pass("600 then 300 → 300")
	}},
	{ID: "LIFE-04", Section: "RFC 6887 §15", Level: Must, Name: "mapping expires at its lifetime, even with the server down", Needs: []Need{NeedData}, Run: func(e *Env) Result {
		if e.MinLifetime > 10*time.Second {
			e.naf("minimum lifetime %v: too slow to wait for", e.MinLifetime)
		}
		s := e.sock()
		life := uint32(max(e.MinLifetime, 3*time.Second) / time.Second)
		p := e.port()
		m := s.create(s.newMap(protoTCP, p, p, life))
		e.serve(protoTCP, p)
		if err := e.probe(protoTCP, netip.Addr{}, ext(m.r)); err != nil {
			return failr("inbound TCP to fresh mapping: %v", err)
		}
		stopped := ""
		if e.Stop != nil && e.Start != nil {
			if err := e.Stop(); err != nil {
				return failr("stop server: %v", err)
			}
			defer e.Start()
			stopped = " with the server stopped"
		}
		time.Sleep(time.Duration(m.r.Lifetime)*time.Second + 1500*time.Millisecond)
		if err := e.probe(protoTCP, netip.Addr{}, ext(m.r)); err == nil {
			return failr("inbound TCP still works %d s after a %d s grant%s", m.r.Lifetime+1, m.r.Lifetime, stopped)
		}
		return pass("granted %d s; closed after %d s%s", m.r.Lifetime, m.r.Lifetime+1, stopped)
	}},

	{ID: "PEER-01", Section: "RFC 6887 §12.3", Level: Must, Name: "PEER reply copies nonce, protocol, ports, remote peer", Run: func(e *Env) Result {
		s := e.sock()
		pr, r := s.peer443(e.port())
		if r.Nonce != pr.Nonce || r.Proto != pr.Proto || r.IntPort != pr.IntPort || r.RemotePort != pr.RemotePort || r.Remote != pr.Remote {
			return failr("reply %s does not copy the request %s", hexdump(r.Raw), hexdump(pr.bytes()))
		}
		if len(r.Raw) < 80 || r.Raw[62] != 0 || r.Raw[63] != 0 {
			return failr("PEER reply reserved octets 62-63 not zero")
		}
		return pass("int %d ↔ %s → ext %s", pr.IntPort, netip.AddrPortFrom(r.Remote, r.RemotePort), ext(r))
	}},
	{ID: "PEER-02", Section: "RFC 6887 §12.1", Level: Impl, Name: "PEER with protocol, internal or remote port 0 → MALFORMED_REQUEST", Run: func(e *Env) Result {
		s := e.sock()
		base := s.peerReq(e.port(), netip.AddrPortFrom(e.remote(), 443), 600)
		r := s.ask(base.bytes())
		e.peerSupported(r)
		for _, c := range []struct {
			name string
			mod  func(*request)
		}{
			{"protocol 0", func(r *request) { r.Proto = 0 }},
			{"internal port 0", func(r *request) { r.IntPort = 0 }},
			{"remote port 0", func(r *request) { r.RemotePort = 0 }},
		} {
			q := s.peerReq(e.port(), netip.AddrPortFrom(e.remote(), 443), 600)
			c.mod(&q)
			e.wantError(s, q.bytes(), pcp.MalformedRequest, "PEER "+c.name)
		}
		return pass("each → 03")
	}},
	{ID: "PEER-03", Section: "RFC 6887 §12.3", Level: Should, Name: "PEER with a bad remote peer → MALFORMED_REQUEST", Run: func(e *Env) Result {
		s := e.sock()
		base := s.peerReq(e.port(), netip.AddrPortFrom(e.remote(), 443), 600)
		e.peerSupported(s.ask(base.bytes()))
		bad := []string{"::1", "ff02::1", "::"}
		if e.Client.Is4() {
			bad = []string{"127.0.0.1", "224.0.0.1", "0.0.0.0"}
		}
		for _, a := range bad {
			q := s.peerReq(e.port(), netip.AddrPortFrom(netip.MustParseAddr(a), 443), 600)
			e.wantError(s, q.bytes(), pcp.MalformedRequest, "PEER remote "+a)
		}
		return pass("%v → 03", bad)
	}},
	{ID: "PEER-04", Section: "RFC 6887 §12.3", Level: Must, Name: "PEER suggestion: granted exactly, or CANNOT_PROVIDE_EXTERNAL", Run: func(e *Env) Result {
		s := e.sock()
		p := e.port()
		pr := s.peerReq(p, netip.AddrPortFrom(e.remote(), 443), 600)
		pr.ExtPort = p + 1000
		pr.ExtAddr = e.Client
		if e.Client.Is4() && e.ExternalV4.IsValid() {
			pr.ExtAddr = e.ExternalV4
		}
		r := s.ask(pr.bytes())
		e.peerSupported(r)
		switch r.Result {
		case pcp.CannotProvideExternal:
			return pass("suggestion %s → 11", netip.AddrPortFrom(pr.ExtAddr, pr.ExtPort))
		case pcp.Success:
			if ext(r) != netip.AddrPortFrom(pr.ExtAddr, pr.ExtPort) {
				return failr("suggestion %s → SUCCESS with %s (a non-zero suggestion is granted exactly or refused)", netip.AddrPortFrom(pr.ExtAddr, pr.ExtPort), ext(r))
			}
			return pass("suggestion %s granted", ext(r))
		}
		return failr("suggestion → %s", r.Result)
	}},
	{ID: "PEER-05", Section: "RFC 6887 §12.3", Level: Must, Name: "PEER on a MAP mapping returns its external, suggestion ignored", Run: func(e *Env) Result {
		s := e.sock()
		m := s.mapTCP()
		pr := s.peerReq(m.req.IntPort, netip.AddrPortFrom(e.remote(), 443), 600)
		pr.ExtPort = m.r.ExtPort + 3
		r := s.ask(pr.bytes())
		e.peerSupported(r)
		e.expectResult(r, pcp.Success, "PEER on a MAP mapping")
		if ext(r) != ext(m.r) {
			return failr("MAP external %s, PEER got %s", ext(m.r), ext(r))
		}
		return pass("PEER got the MAP's %s", ext(r))
	}},
	{ID: "PEER-06", Section: "RFC 6887 §12.3, PROTOCOL.md (c)", Level: Must, Name: "PEER with another nonce: the declared nonce policy", Run: func(e *Env) Result {
		s := e.sock()
		pr, r := s.peer443(e.port())
		again := pr
		again.Nonce = nonce()
		r2 := s.ask(again.bytes())
		if e.NonceReplaces {
			e.expectResult(r2, pcp.Success, "PEER new nonce (policy: replace)")
			return pass("new nonce accepted (declared policy (c))")
		}
		e.expectResult(r2, pcp.NotAuthorized, "PEER new nonce (policy: strict)")
		if !withinLifetime(r2.Lifetime, r.Lifetime, 5) {
			return failr("NOT_AUTHORIZED lifetime %d, mapping has ≈ %d left", r2.Lifetime, r.Lifetime)
		}
		return pass("NOT_AUTHORIZED, lifetime %d = remaining", r2.Lifetime)
	}},
	{ID: "PEER-07", Section: "RFC 6887 §12.1, §15", Level: Impl, Name: "PEER never shortens; lifetime 0 is a query", Run: func(e *Env) Result {
		s := e.sock()
		pr := s.peerReq(e.port(), netip.AddrPortFrom(e.remote(), 443), 600)
		r := s.ask(pr.bytes())
		e.peerSupported(r)
		e.expectResult(r, pcp.Success, "PEER 600")
		q := pr
		q.Lifetime = 0
		r0 := s.ask(q.bytes())
		e.expectResult(r0, pcp.Success, "PEER lifetime 0")
		if !withinLifetime(r0.Lifetime, r.Lifetime, 5) {
			return failr("PEER %d then 0 → lifetime %d", r.Lifetime, r0.Lifetime)
		}
		q.Lifetime = 200
		r2 := s.ask(q.bytes())
		e.expectResult(r2, pcp.Success, "PEER 200")
		if !withinLifetime(r2.Lifetime, r.Lifetime, 5) {
			return failr("PEER %d then 200 → lifetime %d", r.Lifetime, r2.Lifetime)
		}
		return pass("%d, then 0 → %d, then 200 → %d", r.Lifetime, r0.Lifetime, r2.Lifetime)
	}},
	{ID: "PEER-08", Section: "RFC 6887 §12", Level: Impl, Name: "PEER admits exactly the remote peer", Needs: []Need{NeedData}, Run: func(e *Env) Result {
		src := e.sources()
		if len(src) == 0 {
			e.naf("no internet source of the client's family")
		}
		s := e.sock()
		p, rp := e.port(), e.port()
		pr := s.peerReq(p, netip.AddrPortFrom(src[0], rp), 600)
		r := s.ask(pr.bytes())
		e.peerSupported(r)
		e.expectResult(r, pcp.Success, "PEER")
		e.serve(protoTCP, p)
		if err := e.Data.Probe(protoTCP, netip.AddrPortFrom(src[0], rp+1), ext(r)); err == nil {
			return failr("%s from another remote port reaches the client", ext(r))
		}
		if err := e.Data.Probe(protoTCP, netip.AddrPortFrom(src[0], rp), ext(r)); err != nil {
			return failr("%s from the remote peer %s: %v", ext(r), netip.AddrPortFrom(src[0], rp), err)
		}
		return pass("only %s reaches %s", netip.AddrPortFrom(src[0], rp), ext(r))
	}},
}

// pcpPorts is MAP-10 on one socket's family.
func pcpPorts(e *Env, s *sock) Result {
	var seen []string
	for _, port := range []uint16{5351, 5350} {
		m := s.newMap(protoUDP, port, port, 600)
		r := s.ask(m.bytes())
		if r.Result == pcp.Success {
			e.cleanup((&mapping{s: s, req: m, r: r}).deleteQuietly)
			if r.ExtPort == port {
				return failr("UDP %d suggested %d → external %s", port, port, ext(r))
			}
		}
		seen = append(seen, fmt.Sprintf("%d → %s %d", port, r.Result, r.ExtPort))
		m.Nonce = nonce()
		m.IntPort = e.port()
		m.Opts = [][]byte{preferFailure()}
		r = s.ask(m.bytes())
		if r.Result == pcp.Success {
			e.cleanup((&mapping{s: s, req: m, r: r}).deleteQuietly)
			return failr("UDP sugg %d + PREFER_FAILURE → SUCCESS %s", port, ext(r))
		}
		seen = append(seen, fmt.Sprintf("+PF → %s", r.Result))
	}
	return pass("%v", seen)
}
