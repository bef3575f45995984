package conformance

import (
	"bytes"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// Packet-level, version, header, client-address, epoch and security
// checks (PROTOCOL.md PKT, VER, HDR, ADDR, EPO, SEC, ANN-01/02).

func announce(client netip.Addr) []byte {
	r := request{Op: opAnnounce, Client: client}
	return r.bytes()
}

// other returns an address of a's family that is not a: a+1, which no
// check sends from.
func other(a netip.Addr) netip.Addr {
	n := a.Next()
	if !n.IsValid() {
		return a.Prev()
	}
	return n
}

// wantError sends req and expects an error reply with code want, with a
// well-formed header (HDR-01).
func (e *Env) wantError(s *sock, req []byte, want pcp.ResultCode, what string) *response {
	r := s.ask(req)
	e.header(r, req, what)
	e.expectResult(r, want, what)
	return r
}

// header fails the check unless r has a correct PCP reply header for req.
func (e *Env) header(r *response, req []byte, what string) {
	switch {
	case r.Version != pcp.Version:
		e.failf("%s: reply version %d, want 2 (%s)", what, r.Version, hexdump(r.Raw))
	case !r.R:
		e.failf("%s: R bit clear in reply", what)
	case len(req) >= 2 && r.Op != req[1]&0x7f:
		e.failf("%s: reply opcode %d, request's %d", what, r.Op, req[1]&0x7f)
	case r.Octet2 != 0:
		e.failf("%s: reply octet 2 = %#02x, want 0", what, r.Octet2)
	}
}

// copied fails unless reply octets [from, len(req)) equal the request's
// and the reply is the request padded with zeros to a multiple of 4
// (capped at 1100).
func (e *Env) copied(r *response, req []byte, from int, what string) {
	n := min(len(req), pcp.MaxMessageSize)
	want := (n + 3) &^ 3
	if len(r.Raw) != want {
		e.failf("%s: reply is %d octets, want the %d-octet request padded to %d", what, len(r.Raw), len(req), want)
	}
	if !bytes.Equal(r.Raw[from:n], req[from:n]) {
		e.failf("%s: reply octets %d-%d differ from the request:\nreq %s\nrep %s", what, from, n-1, hexdump(req[from:n]), hexdump(r.Raw[from:n]))
	}
	for i := n; i < want; i++ {
		if r.Raw[i] != 0 {
			e.failf("%s: pad octet %d = %#02x, want 0", what, i, r.Raw[i])
		}
	}
}

// mapBytes returns a valid MAP request from s (TCP, fresh port) with the
// given options, for checks that only care about the reply's form.
func (s *sock) mapBytes(lifetime uint32, opts ...[]byte) []byte {
	p := s.e.port()
	r := s.newMap(protoTCP, p, p, lifetime, opts...)
	return r.bytes()
}

var packetChecks = []Check{
	{ID: "PKT-01", Section: "RFC 6887 §8.2", Level: Must, Name: "requests shorter than 2 octets are dropped silently", Run: func(e *Env) Result {
		s := e.sock()
		for _, b := range [][]byte{{}, {0x02}, {0x00}} {
			if r := s.silent(b); r != nil {
				return failr("%d-octet request %x answered with %s", len(b), b, hexdump(r))
			}
		}
		return pass("empty, 02 and 00: no reply")
	}},
	{ID: "PKT-02", Section: "RFC 6887 §8.2, RFC 6886 §3.5", Level: Must, Name: "requests with the R bit set are dropped silently", Run: func(e *Env) Result {
		s := e.sock()
		pkts := [][]byte{append([]byte{0x02, 0x81}, make([]byte, 22)...), {0x00, 0x80}, append([]byte{0x02, 0x80}, make([]byte, 22)...)}
		for _, b := range pkts {
			if r := s.silent(b); r != nil {
				return failr("%s answered with %s", hexdump(b), hexdump(r))
			}
		}
		if e.Server4.IsValid() && e.Client4.IsValid() {
			s4 := e.sock4()
			for _, b := range [][]byte{{0x00, 0x80}, {0x00, 0x81, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}} {
				if r := s4.silent(b); r != nil {
					return failr("IPv4: %s answered with %s", hexdump(b), hexdump(r))
				}
			}
		}
		return pass("v2 MAP/ANNOUNCE replies and NAT-PMP replies sent as requests: no reply")
	}},
	{ID: "PKT-03", Section: "RFC 6887 §8.2", Level: Must, Name: "version 2 requests shorter than 24 octets are dropped silently", Run: func(e *Env) Result {
		s := e.sock()
		for _, n := range []int{2, 20, 23} {
			b := announce(e.Client)[:n]
			if r := s.silent(b); r != nil {
				return failr("%d-octet v2 request answered with %s", n, hexdump(r))
			}
		}
		return pass("2, 20 and 23 octets: no reply")
	}},
	{ID: "PKT-04", Section: "RFC 6887 §7, §8.2", Level: Must, Name: "requests over 1100 octets get MALFORMED_REQUEST, reply = first 1100 octets", Run: func(e *Env) Result {
		s := e.sock()
		// 60-octet MAP + one optional option of 1040 data octets = 1104.
		req := s.mapBytes(600, option(0xc8, bytes.Repeat([]byte{0xab}, 1040)))
		r := e.wantError(s, req, pcp.MalformedRequest, "1104-octet MAP")
		if len(r.Raw) != 1100 {
			return failr("reply is %d octets, want 1100", len(r.Raw))
		}
		if !bytes.Equal(r.Raw[24:], req[24:1100]) {
			return failr("octets 24-1099 not copied")
		}
		return pass("1104 → 1100-octet MALFORMED_REQUEST, payload copied")
	}},
	{ID: "PKT-05", Section: "RFC 6887 §7, §8.2", Level: Must, Name: "length not a multiple of 4 → MALFORMED_REQUEST, zero-padded copy", Run: func(e *Env) Result {
		s := e.sock()
		req := append(s.mapBytes(600), 0xaa)
		r := e.wantError(s, req, pcp.MalformedRequest, "61-octet MAP")
		e.copied(r, req, 24, "61-octet MAP")
		return pass("61 → 64 octets, MALFORMED_REQUEST, last 3 octets zero")
	}},
	{ID: "PKT-06", Section: "RFC 6887 §11.1, §12.1", Level: Must, Name: "MAP under 60 or PEER under 80 octets → MALFORMED_REQUEST", Run: func(e *Env) Result {
		s := e.sock()
		m := s.mapBytes(600)[:56]
		e.wantError(s, m, pcp.MalformedRequest, "56-octet MAP")
		p := request{Op: opPeer, Lifetime: 600, Client: e.Client, Nonce: nonce(), Proto: protoTCP, IntPort: e.port(), RemotePort: 80, Remote: other(e.Client)}
		e.wantError(s, p.bytes()[:76], pcp.MalformedRequest, "76-octet PEER")
		e.wantError(s, p.bytes()[:60], pcp.MalformedRequest, "60-octet PEER")
		return pass("56-octet MAP, 60- and 76-octet PEER → MALFORMED_REQUEST")
	}},
	{ID: "PKT-07", Section: "RFC 6887 §7.2, §19.2", Level: Must, Name: "unknown opcodes → UNSUPP_OPCODE, payload copied", Run: func(e *Env) Result {
		s := e.sock()
		for _, op := range []byte{3, 5, 63, 64, 96, 126, 127} {
			req := announce(e.Client)
			req[1] = op
			req = append(req, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4)
			r := e.wantError(s, req, pcp.UnsuppOpcode, fmt.Sprintf("opcode %d", op))
			e.copied(r, req, 24, fmt.Sprintf("opcode %d", op))
		}
		return pass("opcodes 3, 5, 63, 64, 96, 126, 127 → UNSUPP_OPCODE, 8 payload octets copied")
	}},
	{ID: "PKT-09", Section: "RFC 6887 §8.2", Level: Impl, Name: "order of checks: version, length, address, options", Run: func(e *Env) Result {
		s := e.sock()
		v3 := announce(e.Client)[:23]
		v3[0] = 3
		r := s.ask(v3)
		if r.Result != pcp.UnsuppVersion {
			return failr("23-octet v3: want UNSUPP_VERSION, got %s", r.Result)
		}
		b := append(announce(other(e.Client)), 0)
		r = s.ask(b)
		if r.Result != pcp.MalformedRequest {
			return failr("25-octet v2 with a wrong Client IP: want MALFORMED_REQUEST, got %s", r.Result)
		}
		m := s.newMap(protoTCP, e.port(), 0, 600, option(0x7e, []byte{0, 0, 0, 0}))
		m.Client = other(e.Client)
		r = s.ask(m.bytes())
		if r.Result != pcp.AddressMismatch {
			return failr("MAP with a wrong Client IP and an unknown mandatory option: want ADDRESS_MISMATCH, got %s", r.Result)
		}
		return pass("23-octet v3 → 01; 25-octet wrong-IP → 03; wrong IP + unknown option → 12")
	}},

	{ID: "VER-01", Section: "RFC 6887 App. A", Level: Must, Name: "version 0 is NAT-PMP when NAT-PMP is served", Needs: []Need{NeedNATPMP}, Run: func(e *Env) Result {
		s := e.sock4()
		b := s.raw(pmpAddress())
		r, _ := parsePMP(b)
		if len(b) != 12 || r.Version != 0 || r.Op != 0x80 {
			return failr("00 00 → %s, want a 12-octet NAT-PMP address reply", hexdump(b))
		}
		return pass("00 00 → %s", hexdump(b))
	}},
	{ID: "VER-02", Section: "RFC 6887 §9, App. A", Level: Must, Name: "version 0 without NAT-PMP (IPv6 source) → PCP UNSUPP_VERSION", Run: ver02},
	{ID: "VER-03", Section: "RFC 6887 §9", Level: Must, Name: "versions 1 and ≥ 3 → UNSUPP_VERSION naming version 2", Run: func(e *Env) Result {
		s := e.sock()
		note := ""
		for _, v := range []byte{1, 3, 4, 255} {
			m := s.newMap(protoTCP, e.port(), 0, 600)
			m.Version = v
			req := m.bytes()
			r := s.ask(req)
			if v == 1 && r.Version == 1 {
				// The server speaks draft-ietf-pcp-base version 1: not
				// an unsupported version for it.
				note = "; version 1 answered as version 1 (server speaks the pre-RFC draft)"
				continue
			}
			if r.Version != pcp.Version || r.Result != pcp.UnsuppVersion {
				return failr("version %d MAP → %s, want version 2 UNSUPP_VERSION", v, hexdump(r.Raw))
			}
		}
		return pass("versions 1, 3, 4, 255 → 02 .. 01%s", note)
	}},
	{ID: "VER-04", Section: "RFC 6887 §8.2", Level: Impl, Name: "short unsupported-version packets answered, padded, not grown", Run: func(e *Env) Result {
		s := e.sock()
		b := s.try([]byte{0x01, 0x00})
		if b == nil {
			return failr("01 00: no reply (pcpd answers 02 80 00 01; dropping is the other reading of §8.2)")
		}
		if !bytes.Equal(b, []byte{0x02, 0x80, 0x00, 0x01}) {
			return failr("01 00 → %s, want 02 80 00 01", hexdump(b))
		}
		v3 := announce(e.Client)[:23]
		v3[0] = 3
		b = s.try(v3)
		if b == nil || len(b) != 24 {
			return failr("23-octet v3 → %s, want 24 octets", hexdump(b))
		}
		return pass("01 00 → 02 80 00 01; 23-octet v3 → 24 octets")
	}},
	{ID: "VER-05", Section: "RFC 6887 §7.2, §9", Level: Must, Name: "UNSUPP_VERSION copies the request", Run: func(e *Env) Result {
		s := e.sock()
		m := s.newMap(protoTCP, e.port(), 1234, 600)
		m.Version = 3
		req := m.bytes()
		r := s.ask(req)
		e.expectResult(r, pcp.UnsuppVersion, "version 3 MAP")
		e.copied(r, req, 24, "version 3 MAP")
		if !bytes.Equal(r.Raw[12:24], req[12:24]) {
			return Result{Fail, fmt.Sprintf("octets 12-23 %s, request had %s (PROTOCOL.md VER-05: left as copied)", hexdump(r.Raw[12:24]), hexdump(req[12:24]))}
		}
		return pass("octets 12-59 as sent")
	}},

	{ID: "HDR-01", Section: "RFC 6887 §7.2", Level: Must, Name: "reply header: version 2, R, opcode, octet 2 zero, reserved ignored", Run: func(e *Env) Result {
		s := e.sock()
		req := announce(e.Client)
		req[2], req[3] = 0xff, 0xff
		r := s.ask(req)
		e.header(r, req, "ANNOUNCE with octets 2-3 ffff")
		e.expectResult(r, pcp.Success, "ANNOUNCE with octets 2-3 ffff")
		req = s.mapBytes(600, option(0x7e, nil))
		req[2], req[3] = 0xff, 0xff
		r = s.ask(req)
		e.header(r, req, "MAP error with octets 2-3 ffff")
		return pass("ANNOUNCE → SUCCESS, error reply octet 2 = 00")
	}},
	{ID: "HDR-02", Section: "RFC 6887 §8.3", Level: Must, Name: "reply comes from the address and port 5351 the request hit", Run: func(e *Env) Result {
		s := e.sock()
		s.send(announce(e.Client))
		d, err := s.recv(time.Now().Add(3 * e.Timeout))
		if err != nil {
			return failr("no reply: %v", err)
		}
		if d.from != e.Server {
			return failr("reply from %s, request went to %s", d.from, e.Server)
		}
		return pass("reply from %s", d.from)
	}},
	{ID: "HDR-02", Section: "RFC 6887 §8.3", Level: Must, Name: "one mapping table across serving addresses", Needs: []Need{NeedServerAlt}, Run: func(e *Env) Result {
		s := e.sock()
		m := s.mapTCP()
		alt := &sock{e: e, c: s.c, server: e.ServerAlt, local: s.local}
		renew := m.req
		renew.ExtPort = 0
		r := alt.ask(renew.bytes())
		e.expectResult(r, pcp.Success, "renewal via "+e.ServerAlt.String())
		if r.ExtPort != m.r.ExtPort || r.ExtAddr != m.r.ExtAddr {
			return failr("renewal via %s → %s, mapping via %s had %s", e.ServerAlt, netip.AddrPortFrom(r.ExtAddr, r.ExtPort), e.Server, netip.AddrPortFrom(m.r.ExtAddr, m.r.ExtPort))
		}
		return pass("renewal via the second address found the mapping (%s)", netip.AddrPortFrom(r.ExtAddr, r.ExtPort))
	}},
	{ID: "HDR-03", Section: "RFC 6887 §7.3, §8.2", Level: Must, Name: "error reply copies opcode data and every option as sent", Run: func(e *Env) Result {
		s := e.sock()
		m := s.newMap(protoTCP, e.port(), 4321, 600, option(0xc8, []byte{1, 2, 3, 4}), option(0x7e, []byte{9, 9, 9, 9}))
		m.ExtAddr = other(e.Client)
		req := m.bytes()
		r := e.wantError(s, req, pcp.UnsuppOption, "MAP with an unknown mandatory option")
		e.copied(r, req, 24, "UNSUPP_OPTION reply")
		return pass("UNSUPP_OPTION reply: octets 24-%d as sent", len(req)-1)
	}},
	{ID: "HDR-04", Section: "RFC 6887 §7.2", Level: Impl, Name: "octets 12-23: zero when parsed, copied when not", Run: func(e *Env) Result {
		s := e.sock()
		m := s.newMap(protoTCP, e.port(), 0, 600)
		m.Client = other(e.Client)
		r := e.wantError(s, m.bytes(), pcp.AddressMismatch, "MAP with a wrong Client IP")
		if !bytes.Equal(r.Raw[12:24], make([]byte, 12)) {
			return failr("ADDRESS_MISMATCH octets 12-23 = %s, want zeros", hexdump(r.Raw[12:24]))
		}
		req := s.mapBytes(600)[:56]
		r = e.wantError(s, req, pcp.MalformedRequest, "56-octet MAP")
		if !bytes.Equal(r.Raw[12:24], req[12:24]) {
			return failr("MALFORMED_REQUEST octets 12-23 = %s, request had %s", hexdump(r.Raw[12:24]), hexdump(req[12:24]))
		}
		return pass("12 → zeros; 03 → copied")
	}},
	{ID: "HDR-05", Section: "RFC 6887 §7.3", Level: Must, Name: "success echoes only processed options, reserved octets zero", Run: func(e *Env) Result {
		s := e.sock()
		remote := netip.PrefixFrom(other(e.Client), e.Client.BitLen())
		if e.Data != nil {
			if src := e.sources(); len(src) > 0 {
				remote = netip.PrefixFrom(src[0], src[0].BitLen())
			}
		}
		p := e.port()
		// The optional option is 4-aligned so that servers mishandling
		// unaligned lengths (OPT-04's business) are judged on echoing only.
		m := s.newMap(protoTCP, p, p, 600, option(0xc8, []byte{0xaa, 0xbb, 0xcc, 0xdd}), filterPrefix(remote, 0))
		r := s.ask(m.bytes())
		if r.Result == pcp.UnsuppOption {
			return Result{NA, "FILTER unsupported (UNSUPP_OPTION)"}
		}
		e.expectResult(r, pcp.Success, "MAP + c8 + FILTER")
		mm := &mapping{s: s, req: m, r: r}
		e.cleanup(mm.deleteQuietly)
		if len(r.Raw) != 84 || !bytes.Equal(r.optCodes(), []byte{optFilter}) {
			return failr("reply %d octets with options %v, want 84 with FILTER only", len(r.Raw), r.optCodes())
		}
		if !bytes.Equal(r.Raw[12:24], make([]byte, 12)) || !bytes.Equal(r.Raw[37:40], make([]byte, 3)) || r.Raw[61] != 0 {
			return failr("reserved octets not zero: %s", hexdump(r.Raw))
		}
		return pass("84 octets, FILTER echoed, c8 dropped, reserved zero")
	}},
	{ID: "HDR-07", Section: "RFC 6887 §7.4", Level: Should, Name: "error lifetimes: long-class errors 1800 s", Run: func(e *Env) Result {
		s := e.sock()
		var bad, seen []string
		probe := func(name string, req []byte, want pcp.ResultCode) {
			r := s.ask(req)
			if r.Result != want {
				bad = append(bad, fmt.Sprintf("%s: got %s, want %s", name, r.Result, want))
				return
			}
			seen = append(seen, fmt.Sprintf("%s=%d", want, r.Lifetime))
			if r.Lifetime != longLifetime {
				bad = append(bad, fmt.Sprintf("%s lifetime %d", want, r.Lifetime))
			}
		}
		v3 := s.newMap(protoTCP, e.port(), 0, 600)
		v3.Version = 3
		probe("v3", v3.bytes(), pcp.UnsuppVersion)
		probe("56-octet MAP", s.mapBytes(600)[:56], pcp.MalformedRequest)
		op5 := announce(e.Client)
		op5[1] = 5
		probe("opcode 5", op5, pcp.UnsuppOpcode)
		probe("option 0x7e", s.mapBytes(600, option(0x7e, nil)), pcp.UnsuppOption)
		probe("FILTER length 0x40", append(s.mapBytes(600), 3, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), pcp.MalformedOption)
		mm := s.newMap(protoTCP, e.port(), 0, 600)
		mm.Client = other(e.Client)
		probe("wrong Client IP", mm.bytes(), pcp.AddressMismatch)
		if len(bad) > 0 {
			return failr("%s (seen: %s)", strings.Join(bad, "; "), strings.Join(seen, " "))
		}
		return pass("%s", strings.Join(seen, " "))
	}},
	{ID: "HDR-08", Section: "RFC 6887 §7.3", Level: Must, Name: "no reply exceeds 1100 octets", Run: func(e *Env) Result {
		s := e.sock()
		src := other(e.Client)
		var opts [][]byte
		for i := 0; i < 43; i++ { // 60 + 43×24 = 1092
			opts = append(opts, filterPrefix(netip.PrefixFrom(src, src.BitLen()), uint16(1000+i)))
		}
		opts = append(opts, option(0xc8, []byte{1, 2, 3, 4}))
		p := e.port()
		m := s.newMap(protoTCP, p, p, 600, opts...)
		req := m.bytes()
		r := s.ask(req)
		e.cleanup((&mapping{s: s, req: m, r: r}).deleteQuietly)
		if len(req) != 1100 || len(r.Raw) > 1100 {
			return failr("1100-octet request (%d) → %d-octet reply", len(req), len(r.Raw))
		}
		return pass("1100-octet MAP with 43 FILTERs → %s, %d octets", r.Result, len(r.Raw))
	}},
	{ID: "HDR-09", Section: "RFC 6887 §8, §15.1", Level: Must, Name: "repeated identical requests get identical replies", Run: func(e *Env) Result {
		s := e.sock()
		m := s.mapTCP()
		again := s.ask(m.req.bytes())
		if d := diffReplies(m.r.Raw, again.Raw); d != "" {
			return failr("MAP ×2: %s", d)
		}
		del := m.deleteReq()
		d1 := s.ask(del.bytes())
		d2 := s.ask(del.bytes())
		if d := diffReplies(d1.Raw, d2.Raw); d != "" {
			return failr("delete ×2: %s", d)
		}
		return pass("MAP ×2 and delete ×2 identical (epoch aside)")
	}},

	{ID: "ADDR-01", Section: "RFC 6887 §8.2, §14.1.1", Level: Must, Name: "Client IP ≠ source → ADDRESS_MISMATCH for every opcode", Run: func(e *Env) Result {
		s := e.sock()
		wrong := other(e.Client)
		m := s.newMap(protoTCP, e.port(), 0, 600)
		m.Client = wrong
		p := request{Op: opPeer, Lifetime: 600, Client: wrong, Nonce: nonce(), Proto: protoTCP, IntPort: e.port(), RemotePort: 80, Remote: e.remote()}
		var bad, got []string
		for _, q := range []request{{Op: opAnnounce, Client: wrong}, m, p} {
			r := s.ask(q.bytes())
			got = append(got, fmt.Sprintf("%s → %s", opName(q.Op), r.Result))
			if r.Result == pcp.Success {
				(&mapping{s: s, req: q, r: r}).deleteQuietly()
			}
			if r.Result != pcp.AddressMismatch || r.Version != pcp.Version || !r.R {
				bad = append(bad, opName(q.Op))
			}
		}
		if len(bad) > 0 {
			return failr("Client IP %s from %s: %s", wrong, e.Client, strings.Join(got, ", "))
		}
		return pass("ANNOUNCE, MAP, PEER with Client IP %s from %s → ADDRESS_MISMATCH", wrong, e.Client)
	}},
	{ID: "ADDR-02", Section: "RFC 6887 §5", Level: Must, Name: "IPv4 source matches only ::ffff:a.b.c.d", Needs: []Need{NeedIPv4}, Run: func(e *Env) Result {
		s := e.sock4()
		v4 := e.Client4.As4()
		compat := netip.AddrFrom16([16]byte{12: v4[0], 13: v4[1], 14: v4[2], 15: v4[3]})
		a := announce(compat)
		r := e.wantError(s, a, pcp.AddressMismatch, "ANNOUNCE with ::"+e.Client4.String())
		ok := s.ask(announce(e.Client4))
		e.expectResult(ok, pcp.Success, "ANNOUNCE with ::ffff:"+e.Client4.String())
		return pass("IPv4-compatible field → %s; IPv4-mapped → SUCCESS", r.Result)
	}},
	{ID: "ADDR-03", Section: "RFC 6887 §8.2, §13.1", Level: Must, Name: "address check precedes THIRD_PARTY", Run: func(e *Env) Result {
		s := e.sock()
		tp := e.ThirdParty
		if !tp.IsValid() {
			tp = other(other(e.Client))
		}
		m := s.newMap(protoTCP, e.port(), 0, 600, thirdParty(tp))
		m.Client = other(e.Client)
		e.wantError(s, m.bytes(), pcp.AddressMismatch, "wrong Client IP + THIRD_PARTY")
		return pass("wrong Client IP + THIRD_PARTY → ADDRESS_MISMATCH")
	}},

	{ID: "ANN-01", Section: "RFC 6887 §14.1.1", Level: Must, Name: "ANNOUNCE: requested lifetime ignored, optional options allowed", Run: func(e *Env) Result {
		s := e.sock()
		a := request{Op: opAnnounce, Lifetime: 99, Client: e.Client}
		r := s.ask(a.bytes())
		e.expectResult(r, pcp.Success, "ANNOUNCE lifetime 99")
		a.Opts = [][]byte{option(0xc8, []byte{1})}
		r = s.ask(a.bytes())
		e.expectResult(r, pcp.Success, "ANNOUNCE + optional option")
		return pass("lifetime 99 → SUCCESS lifetime %d; with option c8 → SUCCESS", r.Lifetime)
	}},
	{ID: "ANN-02", Section: "RFC 6887 §14.1.2", Level: Must, Name: "ANNOUNCE success form: 24 octets, lifetime 0, reserved zero", Run: func(e *Env) Result {
		s := e.sock()
		req := announce(e.Client)
		r := s.ask(req)
		want := []byte{0x02, 0x80, 0, 0, 0, 0, 0, 0}
		if len(r.Raw) != 24 || !bytes.Equal(r.Raw[:8], want) || !bytes.Equal(r.Raw[12:], make([]byte, 12)) {
			return failr("ANNOUNCE → %s, want 02 80 0000 00000000 <epoch> 00×12", hexdump(r.Raw))
		}
		return pass("%s", hexdump(r.Raw))
	}},

	{ID: "EPO-01", Section: "RFC 6887 §8.5", Level: Must, Name: "every reply carries the same epoch", Run: func(e *Env) Result {
		s := e.sock()
		a := s.ask(announce(e.Client))
		op5 := announce(e.Client)
		op5[1] = 5
		b := s.ask(op5)
		m := s.mapTCP()
		c := s.ask(announce(e.Client))
		lo, hi := min(a.Epoch, b.Epoch, m.r.Epoch, c.Epoch), max(a.Epoch, b.Epoch, m.r.Epoch, c.Epoch)
		if hi-lo > 1 {
			return failr("epochs %d (ANNOUNCE) %d (error) %d (MAP) %d (ANNOUNCE) within a second", a.Epoch, b.Epoch, m.r.Epoch, c.Epoch)
		}
		return pass("ANNOUNCE, UNSUPP_OPCODE, MAP: epoch %d-%d", lo, hi)
	}},
	{ID: "EPO-02", Section: "RFC 6887 §8.5", Level: Must, Name: "epoch advances with real time", Run: func(e *Env) Result {
		s := e.sock()
		t0 := time.Now()
		a := s.ask(announce(e.Client))
		time.Sleep(4 * time.Second)
		b := s.ask(announce(e.Client))
		el := time.Since(t0).Seconds()
		d := float64(b.Epoch) - float64(a.Epoch)
		// §8.5 client check: the server's elapsed time may differ from
		// the client's by 2 s + 1/16.
		if d < el*7/8-2 || d > el*9/8+2 || d < 0 {
			return failr("epoch %d → %d over %.1f s", a.Epoch, b.Epoch, el)
		}
		return pass("epoch %d → %d over %.1f s", a.Epoch, b.Epoch, el)
	}},

	{ID: "SEC-01", Section: "RFC 6887 §8.2, RFC 6886 §3.3", Level: Must, Name: "requests from outside the served interfaces are ignored", Needs: []Need{NeedOutside}, Run: func(e *Env) Result {
		o := e.Outside
		var n int
		for _, t := range o.Targets {
			src := o.Source6
			if t.Addr().Is4() {
				src = o.Source4
			}
			c, err := o.ListenPacket(netip.AddrPortFrom(src, 0))
			if err != nil {
				return failr("outside socket: %v", err)
			}
			e.cleanup(func() { c.Close() })
			s := &sock{e: e, c: c, server: t, local: netip.AddrPortFrom(src, 0)}
			m := request{Op: opMap, Lifetime: 600, Client: src, Nonce: nonce(), Proto: protoTCP, IntPort: e.port()}
			pkts := [][]byte{announce(src), m.bytes()}
			if t.Addr().Is4() {
				pkts = append(pkts, pmpAddress(), pmpMap(2, e.port(), 0, 3600))
			}
			for _, b := range pkts {
				if r := s.silent(b); r != nil {
					return failr("%s from outside (%s) answered: %s", hexdump(b), t, hexdump(r))
				}
				n++
			}
		}
		return pass("%d requests to %v from outside: no reply", n, o.Targets)
	}},
	{ID: "SEC-02", Section: "RFC 6887 §18.1", Level: Must, Name: "a source no client owns cannot map", Needs: []Need{NeedNotOwned}, Run: func(e *Env) Result {
		s := e.sockFrom(e.NotOwned, e.Server)
		p := e.port()
		m := s.newMap(protoTCP, p, p, 600)
		b := s.try(m.bytes())
		if b == nil {
			return pass("MAP from %s: no reply", e.NotOwned)
		}
		r, _ := parseResponse(b)
		if r != nil && r.Result == pcp.Success {
			(&mapping{s: s, req: m, r: r}).deleteQuietly()
			return failr("MAP from non-owned %s → SUCCESS", e.NotOwned)
		}
		return pass("MAP from %s → %s", e.NotOwned, r.Result)
	}},
	{ID: "SEC-04", Section: "RFC 6887 §17.2, PROTOCOL.md (f)", Level: Impl, Name: "no amplification: replies no longer than requests, except (f)", Run: func(e *Env) Result {
		s := e.sock()
		type probe struct {
			name  string
			s     *sock
			b     []byte
			allow int
		}
		var ps []probe
		add := func(s *sock, name string, b []byte, allow int) {
			ps = append(ps, probe{name, s, b, max(allow, len(b))})
		}
		add(s, "ANNOUNCE", announce(e.Client), 0)
		add(s, "01 00", []byte{1, 0}, 4)
		add(s, "25-octet v2", append(announce(e.Client), 0), 28)
		add(s, "MAP + unknown option", s.mapBytes(600, option(0x7e, nil)), 0)
		add(s, "opcode 9", append([]byte{2, 9}, make([]byte, 22)...), 0)
		m := s.newMap(protoTCP, e.port(), 0, 600)
		m.Client = other(e.Client)
		add(s, "MAP wrong IP", m.bytes(), 0)
		if e.NATPMP && e.Server4.IsValid() {
			s4 := e.sock4()
			add(s4, "NAT-PMP address", pmpAddress(), 12)
			add(s4, "NAT-PMP opcode 7", []byte{0, 7}, 4)
		}
		var lines []string
		for _, p := range ps {
			b := p.s.try(p.b)
			if len(b) > p.allow {
				return failr("%s: %d-octet request → %d-octet reply (allowed %d)", p.name, len(p.b), len(b), p.allow)
			}
			lines = append(lines, fmt.Sprintf("%s %d→%d", p.name, len(p.b), len(b)))
		}
		return pass("%s", strings.Join(lines, ", "))
	}},
}

// diffReplies compares two replies ignoring the epoch (octets 8-11).
func diffReplies(a, b []byte) string {
	if len(a) != len(b) {
		return fmt.Sprintf("lengths %d and %d", len(a), len(b))
	}
	for i := range a {
		if i >= 8 && i < 12 {
			continue
		}
		if a[i] != b[i] {
			return fmt.Sprintf("octet %d: %#02x then %#02x (%s / %s)", i, a[i], b[i], hexdump(a), hexdump(b))
		}
	}
	return ""
}

// remote is a plausible remote peer for PEER of the main family.
func (e *Env) remote() netip.Addr {
	if src := e.sources(); len(src) > 0 {
		return src[0]
	}
	if e.Client.Is4() {
		return netip.MustParseAddr("192.0.2.77")
	}
	return netip.MustParseAddr("2001:db8:ffff::77")
}

// sources are the data plane's internet sources of the main family.
func (e *Env) sources() []netip.Addr {
	if e.Data == nil {
		return nil
	}
	if e.Client.Is4() {
		return e.Data.Sources4
	}
	return e.Data.Sources6
}
