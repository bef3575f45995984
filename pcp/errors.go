package pcp

import "errors"

// Sentinel errors; every *ParseError wraps exactly one of them, so callers
// can use errors.Is.
var (
	// ErrDrop: the packet must be dropped without a reply (PKT-01..03).
	ErrDrop = errors.New("pcp: drop silently")
	// ErrUnsupportedVersion: answer UNSUPP_VERSION (VER-02..05).
	ErrUnsupportedVersion = errors.New("pcp: unsupported version")
	// ErrMalformedRequest: answer MALFORMED_REQUEST.
	ErrMalformedRequest = errors.New("pcp: malformed request")
	// ErrUnsupportedOpcode: answer UNSUPP_OPCODE (PKT-07, PMP-02).
	ErrUnsupportedOpcode = errors.New("pcp: unsupported opcode")
	// ErrUnsupportedOption: answer UNSUPP_OPTION (OPT-03, OPT-08).
	ErrUnsupportedOption = errors.New("pcp: unsupported option")
	// ErrMalformedOption: answer MALFORMED_OPTION.
	ErrMalformedOption = errors.New("pcp: malformed option")
	// ErrAddressMismatch: answer ADDRESS_MISMATCH (ADDR-01).
	ErrAddressMismatch = errors.New("pcp: address mismatch")
	// ErrMalformedResponse: a response (client side) could not be decoded.
	ErrMalformedResponse = errors.New("pcp: malformed response")
)

// ParseError says what to do with a request that failed to decode: drop
// it (Silent) or answer with Result using AppendErrorResponse (or, for
// NAT-PMP, the matching PMP reply). ParseErrors returned by this package
// are shared, read-only values, so a flood of bad packets allocates
// nothing.
type ParseError struct {
	Result ResultCode
	Silent bool
	Reason string
	err    error
}

func (e *ParseError) Error() string { return "pcp: " + e.Reason }

// Unwrap returns the sentinel the error belongs to.
func (e *ParseError) Unwrap() error { return e.err }

func newParseError(result ResultCode, reason string) *ParseError {
	var err error
	switch result {
	case UnsuppVersion:
		err = ErrUnsupportedVersion
	case MalformedRequest:
		err = ErrMalformedRequest
	case UnsuppOpcode:
		err = ErrUnsupportedOpcode
	case UnsuppOption:
		err = ErrUnsupportedOption
	case MalformedOption:
		err = ErrMalformedOption
	case AddressMismatch:
		err = ErrAddressMismatch
	default:
		panic("pcp: no sentinel for " + result.String())
	}
	return &ParseError{Result: result, Reason: reason, err: err}
}

func newDrop(reason string) *ParseError {
	return &ParseError{Silent: true, Reason: reason, err: ErrDrop}
}
