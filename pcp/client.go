package pcp

import (
	"context"
	"errors"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"time"

	crand "crypto/rand"
)

// ErrNoResponse: the retransmissions ran out without a matching response.
var ErrNoResponse = errors.New("pcp: no matching response")

// NewNonce returns a random mapping nonce (§11.1).
func NewNonce() Nonce {
	var n Nonce
	crand.Read(n[:]) // never fails (Go 1.24+)
	return n
}

// unspecifiedLike returns the all-zeros address of a's family (§11.1:
// "no preference" for the suggested external address).
func unspecifiedLike(a netip.Addr) netip.Addr {
	if a.Is4() {
		return netip.IPv4Unspecified()
	}
	return netip.IPv6Unspecified()
}

// NewMap returns a MAP request from client for proto/internalPort with a
// fresh nonce, no suggested external port and the all-zeros suggested
// address of the client's family. Lifetime 0 asks for deletion.
func NewMap(client netip.Addr, proto Protocol, internalPort uint16, lifetime time.Duration) *Request {
	client = client.Unmap()
	return &Request{
		Opcode:     OpMap,
		Lifetime:   lifetime,
		ClientAddr: client,
		Map: MapData{
			Nonce:        NewNonce(),
			Protocol:     proto,
			InternalPort: internalPort,
			ExternalAddr: unspecifiedLike(client),
		},
	}
}

// NewPeer returns a PEER request from client for proto/internalPort
// towards remote, with a fresh nonce.
func NewPeer(client netip.Addr, proto Protocol, internalPort uint16, remote netip.AddrPort, lifetime time.Duration) *Request {
	r := NewMap(client, proto, internalPort, lifetime)
	r.Opcode = OpPeer
	r.Peer = PeerData{RemotePort: remote.Port(), RemoteAddr: remote.Addr().Unmap()}
	return r
}

// NewAnnounce returns an ANNOUNCE request from client (§14.1.1).
func NewAnnounce(client netip.Addr) *Request {
	return &Request{Opcode: OpAnnounce, ClientAddr: client.Unmap()}
}

// Client sends PCP and NAT-PMP requests to one server and matches the
// responses. It is for the CLI, the conformance suite and tests; it is
// not safe for concurrent use on one Conn.
type Client struct {
	// Conn is the socket requests go out on and responses come in on.
	Conn net.PacketConn
	// Server is the server's address and port (normally Port).
	Server netip.AddrPort
	// InitialTimeout is the first retransmission timeout: RFC 6887
	// §8.1.1 IRT, default 3 s; for NAT-PMP 250 ms (RFC 6886 §3.1).
	InitialTimeout time.Duration
	// MaxTimeout caps one retransmission interval (§8.1.1 MRT, default
	// 1024 s).
	MaxTimeout time.Duration
	// MaxAttempts bounds the transmissions: default 4 for PCP, 9 for
	// NAT-PMP (RFC 6886 §3.1). The context bounds the total time.
	MaxAttempts int
}

// Do sends req and waits for the matching response (§8.1.1 retransmission
// with ±10 % jitter and doubling, bounded by MaxAttempts and ctx): same
// opcode, and for MAP and PEER the same nonce, protocol and internal port
// (PEER: and remote peer). Datagrams from other addresses and ones that do
// not decode are ignored (§8.3). A zero req.ClientAddr is filled from the
// socket's local address. An error result is not an error of Do: look at
// resp.Result.
func (c *Client) Do(ctx context.Context, req *Request, resp *Response) error {
	if !req.ClientAddr.IsValid() {
		la, ok := c.Conn.LocalAddr().(*net.UDPAddr)
		if !ok {
			return errors.New("pcp: client address unknown: set Request.ClientAddr")
		}
		a, _ := netip.AddrFromSlice(la.IP)
		if a = a.Unmap(); !a.IsValid() || a.IsUnspecified() {
			return errors.New("pcp: socket bound to a wildcard address: set Request.ClientAddr")
		}
		req.ClientAddr = a
	}
	msg := AppendRequest(make([]byte, 0, MaxMessageSize), req)
	var got Response
	match := func(b []byte) bool {
		if ParseResponse(b, &got) != nil || got.Opcode != req.Opcode {
			return false
		}
		switch req.Opcode {
		case OpPeer:
			if got.Peer != req.Peer {
				return false
			}
			fallthrough
		case OpMap:
			return got.Map.Nonce == req.Map.Nonce &&
				got.Map.Protocol == req.Map.Protocol &&
				got.Map.InternalPort == req.Map.InternalPort
		}
		return true
	}
	if err := c.exchange(ctx, msg, 3*time.Second, 4, match); err != nil {
		return err
	}
	resp.Opcode, resp.Result, resp.Lifetime, resp.Epoch = got.Opcode, got.Result, got.Lifetime, got.Epoch
	resp.Map, resp.Peer = got.Map, got.Peer
	// Copy the options so resp does not point into got's filter array.
	resp.Options = got.Options
	resp.Options.Filters = append(resp.Options.filterBuf[:0], got.Options.Filters...)
	resp.Options.Description = append([]byte(nil), got.Options.Description...)
	return nil
}

// DoPMP sends a NAT-PMP request and waits for the response with the
// matching opcode (RFC 6886 §3.1 retransmission: 250 ms doubling, 9
// attempts by default) and, for mappings, internal port.
func (c *Client) DoPMP(ctx context.Context, req *PMPRequest, resp *PMPResponse) error {
	msg := AppendPMPRequest(nil, req)
	var got PMPResponse
	match := func(b []byte) bool {
		if ParsePMPResponse(b, &got) != nil || got.Opcode != req.Opcode {
			return false
		}
		return req.Opcode == PMPOpAddress || got.InternalPort == req.InternalPort || got.Result != PMPSuccess
	}
	if err := c.exchange(ctx, msg, 250*time.Millisecond, 9, match); err != nil {
		return err
	}
	*resp = got
	return nil
}

// exchange sends msg and retransmits until match accepts a datagram from
// the server.
func (c *Client) exchange(ctx context.Context, msg []byte, irt time.Duration, attempts int, match func([]byte) bool) error {
	if c.InitialTimeout > 0 {
		irt = c.InitialTimeout
	}
	if c.MaxAttempts > 0 {
		attempts = c.MaxAttempts
	}
	mrt := c.MaxTimeout
	if mrt <= 0 {
		mrt = 1024 * time.Second
	}
	// Wake a blocked read when ctx ends.
	stop := context.AfterFunc(ctx, func() { c.Conn.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	defer c.Conn.SetReadDeadline(time.Time{})

	dst := net.UDPAddrFromAddrPort(c.Server)
	server := netip.AddrPortFrom(c.Server.Addr().Unmap(), c.Server.Port())
	buf := make([]byte, 2048)
	rt := jitter(irt)
	for i := 0; i < attempts; i++ {
		if err := ctxErr(ctx); err != nil {
			return err
		}
		if _, err := c.Conn.WriteTo(msg, dst); err != nil {
			return err
		}
		deadline := time.Now().Add(rt)
		if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
			deadline = d
		}
		c.Conn.SetReadDeadline(deadline)
		for {
			n, from, err := c.Conn.ReadFrom(buf)
			if err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) {
					break
				}
				return err
			}
			ua, ok := from.(*net.UDPAddr)
			if !ok {
				continue
			}
			ap := ua.AddrPort()
			if netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()) != server {
				continue // §8.3: only the server's address and port
			}
			if match(buf[:n]) {
				return nil
			}
		}
		rt = min(jitter(2*rt), mrt)
	}
	if err := ctxErr(ctx); err != nil {
		return err
	}
	return ErrNoResponse
}

// ctxErr is ctx.Err, also when the deadline has passed but the context's
// timer has not fired yet (a read deadline can expire first).
func ctxErr(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if d, ok := ctx.Deadline(); ok && !time.Now().Before(d) {
		return context.DeadlineExceeded
	}
	return nil
}

// jitter applies §8.1.1's RAND in [-0.1, +0.1].
func jitter(d time.Duration) time.Duration {
	return time.Duration(float64(d) * (0.9 + 0.2*rand.Float64()))
}
