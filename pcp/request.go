package pcp

import (
	"bytes"
	"net/netip"
	"unicode/utf8"
)

// Parser holds the server configuration that changes how requests decode.
// The zero value supports every option.
type Parser struct {
	// DisableThirdParty makes THIRD_PARTY an unsupported mandatory option
	// (UNSUPP_OPTION, PROTOCOL.md TP-02/OPT-08). Set it per request for a
	// client that may not use THIRD_PARTY.
	DisableThirdParty bool
	// DisablePreferFailure makes PREFER_FAILURE unsupported (PF-01).
	DisablePreferFailure bool
	// IgnorePortSet ignores PORT_SET (compliant, OPT-10).
	IgnorePortSet bool
	// DeferOptionChecks skips the option semantics step (PF-02, FLT-05,
	// FLT-08, OPT-10 size) so the engine can run it after ownership as
	// MAP-01 orders, by calling Request.CheckOptions.
	DeferOptionChecks bool
	// KeepUnknownMandatory accepts unknown mandatory options (0-127) and
	// keeps them in Options.Unknown instead of failing with UNSUPP_OPTION,
	// for a caller that decides about them itself. A request carrying
	// more unknown options than Options can keep still fails, so no
	// mandatory option is ever dropped unseen.
	KeepUnknownMandatory bool
}

// Errors ParseRequest returns: shared, read-only values (see ParseError).
var (
	errShort        = newDrop("request shorter than 2 octets (PKT-01)")
	errRBit         = newDrop("R bit set on a request (PKT-02)")
	errShortHeader  = newDrop("version 2 request shorter than 24 octets (PKT-03)")
	errVersion      = newParseError(UnsuppVersion, "unsupported version (VER-02, VER-03)")
	errTooLong      = newParseError(MalformedRequest, "request longer than 1100 octets (PKT-04)")
	errNotAligned   = newParseError(MalformedRequest, "request length not a multiple of 4 (PKT-05)")
	errShortMap     = newParseError(MalformedRequest, "MAP request shorter than 60 octets (PKT-06)")
	errShortPeer    = newParseError(MalformedRequest, "PEER request shorter than 80 octets (PKT-06)")
	errMismatch     = newParseError(AddressMismatch, "client IP address differs from the source address (ADDR-01)")
	errOpcode       = newParseError(UnsuppOpcode, "unsupported opcode (PKT-07)")
	errOptTruncated = newParseError(MalformedOption, "option runs past the end of the packet (OPT-02)")
	errOptUnknown   = newParseError(UnsuppOption, "unsupported mandatory option (OPT-03, OPT-08)")
	errOptOpcode    = newParseError(MalformedOption, "option not valid for this opcode (OPT-07)")
	errPFPeer       = newParseError(MalformedRequest, "PREFER_FAILURE in a PEER request (OPT-07, RFC 6887 12.1)")
	errOptLength    = newParseError(MalformedOption, "option has the wrong length (OPT-05)")
	errOptRepeated  = newParseError(MalformedOption, "once-only option repeated (OPT-05)")
	errFilterPrefix = newParseError(MalformedOption, "FILTER prefix length out of range (FLT-02)")
	errMapProtoPort = newParseError(MalformedRequest, "MAP with protocol 0 and a non-zero internal port (MAP-03)")
	errPeerZero     = newParseError(MalformedRequest, "PEER with protocol, internal port or remote port 0 (PEER-02)")
	errPeerRemote   = newParseError(MalformedRequest, "PEER remote peer address unusable (PEER-03)")
	errTPSource     = newParseError(MalformedRequest, "THIRD_PARTY address is the client's own address (TP-01)")
	errPFPortZero   = newParseError(MalformedOption, "PREFER_FAILURE with suggested external port 0 (PF-02)")
	errPFDelete     = newParseError(MalformedOption, "PREFER_FAILURE with lifetime 0 (PF-02)")
	errPFPortSet    = newParseError(MalformedOption, "PREFER_FAILURE with PORT_SET (PF-02, RFC 7753 4)")
	errFilterDelete = newParseError(MalformedOption, "FILTER with lifetime 0 (FLT-05)")
	errFilterFamily = newParseError(MalformedOption, "FILTER remote family differs from the internal address's (FLT-08)")
	errPortSetSize  = newParseError(MalformedOption, "PORT_SET size 0 (OPT-10)")
)

// ParseRequest decodes a PCP request with the zero Parser. See
// Parser.ParseRequest.
func ParseRequest(b []byte, src netip.Addr, req *Request) error {
	var p Parser
	return p.ParseRequest(b, src, req)
}

// ParseRequest decodes the PCP request b that arrived from src into req,
// running every check of PROTOCOL.md PKT-09 in that order:
//
//	< 2 octets (drop) → R bit (drop) → version (UNSUPP_VERSION; version 0
//	too: divert NAT-PMP before calling) → < 24 octets (drop) → > 1100,
//	length not ×4, MAP < 60, PEER < 80 (MALFORMED_REQUEST) →
//	ADDRESS_MISMATCH (src against the Client IP; skipped if src is
//	invalid) → unknown opcode (UNSUPP_OPCODE) → options in order (OPT-*)
//	→ opcode rules (MAP-03, PEER-02, PEER-03, TP-01) → option semantics
//	(Request.CheckOptions, unless DeferOptionChecks).
//
// On error req is left untouched and the error is a *ParseError. On
// success every field of req is set; req.Options.Description aliases b.
func (p *Parser) ParseRequest(b []byte, src netip.Addr, req *Request) error {
	n := len(b)
	switch {
	case n < 2:
		return errShort
	case b[1]&0x80 != 0:
		return errRBit
	case b[0] != Version:
		return errVersion
	case n < HeaderSize:
		return errShortHeader
	case n > MaxMessageSize:
		return errTooLong
	case n%4 != 0:
		return errNotAligned
	}
	op := Opcode(b[1])
	dataEnd := HeaderSize
	switch op {
	case OpMap:
		if n < MapSize {
			return errShortMap
		}
		dataEnd = MapSize
	case OpPeer:
		if n < PeerSize {
			return errShortPeer
		}
		dataEnd = PeerSize
	}
	client := addrFrom16(b[8:24])
	// ADDR-02: a dual-stack socket reports IPv4 sources as IPv4-mapped;
	// zones never appear in the field.
	if src.IsValid() {
		if src = src.Unmap(); src.Zone() != "" {
			src = src.WithZone("")
		}
		if client != src {
			return errMismatch
		}
	}
	if op > OpPeer {
		return errOpcode
	}

	var s optSummary
	if err := p.walkOptions(b[dataEnd:], op, &s, nil); err != nil {
		return err
	}

	lifetime := be.Uint32(b[4:8])
	var m MapData
	var peer PeerData
	if op != OpAnnounce {
		m = MapData{
			Nonce:        Nonce(b[24:36]),
			Protocol:     Protocol(b[36]),
			InternalPort: be.Uint16(b[40:42]),
			ExternalPort: be.Uint16(b[42:44]),
			ExternalAddr: addrFrom16(b[44:60]),
		}
	}
	if op == OpPeer {
		peer = PeerData{
			RemotePort: be.Uint16(b[60:62]),
			RemoteAddr: addrFrom16(b[64:80]),
		}
	}

	// Opcode rules decidable from the bytes, in MAP-01's order
	// (proto/port, then THIRD_PARTY).
	internal := client
	if s.tp.IsValid() {
		internal = s.tp
	}
	switch op {
	case OpMap:
		if m.Protocol == ProtoAll && m.InternalPort != 0 {
			return errMapProtoPort
		}
	case OpPeer:
		if m.Protocol == ProtoAll || m.InternalPort == 0 || peer.RemotePort == 0 {
			return errPeerZero
		}
		r := peer.RemoteAddr
		if r.IsUnspecified() || r.IsLoopback() || r.IsMulticast() || r.Is4() != internal.Is4() {
			return errPeerRemote
		}
	}
	// TP-01: ClientAddr equals the source here (or src was not given).
	if s.tp.IsValid() && s.tp == client {
		return errTPSource
	}
	if !p.DeferOptionChecks {
		if err := s.check(op, lifetime, m.ExternalPort, internal.Is4()); err != nil {
			return err
		}
	}

	// Everything is valid: assign. The Options are filled field by field
	// so the filter array is not cleared on every request.
	req.Opcode = op
	req.Lifetime = duration(lifetime)
	req.ClientAddr = client
	req.Map = m
	req.Peer = peer
	p.walkOptions(b[dataEnd:], op, &s, &req.Options)
	return nil
}

// optSummary is what the validating pass over the options learns.
type optSummary struct {
	seen       uint8 // once-only options met: 1<<slot
	tp         netip.Addr
	pf         bool
	portSet    bool
	portSize   uint16
	nfilter    int
	filter4    bool // some non-clearing FILTER has an IPv4 remote
	filter6    bool // some non-clearing FILTER has an IPv6 remote
	hasOptions bool
	nunknown   int // options of codes pcpd does not know
}

const (
	seenTP = 1 << iota
	seenPF
	seenDesc
	seenPortSet
)

// walkOptions walks the options area b of an opcode-op request. With
// out == nil it validates (OPT-01..08) and fills s; with out != nil it is
// the second pass over options already validated and fills out.
func (p *Parser) walkOptions(b []byte, op Opcode, s *optSummary, out *Options) error {
	if out != nil {
		out.reset()
	}
	for off := 0; off < len(b); {
		code, data, next, ok := nextOption(b, off)
		if !ok {
			return errOptTruncated
		}
		off = next
		if out != nil {
			fillOption(out, code, data, op, p)
			continue
		}
		if err := p.checkOption(s, code, data, op); err != nil {
			return err
		}
	}
	return nil
}

// checkOption validates one option in request order (OPT-06) and notes
// what CheckOptions needs.
func (p *Parser) checkOption(s *optSummary, code OptionCode, data []byte, op Opcode) error {
	switch code {
	case OptThirdParty:
		switch {
		case p.DisableThirdParty:
			return errOptUnknown
		case op == OpAnnounce:
			return errOptOpcode
		case len(data) != 16:
			return errOptLength
		case s.seen&seenTP != 0:
			return errOptRepeated
		}
		s.seen |= seenTP
		s.tp = addrFrom16(data)
	case OptPreferFailure:
		switch {
		case p.DisablePreferFailure:
			return errOptUnknown
		case op == OpPeer:
			return errPFPeer
		case op == OpAnnounce:
			return errOptOpcode
		case len(data) != 0:
			return errOptLength
		case s.seen&seenPF != 0:
			return errOptRepeated
		}
		s.seen |= seenPF
		s.pf = true
	case OptFilter:
		switch {
		case op != OpMap:
			return errOptOpcode
		case len(data) != 20:
			return errOptLength
		case s.nfilter == MaxFilters: // cannot happen within 1100 octets
			return errOptLength
		}
		f, ok := decodeFilter(data)
		if !ok {
			return errFilterPrefix
		}
		s.nfilter++
		if !f.Clear() {
			if f.Remote.Addr().Is4() {
				s.filter4 = true
			} else {
				s.filter6 = true
			}
		}
	case OptDescription:
		if op == OpAnnounce {
			return nil // optional, not for ANNOUNCE: ignored (OPT-07)
		}
		if s.seen&seenDesc != 0 {
			return errOptRepeated
		}
		s.seen |= seenDesc
	case OptPortSet:
		if op != OpMap || p.IgnorePortSet {
			return nil // optional: ignored
		}
		switch {
		case len(data) != 5:
			return errOptLength
		case s.seen&seenPortSet != 0:
			return errOptRepeated
		}
		s.seen |= seenPortSet
		s.portSet = true
		s.portSize = be.Uint16(data)
	default:
		s.nunknown++
		if code.Mandatory() && (!p.KeepUnknownMandatory || s.nunknown > MaxUnknown) {
			return errOptUnknown // OPT-03
		}
		// OPT-04: unknown optional options (PREFIX64 too) are ignored,
		// but kept for the caller to look at.
	}
	return nil
}

// fillOption is checkOption's second pass: the option is known valid.
// What a request may carry but pcpd ignores is dropped here; unknown
// options are kept aside.
func fillOption(o *Options, code OptionCode, data []byte, op Opcode, p *Parser) {
	switch code {
	case OptThirdParty, OptPreferFailure, OptFilter:
	case OptDescription:
		if op == OpAnnounce || !validDescription(data) {
			return // OPT-09: a bad DESCRIPTION is ignored
		}
	case OptPortSet:
		if op != OpMap || p.IgnorePortSet {
			return
		}
	default:
		if len(o.Unknown) < MaxUnknown {
			o.Unknown = append(o.Unknown, RawOption{Code: code, Data: data})
		}
		return
	}
	o.add(code, data)
}

// validDescription applies RFC 7220 §3 and OPT-09: UTF-8, no NUL, at most
// MaxDescription octets.
func validDescription(d []byte) bool {
	return len(d) <= MaxDescription && bytes.IndexByte(d, 0) < 0 && utf8.Valid(d)
}

// decodeFilter decodes FILTER data (§13.3): reserved, prefix length,
// remote port, remote address. Prefix length 0 clears (FLT-03); otherwise
// IPv4-mapped addresses take 96-128 and IPv6 0-128 (FLT-02).
func decodeFilter(d []byte) (Filter, bool) {
	plen := int(d[1])
	if plen == 0 {
		return Filter{}, true
	}
	if plen > 128 {
		return Filter{}, false
	}
	a := addrFrom16(d[4:20])
	if a.Is4() {
		if plen < 96 {
			return Filter{}, false
		}
		plen -= 96
	}
	return Filter{Remote: netip.PrefixFrom(a, plen), RemotePort: be.Uint16(d[2:4])}, true
}

// decodePortSet decodes PORT_SET data (RFC 7753 §4): size, first internal
// port, then the parity bit in the low bit of the fifth octet.
func decodePortSet(d []byte) PortSet {
	return PortSet{
		Size:              be.Uint16(d[0:2]),
		FirstInternalPort: be.Uint16(d[2:4]),
		Parity:            d[4]&1 != 0,
	}
}

// check is the option semantics step (see Request.CheckOptions).
func (s *optSummary) check(op Opcode, lifetime uint32, suggestedPort uint16, internal4 bool) error {
	if s.pf {
		switch {
		case suggestedPort == 0:
			return errPFPortZero
		case lifetime == 0:
			return errPFDelete
		case s.portSet:
			return errPFPortSet
		}
	}
	if s.nfilter > 0 {
		if lifetime == 0 {
			return errFilterDelete
		}
		if (internal4 && s.filter6) || (!internal4 && s.filter4) {
			return errFilterFamily
		}
	}
	if s.portSet && lifetime != 0 && s.portSize == 0 {
		return errPortSetSize
	}
	return nil
}

// CheckOptions runs the option semantics checks that need the whole
// request (MAP-01's "option semantics" step): PREFER_FAILURE with
// suggested port 0, lifetime 0 or PORT_SET (PF-02); FILTER with lifetime
// 0 (FLT-05) or a remote family other than the internal address's
// (FLT-08); PORT_SET size 0 with a non-zero lifetime (OPT-10). It returns
// nil or a *ParseError with MALFORMED_OPTION. ParseRequest already runs it
// unless Parser.DeferOptionChecks is set.
func (r *Request) CheckOptions() error {
	o := &r.Options
	s := optSummary{
		tp:       o.ThirdParty,
		pf:       o.PreferFailure,
		portSet:  o.HasPortSet,
		portSize: o.PortSet.Size,
		nfilter:  len(o.Filters),
	}
	for _, f := range o.Filters {
		if !f.Clear() {
			if f.Remote.Addr().Is4() {
				s.filter4 = true
			} else {
				s.filter6 = true
			}
		}
	}
	internal := r.ClientAddr
	if o.ThirdParty.IsValid() {
		internal = o.ThirdParty
	}
	return s.check(r.Opcode, seconds(r.Lifetime), r.Map.ExternalPort, internal.Is4())
}

// AppendRequest appends the wire form of r (client side): the header,
// the opcode data of MAP or PEER (reserved octets zero), and the options
// (see Options). It encodes what it is given, valid or not, so tests can
// build hostile requests.
func AppendRequest(dst []byte, r *Request) []byte {
	size := HeaderSize
	switch r.Opcode {
	case OpMap:
		size = MapSize
	case OpPeer:
		size = PeerSize
	}
	dst, b := grow(dst, size)
	b[0] = Version
	b[1] = byte(r.Opcode) & 0x7f
	be.PutUint32(b[4:8], seconds(r.Lifetime))
	put16(b[8:24], r.ClientAddr)
	putOpcodeData(b, r.Opcode, &r.Map, &r.Peer)
	return appendOptions(dst, &r.Options)
}

// putOpcodeData writes MAP/PEER opcode data into the message b.
func putOpcodeData(b []byte, op Opcode, m *MapData, p *PeerData) {
	if op != OpMap && op != OpPeer {
		return
	}
	copy(b[24:36], m.Nonce[:])
	b[36] = byte(m.Protocol)
	be.PutUint16(b[40:42], m.InternalPort)
	be.PutUint16(b[42:44], m.ExternalPort)
	put16(b[44:60], m.ExternalAddr)
	if op == OpPeer {
		be.PutUint16(b[60:62], p.RemotePort)
		put16(b[64:80], p.RemoteAddr)
	}
}
