package pcp

import "time"

// AppendResponse appends the wire form of r (RFC 6887 §7.2): version 2,
// R set, octet 2 zero, reserved octets zero, opcode data for MAP and
// PEER, then r.Options (HDR-05). A response that would exceed
// MaxMessageSize is replaced by a MALFORMED_REQUEST response without
// options (HDR-08 encoder guard); Len tells the size beforehand.
func AppendResponse(dst []byte, r *Response) []byte {
	return dst
}

// Len returns the encoded size of r before the HDR-08 guard.
func (r *Response) Len() int { return 0 }

// AppendErrorResponse appends the error reply to request (HDR-03
// copy-error): the request's first MaxMessageSize octets, zero-padded to
// a multiple of 4, with version 2, the R bit, octet 2 zero, result,
// lifetime and epoch set, and octets 12-23 zeroed unless the result is
// one of the "unparsed" codes 1, 3, 4, 6 (HDR-04). Requests of 2-23
// octets (VER-04) keep their length padded to 4; fields that do not fit
// are omitted. A request shorter than 2 octets gets no reply: dst is
// returned unchanged.
func AppendErrorResponse(dst, request []byte, result ResultCode, lifetime time.Duration, epoch Epoch) []byte {
	return dst
}

// ParseResponse decodes a PCP response (client side).
func ParseResponse(b []byte, r *Response) error {
	return ErrMalformedResponse
}
