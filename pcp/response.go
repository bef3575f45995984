package pcp

import "time"

// AppendResponse appends the wire form of r (RFC 6887 §7.2, HDR-01,
// HDR-05): version 2, R set, the opcode, octet 2 zero, result, lifetime,
// epoch, reserved octets zero, opcode data for MAP and PEER, then
// r.Options in request order. A response that would exceed
// MaxMessageSize is replaced by a MALFORMED_REQUEST response without
// options (HDR-08 encoder guard); Len tells the size beforehand.
func AppendResponse(dst []byte, r *Response) []byte {
	guard := r.Len() > MaxMessageSize
	dst, b := grow(dst, r.baseLen())
	b[0] = Version
	b[1] = 0x80 | byte(r.Opcode)
	b[3] = byte(r.Result)
	be.PutUint32(b[4:8], seconds(r.Lifetime))
	be.PutUint32(b[8:12], uint32(r.Epoch))
	putOpcodeData(b, r.Opcode, &r.Map, &r.Peer)
	if guard {
		b[3] = byte(MalformedRequest)
		be.PutUint32(b[4:8], seconds(MalformedRequest.ErrorLifetime()))
		return dst
	}
	return appendOptions(dst, &r.Options)
}

// Len returns the encoded size of r before the HDR-08 guard.
func (r *Response) Len() int { return r.baseLen() + r.Options.Len() }

func (r *Response) baseLen() int {
	switch r.Opcode & 0x7f {
	case OpMap:
		return MapSize
	case OpPeer:
		return PeerSize
	}
	return HeaderSize
}

// unparsed reports whether an error reply with this code keeps the
// request's octets 12-23 (HDR-04: the request was not parsed).
func unparsed(r ResultCode) bool {
	switch r {
	case UnsuppVersion, MalformedRequest, UnsuppOpcode, MalformedOption:
		return true
	}
	return false
}

// AppendErrorResponse appends the error reply to request (HDR-03
// copy-error): the request's first MaxMessageSize octets (PKT-04),
// zero-padded to a multiple of 4 (PKT-05), with version 2 (VER-03), the
// R bit, octet 2 zero, result, lifetime and epoch set, and octets 12-23
// zeroed unless the result is one of the "unparsed" codes 1, 3, 4, 6
// (HDR-04). Opcode data and options come back as sent. A request of 2-23
// octets (VER-04) is answered at its length padded to 4; fields that do
// not fit are omitted. A request shorter than 2 octets gets no reply
// (PKT-01): dst is returned unchanged.
//
// The reply exceeds the request only by that padding (PROTOCOL.md (f)).
func AppendErrorResponse(dst, request []byte, result ResultCode, lifetime time.Duration, epoch Epoch) []byte {
	n := len(request)
	if n < 2 {
		return dst
	}
	n = min(n, MaxMessageSize)
	dst, b := grow(dst, pad4(n))
	copy(b, request[:n])
	b[0] = Version
	b[1] |= 0x80
	b[2] = 0
	b[3] = byte(result)
	if len(b) >= 8 {
		be.PutUint32(b[4:8], seconds(lifetime))
	}
	if len(b) >= 12 {
		be.PutUint32(b[8:12], uint32(epoch))
	}
	if len(b) > 12 && !unparsed(result) {
		clear(b[12:min(len(b), HeaderSize)])
	}
	return dst
}

// Errors ParseResponse returns; all wrap ErrMalformedResponse.
var (
	errRespSize      = wrapResp("response size not 24-1100 octets in multiples of 4")
	errRespHeader    = wrapResp("not a version 2 response (R bit, version)")
	errRespShortData = wrapResp("response too short for its opcode")
	errRespOption    = wrapResp("malformed option in response")
)

type respError struct{ reason string }

func (e *respError) Error() string { return "pcp: " + e.reason }
func (e *respError) Unwrap() error { return ErrMalformedResponse }

func wrapResp(reason string) error { return &respError{reason} }

// ParseResponse decodes a PCP response (client side). It requires version
// 2, the R bit, 24-1100 octets in multiples of 4 and the opcode data of
// MAP and PEER. Responses to unknown opcodes decode with their header
// only. Known options must be well formed (length, FILTER prefix,
// once-only); unknown ones are skipped. Octets 12-23 and other reserved
// octets are ignored. On error r is untouched.
func ParseResponse(b []byte, r *Response) error {
	n := len(b)
	if n < HeaderSize || n > MaxMessageSize || n%4 != 0 {
		return errRespSize
	}
	if b[0] != Version || b[1]&0x80 == 0 {
		return errRespHeader
	}
	op := Opcode(b[1] & 0x7f)
	end := HeaderSize
	switch op {
	case OpMap:
		end = MapSize
	case OpPeer:
		end = PeerSize
	}
	if n < end {
		return errRespShortData
	}
	var opts []byte
	if op <= OpPeer {
		opts = b[end:]
	}
	if err := walkResponseOptions(opts, nil); err != nil {
		return err
	}
	r.Opcode = op
	r.Result = ResultCode(b[3])
	r.Lifetime = duration(be.Uint32(b[4:8]))
	r.Epoch = Epoch(be.Uint32(b[8:12]))
	r.Map = MapData{}
	r.Peer = PeerData{}
	if op == OpMap || op == OpPeer {
		r.Map = MapData{
			Nonce:        Nonce(b[24:36]),
			Protocol:     Protocol(b[36]),
			InternalPort: be.Uint16(b[40:42]),
			ExternalPort: be.Uint16(b[42:44]),
			ExternalAddr: addrFrom16(b[44:60]),
		}
	}
	if op == OpPeer {
		r.Peer = PeerData{RemotePort: be.Uint16(b[60:62]), RemoteAddr: addrFrom16(b[64:80])}
	}
	walkResponseOptions(opts, &r.Options)
	return nil
}

// walkResponseOptions validates (out == nil) or decodes the options of a
// response. Unlike requests, no opcode rules apply: a client takes what
// the server echoed.
func walkResponseOptions(b []byte, out *Options) error {
	var seen uint8
	nfilter := 0
	if out != nil {
		out.reset()
	}
	for off := 0; off < len(b); {
		code, data, next, ok := nextOption(b, off)
		if !ok {
			return errRespOption
		}
		off = next
		l := len(data)
		var bit uint8
		switch code {
		case OptThirdParty:
			if l != 16 {
				return errRespOption
			}
			bit = seenTP
		case OptPreferFailure:
			if l != 0 {
				return errRespOption
			}
			bit = seenPF
		case OptFilter:
			if l != 20 || nfilter == MaxFilters {
				return errRespOption
			}
			if _, ok := decodeFilter(data); !ok {
				return errRespOption
			}
			nfilter++
		case OptDescription:
			bit = seenDesc
		case OptPortSet:
			if l != 5 {
				return errRespOption
			}
			bit = seenPortSet
		default:
			continue
		}
		if seen&bit != 0 {
			return errRespOption
		}
		seen |= bit
		if out != nil {
			out.add(code, data)
		}
	}
	return nil
}
