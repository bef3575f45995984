package pcp

import (
	"net/netip"
	"time"
)

// Request is a decoded PCP request (RFC 6887 §7.1, §11.1, §12.1, §14.1).
// Addresses are unmapped: an IPv4 client appears as a 4-byte netip.Addr.
type Request struct {
	Opcode Opcode
	// Lifetime is the Requested Lifetime (whole seconds on the wire).
	Lifetime time.Duration
	// ClientAddr is the PCP Client's IP Address field.
	ClientAddr netip.Addr
	// Map is the opcode data of MAP and the first 36 octets of PEER.
	Map MapData
	// Peer is the rest of PEER's opcode data.
	Peer PeerData
	// Options holds the options the codec processed for this opcode.
	Options Options
}

// MapData is the opcode data MAP and PEER share (§11.1, §12.1). In a
// request ExternalPort and ExternalAddr are the suggestion, in a response
// the assignment.
type MapData struct {
	Nonce        Nonce
	Protocol     Protocol
	InternalPort uint16
	ExternalPort uint16
	ExternalAddr netip.Addr
}

// PeerData is the remote peer part of PEER (§12.1).
type PeerData struct {
	RemotePort uint16
	RemoteAddr netip.Addr
}

// Options are the options pcpd processes (RFC 6887 §13, RFC 7220,
// RFC 7753). Options that are ignored (optional-range codes pcpd does not
// process, or options not meaningful for the opcode and in the optional
// range) are not represented.
//
// Filters is backed by an array inside Options, so decoding allocates
// nothing; a copy of the Options value shares that array with the
// original until Filters is reassigned. Description aliases the decoded
// packet.
type Options struct {
	// ThirdParty is the THIRD_PARTY internal address; invalid if absent.
	ThirdParty netip.Addr
	// PreferFailure is set when PREFER_FAILURE was present.
	PreferFailure bool
	// Filters are the FILTER options in request order. A filter whose
	// prefix length was 0 ("remove all filters", PROTOCOL.md FLT-03) has
	// an invalid Remote; see Filter.Clear.
	Filters []Filter
	// Description is the DESCRIPTION text; HasDescription tells an empty
	// description (which clears, OPT-09) from an absent one. A DESCRIPTION
	// that is not valid UTF-8, contains NUL or exceeds MaxDescription is
	// ignored (OPT-09) and leaves both unset.
	Description    []byte
	HasDescription bool
	// PortSet is the PORT_SET option (RFC 7753); valid when HasPortSet.
	PortSet    PortSet
	HasPortSet bool
	// Unknown keeps the options pcpd does not understand, in request order
	// (at most MaxUnknown of them): optional ones (128-255), which the
	// parser ignores (OPT-04), and, with Parser.KeepUnknownMandatory,
	// mandatory ones (0-127), so the caller decides UNSUPP_OPTION itself.
	// They are never echoed in a reply and Equal does not compare them.
	// Data aliases the request.
	Unknown []RawOption

	// order records the codes of the options above in the order they
	// appeared, so a reply echoes them in request order (HDR-05).
	order  [maxOrder]OptionCode
	norder uint8
	// filterBuf backs Filters, unknownBuf Unknown.
	filterBuf  [MaxFilters]Filter
	unknownBuf [MaxUnknown]RawOption
}

// MaxUnknown bounds how many unknown options a decoded Options keeps.
const MaxUnknown = 8

// RawOption is an option as it came on the wire: its code and its data
// (Length octets, padding excluded).
type RawOption struct {
	Code OptionCode
	Data []byte
}

// maxOrder bounds the options Options can echo: each single option once
// plus every FILTER.
const maxOrder = 4 + MaxFilters

// Filter is one FILTER option (§13.3).
type Filter struct {
	// Remote is the remote peer prefix, not masked (the reply echoes the
	// address as sent). IPv4 prefixes are unmapped: wire length 96+n is
	// IPv4 /n. Invalid for a prefix-length-0 filter.
	Remote netip.Prefix
	// RemotePort is the remote peer port; 0 means all ports.
	RemotePort uint16
}

// Clear reports whether this is a prefix-length-0 FILTER, which removes
// every filter of the mapping, earlier ones in the same request included
// (PROTOCOL.md FLT-03, RFC 6887 EID 3891).
func (f Filter) Clear() bool { return !f.Remote.IsValid() }

// PortSet is the PORT_SET option (RFC 7753 §4).
type PortSet struct {
	Size              uint16
	FirstInternalPort uint16
	Parity            bool
}

// Response is a PCP response (RFC 6887 §7.2).
type Response struct {
	Opcode Opcode
	Result ResultCode
	// Lifetime is the granted lifetime, or for an error how long the
	// client should wait before retrying.
	Lifetime time.Duration
	Epoch    Epoch
	Map      MapData
	Peer     PeerData
	// Options are the options echoed (HDR-05: only processed ones).
	Options Options
}
