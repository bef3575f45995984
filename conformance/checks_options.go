package conformance

import (
	"bytes"
	"fmt"
	"net/netip"
	"strings"
	"unicode/utf8"

	"github.com/pcpd/pcpd/pcp"
)

// Option checks (PROTOCOL.md OPT, PF, FLT, TP).

// unsupported ends the check as NA when a server answered UNSUPP_OPTION
// to an option it may legitimately not implement.
func (e *Env) unsupported(r *response, what string) {
	if r.Result == pcp.UnsuppOption {
		e.naf("%s not supported (UNSUPP_OPTION)", what)
	}
}

// peerAddr is a remote prefix of the client's family for FILTERs that
// need not carry traffic.
func (e *Env) filterRemote() netip.Prefix {
	r := e.remote()
	return netip.PrefixFrom(r, r.BitLen())
}

// badLenFilter is a FILTER whose length says 0x40 but only 20 octets
// follow: the options cannot be walked (OPT-02).
func badLenFilter() []byte {
	return append([]byte{optFilter, 0, 0, 0x40}, make([]byte, 20)...)
}

// pfSupported sends a PREFER_FAILURE MAP and ends the check as NA if the
// server does not implement PREFER_FAILURE.
func (e *Env) pfSupported(s *sock) {
	p := e.port()
	m := s.newMap(protoTCP, p, p, 600, preferFailure())
	r := s.ask(m.bytes())
	e.unsupported(r, "PREFER_FAILURE")
	if r.Result == pcp.Success {
		(&mapping{s: s, req: m, r: r}).deleteQuietly()
	}
}

var optionChecks = []Check{
	{ID: "OPT-01", Section: "RFC 6887 §7.3", Level: Must, Name: "options fill the rest of the packet: PREFER_FAILURE then FILTER", Run: func(e *Env) Result {
		s := e.sock()
		p := e.port()
		m := s.newMap(protoTCP, p, p, 600, preferFailure(), filterPrefix(e.filterRemote(), 0))
		r := s.ask(m.bytes())
		e.unsupported(r, "PREFER_FAILURE or FILTER")
		e.expectResult(r, pcp.Success, "MAP + PREFER_FAILURE + FILTER")
		e.cleanup((&mapping{s: s, req: m, r: r}).deleteQuietly)
		if !bytes.Equal(r.optCodes(), []byte{optPreferFailure, optFilter}) {
			return failr("echoed options %v, want [2 3]", r.optCodes())
		}
		return pass("SUCCESS, both echoed in order")
	}},
	{ID: "OPT-01", Section: "RFC 6887 §7.3", Level: Impl, Name: "non-zero option padding is ignored", Run: func(e *Env) Result {
		s := e.sock()
		p := e.port()
		m := s.newMap(protoTCP, p, p, 600, []byte{0xc8, 0, 0, 1, 0x41, 0xff, 0xff, 0xff})
		r := s.ask(m.bytes())
		e.expectResult(r, pcp.Success, "MAP + option with non-zero pad")
		e.cleanup((&mapping{s: s, req: m, r: r}).deleteQuietly)
		return pass("SUCCESS")
	}},
	{ID: "OPT-02", Section: "RFC 6887 §7.3", Level: Must, Name: "option running past the end → MALFORMED_OPTION", Run: func(e *Env) Result {
		s := e.sock()
		req := append(s.mapBytes(600), badLenFilter()...)
		r := s.ask(req)
		e.expectResult(r, pcp.MalformedOption, "FILTER length 0x40 with 20 octets")
		e.copied(r, req, 24, "MALFORMED_OPTION reply")
		c := append(s.mapBytes(600), 0xc8, 0, 0, 9, 1, 2, 3, 4)
		r = s.ask(c)
		e.expectResult(r, pcp.MalformedOption, "optional option length 9 with 4 octets")
		return pass("03 00 0040 +20 → 06; c8 00 0009 +4 → 06")
	}},
	{ID: "OPT-03", Section: "RFC 6887 §7.3", Level: Must, Name: "unknown mandatory options → UNSUPP_OPTION, full copy", Run: func(e *Env) Result {
		s := e.sock()
		for _, code := range []byte{0, 4, 12, 99, 127} {
			req := s.mapBytes(600, option(code, []byte{0, 0, 0, 0}))
			r := e.wantError(s, req, pcp.UnsuppOption, fmt.Sprintf("option %d", code))
			e.copied(r, req, 24, fmt.Sprintf("option %d", code))
		}
		return pass("codes 0, 4, 12, 99, 127 → UNSUPP_OPTION, copied")
	}},
	{ID: "OPT-04", Section: "RFC 6887 §7.3", Level: Must, Name: "unknown optional options are ignored and not echoed", Run: func(e *Env) Result {
		s := e.sock()
		p := e.port()
		m := s.newMap(protoTCP, p, p, 600, option(0xc8, []byte{0xaa, 0xbb, 0xcc}), option(0xff, nil))
		r := s.ask(m.bytes())
		e.expectResult(r, pcp.Success, "MAP + c8 + ff")
		e.cleanup((&mapping{s: s, req: m, r: r}).deleteQuietly)
		if len(r.Opts) != 0 {
			return failr("options echoed: %v", r.optCodes())
		}
		return pass("SUCCESS, 60 octets, nothing echoed")
	}},
	{ID: "OPT-05", Section: "RFC 6887 §7.3, §13", Level: Must, Name: "known option with wrong length or repeated → MALFORMED_OPTION", Run: func(e *Env) Result {
		s := e.sock()
		var done []string
		try := func(name string, req []byte, optional string) {
			r := s.ask(req)
			if r.Result == pcp.UnsuppOption {
				done = append(done, name+": n.a. ("+optional+" unsupported)")
				return
			}
			e.expectResult(r, pcp.MalformedOption, name)
			done = append(done, name+" → 06")
		}
		try("FILTER length 16", s.mapBytes(600, option(optFilter, make([]byte, 16))), "FILTER")
		try("PREFER_FAILURE ×2", s.mapBytes(600, preferFailure(), preferFailure()), "PREFER_FAILURE")
		try("PREFER_FAILURE length 4", s.mapBytes(600, option(optPreferFailure, []byte{0, 0, 0, 0})), "PREFER_FAILURE")
		if e.ThirdParty.IsValid() {
			try("THIRD_PARTY length 4", s.mapBytes(600, option(optThirdParty, []byte{1, 2, 3, 4})), "THIRD_PARTY")
			try("THIRD_PARTY ×2", s.mapBytes(600, thirdParty(e.ThirdParty), thirdParty(e.ThirdParty)), "THIRD_PARTY")
		}
		return pass("%s", strings.Join(done, "; "))
	}},
	{ID: "OPT-06", Section: "RFC 6887 §7.3", Level: Must, Name: "options processed in order; the first failure decides", Run: func(e *Env) Result {
		s := e.sock()
		bad := filter(200, 0, e.remote()) // prefix length 200: malformed
		unknown := option(0x7e, nil)
		r := s.ask(s.mapBytes(600, unknown, bad))
		e.expectResult(r, pcp.UnsuppOption, "[unknown mandatory, bad FILTER]")
		r = s.ask(s.mapBytes(600, bad, unknown))
		e.unsupported(r, "FILTER")
		e.expectResult(r, pcp.MalformedOption, "[bad FILTER, unknown mandatory]")
		return pass("[7e, bad FILTER] → 05; reversed → 06")
	}},
	{ID: "OPT-07", Section: "RFC 6887 §12.1, §13.2", Level: Must, Name: "PREFER_FAILURE in PEER → MALFORMED_REQUEST", Run: func(e *Env) Result {
		s := e.sock()
		p := request{Op: opPeer, Lifetime: 600, Client: e.Client, Nonce: nonce(), Proto: protoTCP, IntPort: e.port(), RemotePort: 80, Remote: e.remote(), Opts: [][]byte{preferFailure()}}
		r := s.ask(p.bytes())
		if r.Result == pcp.UnsuppOpcode {
			return Result{NA, "PEER unsupported"}
		}
		e.expectResult(r, pcp.MalformedRequest, "PEER + PREFER_FAILURE")
		return pass("PEER + PREFER_FAILURE → 03")
	}},
	{ID: "OPT-07", Section: "RFC 6887 §7.3, §14.1", Level: Impl, Name: "mandatory option not valid for the opcode → MALFORMED_OPTION", Run: func(e *Env) Result {
		s := e.sock()
		a := request{Op: opAnnounce, Client: e.Client, Opts: [][]byte{filterPrefix(e.filterRemote(), 0)}}
		e.wantError(s, a.bytes(), pcp.MalformedOption, "ANNOUNCE + FILTER")
		a.Opts = [][]byte{preferFailure()}
		e.wantError(s, a.bytes(), pcp.MalformedOption, "ANNOUNCE + PREFER_FAILURE")
		a.Opts = [][]byte{option(0xc8, []byte{1})}
		r := s.ask(a.bytes())
		e.expectResult(r, pcp.Success, "ANNOUNCE + optional c8")
		return pass("ANNOUNCE + FILTER/PREFER_FAILURE → 06; + optional → SUCCESS")
	}},
	{ID: "OPT-09", Section: "RFC 7220 §3-4", Level: Should, Name: "DESCRIPTION stored (≥ 128 octets), echoed only if sent", Run: func(e *Env) Result {
		s := e.sock()
		p := e.port()
		short := "conformance " + strings.Repeat("d", 88) // 100 octets
		m := s.newMap(protoTCP, p, p, 600, description(short))
		r := s.ask(m.bytes())
		e.expectResult(r, pcp.Success, "MAP + DESCRIPTION")
		e.cleanup((&mapping{s: s, req: m, r: r}).deleteQuietly)
		o, ok := r.opt(optDescription)
		if !ok {
			return Result{NA, "DESCRIPTION not echoed: not implemented (ignoring an optional option is compliant with RFC 6887)"}
		}
		if string(o.Data) != short {
			return failr("100-octet DESCRIPTION echoed as %q", o.Data)
		}
		long := strings.Repeat("é", 150) // 300 octets of 2-octet runes
		m.Opts = [][]byte{description(long)}
		r = s.ask(m.bytes())
		e.expectResult(r, pcp.Success, "renewal + 300-octet DESCRIPTION")
		o, ok = r.opt(optDescription)
		switch {
		case !ok:
			return failr("300-octet DESCRIPTION not echoed")
		case len(o.Data) < 128 || !strings.HasPrefix(long, string(o.Data)):
			return failr("300-octet DESCRIPTION echoed as %d octets %q (want a prefix ≥ 128)", len(o.Data), o.Data)
		case !utf8.Valid(o.Data):
			return failr("truncated DESCRIPTION is not valid UTF-8")
		}
		kept := len(o.Data)
		m.Opts = nil
		r = s.ask(m.bytes())
		e.expectResult(r, pcp.Success, "renewal without DESCRIPTION")
		if _, ok := r.opt(optDescription); ok {
			return failr("DESCRIPTION echoed although not sent")
		}
		return pass("100 echoed; 300 → %d (UTF-8 boundary); not sent → not echoed", kept)
	}},
	{ID: "OPT-09", Section: "RFC 7220 §3", Level: Impl, Name: "DESCRIPTION that is not UTF-8 is ignored, the request proceeds", Run: func(e *Env) Result {
		s := e.sock()
		p := e.port()
		m := s.newMap(protoTCP, p, p, 600, description("bad \xff utf-8!")) // 12 octets: aligned
		r := s.ask(m.bytes())
		e.expectResult(r, pcp.Success, "MAP + invalid UTF-8 DESCRIPTION")
		e.cleanup((&mapping{s: s, req: m, r: r}).deleteQuietly)
		if _, ok := r.opt(optDescription); ok {
			return failr("invalid UTF-8 DESCRIPTION stored and echoed")
		}
		return pass("SUCCESS, not echoed")
	}},
	{ID: "OPT-10", Section: "RFC 7753 §4", Level: Must, Name: "PORT_SET ignored (single port) or honoured", Run: func(e *Env) Result {
		s := e.sock()
		p := e.port()
		ps := make([]byte, 5)
		be.PutUint16(ps, 4)
		be.PutUint16(ps[2:], p)
		m := s.newMap(protoTCP, p, 0, 600, option(optPortSet, ps))
		r := s.ask(m.bytes())
		e.expectResult(r, pcp.Success, "MAP + PORT_SET size 4")
		e.cleanup((&mapping{s: s, req: m, r: r}).deleteQuietly)
		if _, ok := r.opt(optPortSet); !ok {
			return pass("PORT_SET ignored: single-port mapping %d (compliant)", r.ExtPort)
		}
		zero := make([]byte, 5)
		be.PutUint16(zero[2:], p)
		r2 := s.ask(s.mapBytes(600, option(optPortSet, zero)))
		e.expectResult(r2, pcp.MalformedOption, "PORT_SET size 0")
		return pass("PORT_SET honoured; size 0 → 06")
	}},

	{ID: "PF-01", Section: "RFC 6887 §13.2", Level: Must, Name: "PREFER_FAILURE (optional to support): if accepted, assigned = suggested exactly, echoed", Run: func(e *Env) Result {
		s := e.sock()
		p := e.port()
		m := s.newMap(protoTCP, p, e.port(), 600, preferFailure())
		r := s.ask(m.bytes())
		if r.Result == pcp.UnsuppOption {
			return pass("PREFER_FAILURE unsupported → UNSUPP_OPTION (allowed)")
		}
		e.expectResult(r, pcp.Success, "MAP + PREFER_FAILURE")
		e.cleanup((&mapping{s: s, req: m, r: r}).deleteQuietly)
		if r.ExtPort != m.ExtPort {
			return failr("suggested %d, assigned %d", m.ExtPort, r.ExtPort)
		}
		if _, ok := r.opt(optPreferFailure); !ok {
			return failr("PREFER_FAILURE not echoed")
		}
		return pass("int %d sugg %d → %d, echoed", p, m.ExtPort, r.ExtPort)
	}},
	{ID: "PF-02", Section: "RFC 6887 §11.3, §13.2", Level: Must, Name: "PREFER_FAILURE with port 0 or lifetime 0 → MALFORMED_OPTION", Run: func(e *Env) Result {
		s := e.sock()
		e.pfSupported(s)
		m := s.newMap(protoTCP, e.port(), 0, 600, preferFailure())
		e.wantError(s, m.bytes(), pcp.MalformedOption, "PREFER_FAILURE, suggested port 0")
		m = s.newMap(protoTCP, e.port(), 5000, 0, preferFailure())
		e.wantError(s, m.bytes(), pcp.MalformedOption, "PREFER_FAILURE, lifetime 0")
		return pass("port 0 → 06; lifetime 0 → 06")
	}},
	{ID: "PF-03", Section: "RFC 6887 §11.3, §13.2", Level: Must, Name: "existing mapping with another external port → CANNOT_PROVIDE_EXTERNAL", Run: func(e *Env) Result {
		s := e.sock()
		e.pfSupported(s)
		m := s.mapTCP()
		again := m.req
		again.ExtPort = m.r.ExtPort + 1
		again.Opts = [][]byte{preferFailure()}
		r := s.ask(again.bytes())
		e.expectResult(r, pcp.CannotProvideExternal, fmt.Sprintf("renewal of ext %d with PREFER_FAILURE sugg %d", m.r.ExtPort, again.ExtPort))
		return pass("ext %d, PF sugg %d → 11 lifetime %d", m.r.ExtPort, again.ExtPort, r.Lifetime)
	}},
	{ID: "PF-04", Section: "RFC 6887 §11.3, §13.2", Level: Must, Name: "suggestion not grantable → CANNOT_PROVIDE_EXTERNAL", Run: func(e *Env) Result {
		s := e.sock()
		e.pfSupported(s)
		m1 := s.mapTCP()
		m2 := s.newMap(protoTCP, e.port(), m1.r.ExtPort, 600, preferFailure())
		m2.ExtAddr = m1.r.ExtAddr
		r := s.ask(m2.bytes())
		if r.Result == pcp.Success {
			(&mapping{s: s, req: m2, r: r}).deleteQuietly()
		}
		e.expectResult(r, pcp.CannotProvideExternal, fmt.Sprintf("PF for %s, held by another internal port", netip.AddrPortFrom(m1.r.ExtAddr, m1.r.ExtPort)))
		return pass("taken %d → 11", m1.r.ExtPort)
	}},
	{ID: "PF-05", Section: "RFC 6887 §13.2", Level: Impl, Name: "CANNOT_PROVIDE_EXTERNAL lifetime = conflict's remaining + 240 s", Run: func(e *Env) Result {
		s := e.sock()
		e.pfSupported(s)
		m1 := s.mapTCP()
		m2 := s.newMap(protoTCP, e.port(), m1.r.ExtPort, 600, preferFailure())
		m2.ExtAddr = m1.r.ExtAddr
		r := s.ask(m2.bytes())
		e.expectResult(r, pcp.CannotProvideExternal, "PF on a taken port")
		want := m1.r.Lifetime + 240
		if r.Lifetime+3 < want || r.Lifetime > want {
			return failr("lifetime %d, want ≈ %d (conflict's %d + 240)", r.Lifetime, want, m1.r.Lifetime)
		}
		return pass("lifetime %d (conflict %d + 240)", r.Lifetime, m1.r.Lifetime)
	}},

	{ID: "FLT-01", Section: "RFC 6887 §13.3", Level: Must, Name: "FILTER accepted on MAP, echoed", Run: func(e *Env) Result {
		s := e.sock()
		p := e.port()
		f := filterPrefix(e.filterRemote(), 443)
		_, r := s.mapFiltered(p, "MAP + 2 FILTERs", f, filterPrefix(netip.PrefixFrom(e.remote(), 48).Masked(), 0))
		if !bytes.Equal(r.optCodes(), []byte{optFilter, optFilter}) {
			return failr("echoed options %v, want two FILTERs", r.optCodes())
		}
		if o, _ := r.opt(optFilter); !bytes.Equal(o.Data, f[4:]) {
			return failr("FILTER echoed as %s, sent %s", hexdump(o.Data), hexdump(f[4:]))
		}
		return pass("SUCCESS, both FILTERs echoed as sent")
	}},
	{ID: "FLT-02", Section: "RFC 6887 §13.3", Level: Must, Name: "FILTER prefix length out of range → MALFORMED_OPTION", Run: func(e *Env) Result {
		s := e.sock()
		var did []string
		if e.Client.Is6() {
			r := s.ask(s.mapBytes(600, filter(129, 0, e.remote())))
			e.unsupported(r, "FILTER")
			e.expectResult(r, pcp.MalformedOption, "IPv6 FILTER /129")
			did = append(did, "IPv6 /129 → 06")
		}
		if e.Server4.IsValid() && e.Client4.IsValid() && e.ExternalV4.IsValid() {
			s4 := e.sock4()
			r := s4.ask(s4.mapBytes(600, filter(95, 0, netip.MustParseAddr("192.0.2.0"))))
			e.unsupported(r, "FILTER")
			e.expectResult(r, pcp.MalformedOption, "::ffff:192.0.2.0/95")
			p := e.port()
			m := s4.newMap(protoTCP, p, p, 600, filter(120, 0, netip.MustParseAddr("192.0.2.0")))
			r = s4.ask(m.bytes())
			e.expectResult(r, pcp.Success, "::ffff:192.0.2.0/120")
			e.cleanup((&mapping{s: s4, req: m, r: r}).deleteQuietly)
			did = append(did, "IPv4-mapped /95 → 06, /120 → SUCCESS")
		}
		if len(did) == 0 {
			return Result{NA, "no IPv6 client and no IPv4 mappings"}
		}
		return pass("%s", strings.Join(did, "; "))
	}},
	{ID: "FLT-05", Section: "RFC 6887 §13.3", Level: Must, Name: "FILTER with lifetime 0 → MALFORMED_OPTION; a bad FILTER fails the request", Run: func(e *Env) Result {
		s := e.sock()
		m := s.mapTCP()
		del := m.deleteReq()
		del.Opts = append(del.Opts, filterPrefix(e.filterRemote(), 0))
		r := s.ask(del.bytes())
		e.unsupported(r, "FILTER")
		e.expectResult(r, pcp.MalformedOption, "delete + FILTER")
		p := e.port()
		bad := s.newMap(protoTCP, p, p, 600, filterPrefix(e.filterRemote(), 0), filter(200, 0, e.remote()))
		r = s.ask(bad.bytes())
		e.expectResult(r, pcp.MalformedOption, "[good FILTER, bad FILTER]")
		return pass("delete + FILTER → 06; [good, bad] → 06")
	}},
	{ID: "FLT-06", Section: "RFC 6887 §13.3", Level: Must, Name: "too many FILTERs → EXCESSIVE_REMOTE_PEERS", Run: func(e *Env) Result {
		s := e.sock()
		n := e.FilterLimit + 1
		if e.FilterLimit == 0 {
			n = 43
		}
		var opts [][]byte
		base := e.remote()
		for i := 0; i < n; i++ {
			opts = append(opts, filterPrefix(netip.PrefixFrom(base, base.BitLen()), uint16(2000+i)))
		}
		p := e.port()
		m := s.newMap(protoTCP, p, p, 600, opts...)
		r := s.ask(m.bytes())
		e.unsupported(r, "FILTER")
		if r.Result == pcp.Success {
			(&mapping{s: s, req: m, r: r}).deleteQuietly()
			if e.FilterLimit == 0 {
				return Result{NA, fmt.Sprintf("%d FILTERs accepted: limit not reachable in 1100 octets", n)}
			}
		}
		e.expectResult(r, pcp.ExcessiveRemotePeers, fmt.Sprintf("%d FILTERs", n))
		return pass("%d FILTERs → 13 lifetime %d", n, r.Lifetime)
	}},
	{ID: "FLT-08", Section: "RFC 6887 §10, §13.3", Level: Impl, Name: "FILTER of the other family → MALFORMED_OPTION", Run: func(e *Env) Result {
		s := e.sock()
		var f []byte
		if e.Client.Is6() {
			f = filter(120, 0, netip.MustParseAddr("192.0.2.0"))
		} else {
			f = filter(64, 0, netip.MustParseAddr("2001:db8::"))
		}
		r := s.ask(s.mapBytes(600, f))
		e.unsupported(r, "FILTER")
		e.expectResult(r, pcp.MalformedOption, "FILTER of the other family")
		return pass("→ 06")
	}},

	{ID: "TP-01", Section: "RFC 6887 §13.1", Level: Must, Name: "THIRD_PARTY naming the source → MALFORMED_REQUEST", Needs: []Need{NeedTP}, Run: func(e *Env) Result {
		s := e.sock()
		e.wantError(s, s.mapBytes(600, thirdParty(e.Client)), pcp.MalformedRequest, "THIRD_PARTY = source")
		return pass("→ 03")
	}},
	{ID: "TP-02", Section: "RFC 6887 §13.1", Level: Must, Name: "THIRD_PARTY not offered → UNSUPP_OPTION", Run: tpOff},
	{ID: "OPT-08", Section: "RFC 6887 §7.3, §13.1", Level: Must, Name: "mandatory option not allowed for this client → UNSUPP_OPTION", Run: tpOff},
	{ID: "TP-03", Section: "RFC 6887 §13.1, PROTOCOL.md (b)", Level: Must, Name: "THIRD_PARTY for another client's address → NOT_AUTHORIZED", Needs: []Need{NeedTP, NeedOther}, Run: tp03},
	{ID: "SEC-03", Section: "RFC 6887 §13.1, §17.1, §18", Level: Must, Name: "THIRD_PARTY adds no power: only addresses the requester may use", Needs: []Need{NeedTP, NeedOther}, Run: tp03},
	{ID: "TP-04", Section: "RFC 6887 §11.3, §13.1", Level: Must, Name: "THIRD_PARTY maps the named address, echoed, deletable", Needs: []Need{NeedTP}, Run: func(e *Env) Result {
		s := e.sock()
		p := e.port()
		m := s.create(s.newMap(protoTCP, p, p, 600, thirdParty(e.ThirdParty)))
		o, ok := m.r.opt(optThirdParty)
		if !ok || netip.AddrFrom16([16]byte(o.Data)).Unmap() != e.ThirdParty {
			return failr("THIRD_PARTY not echoed (%v)", m.r.optCodes())
		}
		detail := fmt.Sprintf("mapped %s → %s", netip.AddrPortFrom(e.ThirdParty, p), netip.AddrPortFrom(m.r.ExtAddr, m.r.ExtPort))
		if e.Data != nil {
			e.serve(protoTCP, p)
			if err := e.probe(protoTCP, netip.Addr{}, netip.AddrPortFrom(m.r.ExtAddr, m.r.ExtPort)); err != nil {
				return failr("%s, but inbound TCP fails: %v", detail, err)
			}
			detail += ", inbound TCP works"
		}
		r := s.ask(m.deleteReq().bytes())
		e.expectResult(r, pcp.Success, "delete with THIRD_PARTY")
		if e.Data != nil {
			if err := e.probe(protoTCP, netip.Addr{}, netip.AddrPortFrom(m.r.ExtAddr, m.r.ExtPort)); err == nil {
				return failr("%s; after delete inbound TCP still works", detail)
			}
			detail += ", closed after delete"
		}
		return pass("%s", detail)
	}},
}

// tpOff checks TP-02/OPT-08 on a target that does not offer THIRD_PARTY
// to this client.
func tpOff(e *Env) Result {
	if e.ThirdParty.IsValid() {
		return Result{NA, "target offers THIRD_PARTY to this client"}
	}
	s := e.sock()
	e.wantError(s, s.mapBytes(600, thirdParty(other(other(e.Client)))), pcp.UnsuppOption, "THIRD_PARTY")
	return pass("THIRD_PARTY → 05")
}

// tp03 is TP-03 (and SEC-03): THIRD_PARTY naming another client's
// address or a never-openable one is refused.
func tp03(e *Env) Result {
	s := e.sock()
	p := e.port()
	m := s.newMap(protoTCP, p, p, 600, thirdParty(e.OtherClient))
	r := s.ask(m.bytes())
	if r.Result == pcp.Success {
		(&mapping{s: s, req: m, r: r}).deleteQuietly()
	}
	e.expectResult(r, pcp.NotAuthorized, "THIRD_PARTY "+e.OtherClient.String())
	loop := netip.IPv6Loopback()
	if e.Client.Is4() {
		loop = netip.MustParseAddr("127.0.0.1")
	}
	e.wantError(s, s.mapBytes(600, thirdParty(loop)), pcp.NotAuthorized, "THIRD_PARTY loopback")
	return pass("other client's %s → 02; %s → 02", e.OtherClient, loop)
}
