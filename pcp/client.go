package pcp

import (
	"context"
	"crypto/rand"
	"net"
	"net/netip"
	"time"
)

// NewNonce returns a random mapping nonce (§11.1).
func NewNonce() Nonce {
	var n Nonce
	rand.Read(n[:]) // crypto/rand.Read never fails (Go 1.24+)
	return n
}

// Client sends PCP and NAT-PMP requests to one server and matches the
// responses. It is for the CLI, the conformance suite and tests.
type Client struct {
	// Conn is the socket requests go out on and responses come in on.
	Conn net.PacketConn
	// Server is the server's address and port (normally Port).
	Server netip.AddrPort
	// InitialTimeout is the first retransmission timeout (RFC 6887
	// §8.1.1 IRT, default 3 s; NAT-PMP default 250 ms, RFC 6886 §3.1).
	InitialTimeout time.Duration
	// MaxTimeout caps one retransmission interval (MRT, default 1024 s).
	MaxTimeout time.Duration
	// MaxAttempts bounds the transmissions (default 4 for PCP, 9 for
	// NAT-PMP); the context bounds the total time.
	MaxAttempts int
}

// Do sends req and waits for the matching response: same opcode, and for
// MAP and PEER the same nonce, protocol and internal port (PEER: and
// remote peer). Responses from other addresses are ignored (§8.3).
// A zero req.ClientAddr is filled from the socket's local address.
func (c *Client) Do(ctx context.Context, req *Request, resp *Response) error {
	return ErrMalformedResponse
}

// DoPMP sends a NAT-PMP request and waits for the response with the
// matching opcode.
func (c *Client) DoPMP(ctx context.Context, req *PMPRequest, resp *PMPResponse) error {
	return ErrMalformedResponse
}
