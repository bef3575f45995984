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

// Errors ParsePMPRequest returns: shared, read-only values.
var (
	errPMPShortMap = newDrop("NAT-PMP mapping request shorter than 12 octets (PMP-03)")
	errPMPOpcode   = newParseError(UnsuppOpcode, "unsupported NAT-PMP opcode (PMP-02)")
)

// ParsePMPRequest decodes a NAT-PMP request (RFC 6886 §3.2, §3.3).
// Errors are *ParseError: Silent for packets to drop (< 2 octets, R bit:
// PKT-01/02; a mapping request under 12 octets: PMP-03), UNSUPP_VERSION
// for a version other than 0, UNSUPP_OPCODE for opcodes 3-127 (answer
// with AppendPMPUnsupportedOpcode, PMP-02). Octets beyond the message and
// the reserved octets are ignored (PMP-03). On error r is untouched.
func ParsePMPRequest(b []byte, r *PMPRequest) error {
	switch {
	case len(b) < 2:
		return errShort
	case b[1]&0x80 != 0:
		return errRBit
	case b[0] != PMPVersion:
		return errVersion
	}
	op := PMPOpcode(b[1])
	switch op {
	case PMPOpAddress:
		*r = PMPRequest{Opcode: op}
	case PMPOpMapUDP, PMPOpMapTCP:
		if len(b) < PMPMapRequestSize {
			return errPMPShortMap
		}
		*r = PMPRequest{
			Opcode:                op,
			InternalPort:          be.Uint16(b[4:6]),
			SuggestedExternalPort: be.Uint16(b[6:8]),
			Lifetime:              duration(be.Uint32(b[8:12])),
		}
	default:
		return errPMPOpcode
	}
	return nil
}

// AppendPMPRequest appends a NAT-PMP request (client side): 2 octets for
// the address request, 12 for a mapping request, reserved octets zero.
// Other opcodes are written as a 2-octet request.
func AppendPMPRequest(dst []byte, r *PMPRequest) []byte {
	if r.Opcode != PMPOpMapUDP && r.Opcode != PMPOpMapTCP {
		return append(dst, PMPVersion, byte(r.Opcode)&0x7f)
	}
	dst, b := grow(dst, PMPMapRequestSize)
	b[1] = byte(r.Opcode)
	be.PutUint16(b[4:6], r.InternalPort)
	be.PutUint16(b[6:8], r.SuggestedExternalPort)
	be.PutUint32(b[8:12], seconds(r.Lifetime))
	return dst
}

// AppendPMPAddressResponse appends a 12-octet external address reply
// (§3.2): version 0, opcode 128, result, SSSoE, address. The address is
// written as 0.0.0.0 unless result is success and ext is IPv4 (PMP-03).
func AppendPMPAddressResponse(dst []byte, result PMPResultCode, epoch Epoch, ext netip.Addr) []byte {
	dst, b := grow(dst, PMPAddressResponseSize)
	b[1] = 0x80
	be.PutUint16(b[2:4], uint16(result))
	be.PutUint32(b[4:8], uint32(epoch))
	if ext = ext.Unmap(); result == PMPSuccess && ext.Is4() {
		a := ext.As4()
		copy(b[8:12], a[:])
	}
	return dst
}

// AppendPMPMapResponse appends a 16-octet mapping reply (§3.3, PMP-09)
// for op (128+op on the wire).
func AppendPMPMapResponse(dst []byte, op PMPOpcode, result PMPResultCode, epoch Epoch, internalPort, externalPort uint16, lifetime time.Duration) []byte {
	dst, b := grow(dst, PMPMapResponseSize)
	b[1] = 0x80 | byte(op)
	be.PutUint16(b[2:4], uint16(result))
	be.PutUint32(b[4:8], uint32(epoch))
	be.PutUint16(b[8:10], internalPort)
	be.PutUint16(b[10:12], externalPort)
	be.PutUint32(b[12:16], seconds(lifetime))
	return dst
}

// AppendPMPUnsupportedOpcode appends the PMP-02 reply to a request with
// opcode 3-127: the request echoed (at most MaxMessageSize octets) with
// the opcode's top bit set and result 5 in octets 2-3; a 2- or 3-octet
// request is extended to 4 (impl). When the echo is at least 8 octets
// long, octets 4-7 carry the SSSoE (EPO-01: every NAT-PMP reply carries
// it). A request shorter than 2 octets gets no reply.
func AppendPMPUnsupportedOpcode(dst, request []byte, epoch Epoch) []byte {
	n := len(request)
	if n < 2 {
		return dst
	}
	n = min(n, MaxMessageSize)
	dst, b := grow(dst, max(n, 4))
	copy(b, request[:n])
	b[1] |= 0x80
	be.PutUint16(b[2:4], uint16(PMPUnsupportedOpcode))
	if len(b) >= 8 {
		be.PutUint32(b[4:8], uint32(epoch))
	}
	return dst
}

// Errors ParsePMPResponse returns; all wrap ErrMalformedResponse.
var (
	errPMPRespHeader = wrapResp("not a NAT-PMP response (version, R bit)")
	errPMPRespSize   = wrapResp("NAT-PMP response too short for its opcode")
)

// ParsePMPResponse decodes a NAT-PMP response (client side): version 0,
// opcode 128+op, 12 octets for the address reply, 16 for mapping replies.
// Replies to other opcodes decode as header only (opcode, result, and
// SSSoE when present). On error r is untouched.
func ParsePMPResponse(b []byte, r *PMPResponse) error {
	if len(b) < 4 || b[0] != PMPVersion || b[1]&0x80 == 0 {
		return errPMPRespHeader
	}
	op := PMPOpcode(b[1] & 0x7f)
	res := PMPResponse{Opcode: op, Result: PMPResultCode(be.Uint16(b[2:4]))}
	switch op {
	case PMPOpAddress:
		if len(b) < PMPAddressResponseSize {
			return errPMPRespSize
		}
		res.Epoch = Epoch(be.Uint32(b[4:8]))
		res.ExternalAddr = netip.AddrFrom4([4]byte(b[8:12]))
	case PMPOpMapUDP, PMPOpMapTCP:
		if len(b) < PMPMapResponseSize {
			return errPMPRespSize
		}
		res.Epoch = Epoch(be.Uint32(b[4:8]))
		res.InternalPort = be.Uint16(b[8:10])
		res.ExternalPort = be.Uint16(b[10:12])
		res.Lifetime = duration(be.Uint32(b[12:16]))
	default:
		if len(b) >= 8 {
			res.Epoch = Epoch(be.Uint32(b[4:8]))
		}
	}
	*r = res
	return nil
}
