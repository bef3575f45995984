package pcp

import (
	"net/netip"
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
}

// ParseRequest decodes a PCP request with the zero Parser. See
// Parser.ParseRequest.
func ParseRequest(b []byte, src netip.Addr, req *Request) error {
	var p Parser
	return p.ParseRequest(b, src, req)
}

// ParseRequest decodes the PCP request b that arrived from src into req,
// running every check of PROTOCOL.md PKT-09 in that order: < 2 octets →
// R bit → version → < 24 → size / ×4 / opcode length → ADDRESS_MISMATCH
// (src compared with the Client IP; skipped if src is invalid) → unknown
// opcode → options → opcode rules (MAP-03, PEER-02, PEER-03, TP-01) →
// option semantics (unless DeferOptionChecks).
//
// On error req is left untouched and the error is a *ParseError. On
// success every field of req is set.
func (p *Parser) ParseRequest(b []byte, src netip.Addr, req *Request) error {
	return errNotImplemented
}

// CheckOptions runs the option semantics checks that need the whole
// request (MAP-01 "option semantics"): PREFER_FAILURE with suggested port
// 0, lifetime 0 or PORT_SET (PF-02); FILTER with lifetime 0 (FLT-05) or a
// remote family other than the internal address's (FLT-08); PORT_SET size
// 0 (OPT-10). It returns nil or a *ParseError with MALFORMED_OPTION.
func (r *Request) CheckOptions() error {
	return nil
}

// AppendRequest appends the wire form of r (client side). Options are
// written in the order they were decoded, then any others in code order.
func AppendRequest(dst []byte, r *Request) []byte {
	return dst
}

var errNotImplemented = newParseError(MalformedRequest, "not implemented")
