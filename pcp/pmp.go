package pcp

import (
	"net/netip"
	"strconv"
	"time"
)

// PMPOpcode is a NAT-PMP opcode (RFC 6886 §3).
type PMPOpcode uint8

// NAT-PMP opcodes.
const (
	PMPOpAddress PMPOpcode = 0 // external address request (§3.2)
	PMPOpMapUDP  PMPOpcode = 1 // UDP mapping (§3.3)
	PMPOpMapTCP  PMPOpcode = 2 // TCP mapping (§3.3)
)

// String returns "ADDRESS", "MAP_UDP", "MAP_TCP" or "OPCODE(n)".
func (o PMPOpcode) String() string {
	switch o {
	case PMPOpAddress:
		return "ADDRESS"
	case PMPOpMapUDP:
		return "MAP_UDP"
	case PMPOpMapTCP:
		return "MAP_TCP"
	}
	return "OPCODE(" + strconv.Itoa(int(o)) + ")"
}

// Protocol returns the protocol a mapping opcode maps, or ProtoAll.
func (o PMPOpcode) Protocol() Protocol {
	switch o {
	case PMPOpMapUDP:
		return ProtoUDP
	case PMPOpMapTCP:
		return ProtoTCP
	}
	return ProtoAll
}

// PMPResultCode is a NAT-PMP result code (RFC 6886 §3.5), 16 bits.
type PMPResultCode uint16

// NAT-PMP result codes.
const (
	PMPSuccess            PMPResultCode = 0
	PMPUnsupportedVersion PMPResultCode = 1
	PMPNotAuthorized      PMPResultCode = 2 // "Not Authorized/Refused"
	PMPNetworkFailure     PMPResultCode = 3
	PMPOutOfResources     PMPResultCode = 4
	PMPUnsupportedOpcode  PMPResultCode = 5
)

var pmpResultNames = [...]string{
	"SUCCESS", "UNSUPPORTED_VERSION", "NOT_AUTHORIZED", "NETWORK_FAILURE",
	"OUT_OF_RESOURCES", "UNSUPPORTED_OPCODE",
}

// String returns the RFC 6886 name in upper snake case, or "RESULT(n)".
func (r PMPResultCode) String() string {
	if int(r) < len(pmpResultNames) {
		return pmpResultNames[r]
	}
	return "RESULT(" + strconv.Itoa(int(r)) + ")"
}

// PMP message sizes (RFC 6886 §3.2-3.3).
const (
	PMPAddressRequestSize  = 2
	PMPAddressResponseSize = 12
	PMPMapRequestSize      = 12
	PMPMapResponseSize     = 16
)

// PMPRequest is a decoded NAT-PMP request.
type PMPRequest struct {
	Opcode                PMPOpcode
	InternalPort          uint16
	SuggestedExternalPort uint16
	Lifetime              time.Duration
}

// PMPResponse is a decoded NAT-PMP response (client side).
type PMPResponse struct {
	Opcode       PMPOpcode
	Result       PMPResultCode
	Epoch        Epoch
	ExternalAddr netip.Addr // address responses
	InternalPort uint16     // mapping responses
	ExternalPort uint16
	Lifetime     time.Duration
}

// ParsePMPRequest decodes a NAT-PMP request. Errors are *ParseError:
// Silent for packets to drop (< 2 octets, R bit, a mapping request under
// 12 octets: PKT-01/02, PMP-03), UNSUPP_VERSION for a version other than
// 0, UNSUPP_OPCODE for opcodes 3-127 (answer with
// AppendPMPUnsupportedOpcode, PMP-02).
func ParsePMPRequest(b []byte, r *PMPRequest) error {
	return errNotImplemented
}

// AppendPMPRequest appends a NAT-PMP request (client side).
func AppendPMPRequest(dst []byte, r *PMPRequest) []byte { return dst }

// AppendPMPAddressResponse appends a 12-octet external address reply
// (§3.2). The address is written as 0.0.0.0 unless result is success
// (PMP-03).
func AppendPMPAddressResponse(dst []byte, result PMPResultCode, epoch Epoch, ext netip.Addr) []byte {
	return dst
}

// AppendPMPMapResponse appends a 16-octet mapping reply (§3.3) for op.
func AppendPMPMapResponse(dst []byte, op PMPOpcode, result PMPResultCode, epoch Epoch, internalPort, externalPort uint16, lifetime time.Duration) []byte {
	return dst
}

// AppendPMPUnsupportedOpcode appends the PMP-02 echo of request.
func AppendPMPUnsupportedOpcode(dst, request []byte, epoch Epoch) []byte {
	return dst
}

// ParsePMPResponse decodes a NAT-PMP response (client side).
func ParsePMPResponse(b []byte, r *PMPResponse) error {
	return ErrMalformedResponse
}
