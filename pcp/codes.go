// Package pcp is the wire codec for the Port Control Protocol version 2
// (RFC 6887, with RFC 7220 DESCRIPTION and RFC 7753 PORT_SET) and for
// NAT-PMP version 0 (RFC 6886).
//
// It decodes into caller-owned values and encodes by appending to
// caller-owned buffers, so the hot path allocates nothing. Every decision
// that can be made from the bytes of a packet (and its source address) is
// made here, in the order of PROTOCOL.md PKT-09; decisions that need server
// state (ownership, leases, quotas) belong to the engine.
//
// No amplification (PROTOCOL.md (f)): every reply this package builds is
// at most MaxMessageSize octets and, for PCP, a multiple of 4. A reply is
// never longer than its request except in these cases, all forced by the
// RFCs: a PCP error reply pads a request whose length is not a multiple of
// 4 by 1-3 octets (AppendErrorResponse; worst 2 → 4 octets, VER-04); the
// NAT-PMP address reply is 12 octets for a 2-octet request and the mapping
// reply 16 for 12 (RFC 6886 §3.2-3.3); the NAT-PMP unsupported-opcode echo
// of a 2-3-octet request is 4 octets (AppendPMPUnsupportedOpcode). Success
// replies built from a decoded request echo at most what it carried
// (DESCRIPTION only shrinks, ignored options are dropped). The fuzz
// targets in ../fuzz check all of this.
//
// Decoded values may alias their input: Options.Description points into
// the packet, Options.Filters into the Options value itself. Copy them
// before keeping them beyond the packet buffer or the value.
//
// The package imports only the standard library.
package pcp

import (
	"strconv"
	"time"
)

// Well-known ports and sizes (RFC 6887 §7, §19.1).
const (
	// Port is the UDP port a PCP or NAT-PMP server listens on.
	Port = 5351
	// ClientPort is the UDP port unsolicited ANNOUNCE / NAT-PMP address
	// notifications are sent to.
	ClientPort = 5350
	// MaxMessageSize is the largest PCP message (§7); no reply exceeds it.
	MaxMessageSize = 1100
	// Version is the PCP version this package speaks.
	Version = 2
	// PMPVersion is the NAT-PMP version (RFC 6886), which PCP servers
	// answer for backwards compatibility (RFC 6887 Appendix A).
	PMPVersion = 0

	// HeaderSize is the size of the common request and response header.
	HeaderSize = 24
	// MapSize is the size of a MAP request or response without options.
	MapSize = HeaderSize + 36
	// PeerSize is the size of a PEER request or response without options.
	PeerSize = MapSize + 20
	// MaxFilters is the most FILTER options a MAP request can carry
	// within MaxMessageSize: (1100-60)/24.
	MaxFilters = (MaxMessageSize - MapSize) / filterOptSize
	// MaxDescription is the longest DESCRIPTION pcpd accepts (PROTOCOL.md
	// OPT-09: 1100 minus the MAP request and the option header).
	MaxDescription = 1016
)

// Opcode is a PCP opcode (RFC 6887 §19.2).
type Opcode uint8

// Opcodes pcpd implements. Every other value is answered UNSUPP_OPCODE.
const (
	OpAnnounce Opcode = 0 // §14.1
	OpMap      Opcode = 1 // §11
	OpPeer     Opcode = 2 // §12
)

// String returns the RFC name of the opcode, or "OPCODE(n)".
func (o Opcode) String() string {
	switch o {
	case OpAnnounce:
		return "ANNOUNCE"
	case OpMap:
		return "MAP"
	case OpPeer:
		return "PEER"
	case 3:
		return "AUTHENTICATION"
	}
	return "OPCODE(" + strconv.Itoa(int(o)) + ")"
}

// ResultCode is a PCP result code (RFC 6887 §7.4, §19.4).
type ResultCode uint8

// PCP result codes; String returns the RFC spelling shown beside each.
const (
	Success               ResultCode = 0  // SUCCESS
	UnsuppVersion         ResultCode = 1  // UNSUPP_VERSION
	NotAuthorized         ResultCode = 2  // NOT_AUTHORIZED
	MalformedRequest      ResultCode = 3  // MALFORMED_REQUEST
	UnsuppOpcode          ResultCode = 4  // UNSUPP_OPCODE
	UnsuppOption          ResultCode = 5  // UNSUPP_OPTION
	MalformedOption       ResultCode = 6  // MALFORMED_OPTION
	NetworkFailure        ResultCode = 7  // NETWORK_FAILURE
	NoResources           ResultCode = 8  // NO_RESOURCES
	UnsuppProtocol        ResultCode = 9  // UNSUPP_PROTOCOL
	UserExQuota           ResultCode = 10 // USER_EX_QUOTA
	CannotProvideExternal ResultCode = 11 // CANNOT_PROVIDE_EXTERNAL
	AddressMismatch       ResultCode = 12 // ADDRESS_MISMATCH
	ExcessiveRemotePeers  ResultCode = 13 // EXCESSIVE_REMOTE_PEERS
)

// resultNames is written by hand (no generator needed at build time);
// TestResultCodeString checks it against the RFC table.
var resultNames = [...]string{
	"SUCCESS", "UNSUPP_VERSION", "NOT_AUTHORIZED", "MALFORMED_REQUEST",
	"UNSUPP_OPCODE", "UNSUPP_OPTION", "MALFORMED_OPTION", "NETWORK_FAILURE",
	"NO_RESOURCES", "UNSUPP_PROTOCOL", "USER_EX_QUOTA",
	"CANNOT_PROVIDE_EXTERNAL", "ADDRESS_MISMATCH", "EXCESSIVE_REMOTE_PEERS",
}

// String returns the RFC spelling ("NOT_AUTHORIZED"), or "RESULT(n)"
// (14-23 are RFC 7652 authentication codes, which pcpd never sends).
func (r ResultCode) String() string {
	if int(r) < len(resultNames) {
		return resultNames[r]
	}
	return "RESULT(" + strconv.Itoa(int(r)) + ")"
}

// Error lifetimes recommended by RFC 6887 §7.4 (PROTOCOL.md §3).
const (
	LongErrorLifetime  = 30 * time.Minute
	ShortErrorLifetime = 30 * time.Second
)

// ErrorLifetime is the Lifetime pcpd puts in an error reply with this
// result code (PROTOCOL.md §3 table, HDR-07): 30 s for the short
// (transient) class, 1800 s for the long class, 0 for SUCCESS.
// CANNOT_PROVIDE_EXTERNAL is "by cause"; its default here is the short
// class, and the engine overrides it for a live conflict (PF-05).
func (r ResultCode) ErrorLifetime() time.Duration {
	switch r {
	case Success:
		return 0
	case NetworkFailure, NoResources, UserExQuota, CannotProvideExternal:
		return ShortErrorLifetime
	}
	return LongErrorLifetime
}

// Protocol is an IANA protocol number as carried in MAP and PEER.
type Protocol uint8

// Protocols named by PROTOCOL.md; any other number decodes as is.
const (
	ProtoAll  Protocol = 0 // all protocols (MAP only)
	ProtoTCP  Protocol = 6
	ProtoUDP  Protocol = 17
	ProtoSCTP Protocol = 132
)

// String returns "tcp", "udp", "sctp", "all", or the number.
func (p Protocol) String() string {
	switch p {
	case ProtoAll:
		return "all"
	case ProtoTCP:
		return "tcp"
	case ProtoUDP:
		return "udp"
	case ProtoSCTP:
		return "sctp"
	}
	return strconv.Itoa(int(p))
}

// OptionCode is a PCP option code (RFC 6887 §7.3, §19.3). Codes 0-127
// are mandatory to process, 128-255 optional.
type OptionCode uint8

// Option codes pcpd knows.
const (
	OptThirdParty    OptionCode = 1   // §13.1
	OptPreferFailure OptionCode = 2   // §13.2
	OptFilter        OptionCode = 3   // §13.3
	OptDescription   OptionCode = 128 // RFC 7220
	OptPrefix64      OptionCode = 129 // RFC 7225, ignored
	OptPortSet       OptionCode = 130 // RFC 7753
)

// Mandatory reports whether a server that does not understand the option
// must reject the request (UNSUPP_OPTION, §7.3).
func (c OptionCode) Mandatory() bool { return c < 128 }

// String returns the RFC name of the option, or "OPTION(n)".
func (c OptionCode) String() string {
	switch c {
	case OptThirdParty:
		return "THIRD_PARTY"
	case OptPreferFailure:
		return "PREFER_FAILURE"
	case OptFilter:
		return "FILTER"
	case OptDescription:
		return "DESCRIPTION"
	case OptPrefix64:
		return "PREFIX64"
	case OptPortSet:
		return "PORT_SET"
	}
	return "OPTION(" + strconv.Itoa(int(c)) + ")"
}

// Nonce is the 96-bit Mapping Nonce of MAP and PEER (§11.1).
type Nonce [12]byte

// Epoch is the server's Epoch Time in seconds (§8.5), also NAT-PMP's
// "Seconds Since Start of Epoch" (RFC 6886 §3.6).
type Epoch uint32

// Option sizes on the wire, header included.
const (
	optHeaderSize        = 4
	thirdPartyOptSize    = optHeaderSize + 16
	preferFailureOptSize = optHeaderSize
	filterOptSize        = optHeaderSize + 20
	portSetOptSize       = optHeaderSize + 8 // 5 octets of data + 3 pad
)
