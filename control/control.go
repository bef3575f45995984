// Package control is pcpd's local administration protocol: the unix stream
// socket that `pcpd leases`, `pcpd revoke` and `pcpd status` talk to, as
// `wg` talks to wireguard-go.
//
// The protocol is line-delimited JSON. A client writes one Request per line
// and reads one Reply per line; a successful "leases" reply is followed by
// exactly Reply.Count lines, each one Lease object. Every failed reply
// carries an error Code a script can branch on. A connection may carry
// several requests in turn.
//
// The socket is created mode 0600 in a directory created mode 0700, and a
// stale socket left by a killed daemon is replaced, while a live one is
// never stolen (Listen). Only root and pcpd's own user are served
// (SO_PEERCRED; Serve closes other connections unanswered).
package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/pcpd/pcpd/store"
)

// Operations a Request may name.
const (
	OpLeases = "leases"
	OpStatus = "status"
	OpRevoke = "revoke"
)

// Error codes carried by failed replies.
const (
	CodeBadRequest = "bad_request" // not JSON, unknown field, or contradictory fields
	CodeUnknownOp  = "unknown_op"  // Op is none of the above
	CodeFailed     = "failed"      // the daemon could not carry it out (the message says why)
)

// Sentinel errors; errors from this package wrap one of them.
var (
	// ErrInUse: Listen found a daemon answering on the socket path.
	ErrInUse = errors.New("control socket in use by a running daemon")
	// ErrNotSocket: Listen found something other than a socket at the path.
	ErrNotSocket = errors.New("path exists and is not a socket")
	// ErrUnsafeDir: the socket's directory, or one above it, can be
	// changed by another user (see Listen).
	ErrUnsafeDir = errors.New("control socket directory is writable by other users")
	// ErrPeer: a connection from a user other than root and pcpd's own
	// (SO_PEERCRED), closed unanswered.
	ErrPeer = errors.New("control client not allowed")
	// ErrUntrustedServer: the client's side of ErrUnsafeDir and ErrPeer:
	// the socket's directory can be changed by another user, or the
	// process serving it runs as neither root nor pcpd's user (Client).
	ErrUntrustedServer = errors.New("control socket not served by pcpd's user")
	// ErrProtocol: the peer broke the protocol (bad JSON, truncated stream).
	ErrProtocol = errors.New("control protocol error")
	// ErrRemote: the daemon answered with an error; see *RemoteError.
	ErrRemote = errors.New("daemon refused the request")
)

// Request is one line a client sends.
type Request struct {
	Op string `json:"op"`
	// Revoke selectors (OpRevoke): exactly one of All, Client, Leases.
	All    bool       `json:"all,omitempty"`
	Client string     `json:"client,omitempty"`
	Leases []LeaseRef `json:"leases,omitempty"`
}

// LeaseRef names leases by what they open, whoever holds them: every lease
// on Protocol/InternalAddress/InternalPort (MAP, NAT-PMP and PEER alike).
type LeaseRef struct {
	Protocol        string     `json:"protocol"`
	InternalAddress netip.Addr `json:"internal_address"`
	InternalPort    uint16     `json:"internal_port"`
}

// String is the PROTO/ADDR/PORT form the CLI accepts.
func (r LeaseRef) String() string {
	return r.Protocol + "/" + r.InternalAddress.String() + "/" + strconv.Itoa(int(r.InternalPort))
}

// ParseLeaseRef parses PROTO/ADDR/PORT, e.g. "tcp/2001:db8:1:2::10/443".
func ParseLeaseRef(s string) (LeaseRef, error) {
	parts := strings.Split(s, "/")
	if len(parts) != 3 {
		return LeaseRef{}, fmt.Errorf("control: lease %q: want PROTO/ADDRESS/PORT, e.g. tcp/2001:db8:1:2::10/443", s)
	}
	proto, err := ParseProtocol(parts[0])
	if err != nil {
		return LeaseRef{}, fmt.Errorf("control: lease %q: %w", s, err)
	}
	a, err := netip.ParseAddr(parts[1])
	if err != nil {
		return LeaseRef{}, fmt.Errorf("control: lease %q: %q is not an IP address", s, parts[1])
	}
	port, err := strconv.ParseUint(parts[2], 10, 16)
	if err != nil {
		return LeaseRef{}, fmt.Errorf("control: lease %q: %q is not a port number", s, parts[2])
	}
	return LeaseRef{Protocol: ProtocolName(proto), InternalAddress: a.Unmap(), InternalPort: uint16(port)}, nil
}

// Reply is the line that answers a Request.
type Reply struct {
	OK    bool        `json:"ok"`
	Error *ReplyError `json:"error,omitempty"`
	// Count is the number of Lease lines that follow (OpLeases).
	Count   int     `json:"count,omitempty"`
	Status  *Status `json:"status,omitempty"`
	Revoked int     `json:"revoked,omitempty"`
}

// ReplyError is a failed reply's reason.
type ReplyError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// RemoteError is a ReplyError received by a Client.
type RemoteError struct{ ReplyError }

func (e *RemoteError) Error() string {
	return fmt.Sprintf("control: daemon: %s (%s)", e.Message, e.Code)
}

// Unwrap makes errors.Is(err, ErrRemote) true.
func (e *RemoteError) Unwrap() error { return ErrRemote }

// Lease is one live lease as the control socket and `pcpd leases --json`
// show it. Times are RFC 3339 in UTC, to the second.
type Lease struct {
	Client          string     `json:"client"`
	Kind            string     `json:"kind"` // map, peer, natpmp
	Protocol        string     `json:"protocol"`
	InternalAddress netip.Addr `json:"internal_address"`
	InternalPort    uint16     `json:"internal_port"`
	ExternalAddress netip.Addr `json:"external_address"`
	ExternalPort    uint16     `json:"external_port"`
	Remote          string     `json:"remote,omitempty"`  // PEER: the remote peer address:port
	Filters         []string   `json:"filters,omitempty"` // FILTER: prefix, or [prefix]:port
	Description     string     `json:"description,omitempty"`
	ThirdParty      bool       `json:"third_party,omitempty"`
	CreatedAt       time.Time  `json:"created_at"`
	ExpiresAt       time.Time  `json:"expires_at"`
}

// LeaseFrom converts a stored lease for display.
func LeaseFrom(l store.Lease) Lease {
	out := Lease{
		Client:          l.Owner,
		Kind:            l.Kind.String(),
		Protocol:        ProtocolName(l.Protocol),
		InternalAddress: l.InternalAddr,
		InternalPort:    l.InternalPort,
		ExternalAddress: l.ExternalAddr,
		ExternalPort:    l.ExternalPort,
		Description:     l.Description,
		ThirdParty:      l.ThirdParty,
		CreatedAt:       l.Created.UTC().Truncate(time.Second),
		ExpiresAt:       l.Expires.UTC().Truncate(time.Second),
	}
	if l.Remote.IsValid() {
		out.Remote = l.Remote.String()
	}
	for _, f := range l.Filters {
		s := f.Prefix.String()
		if f.Port != 0 {
			s = "[" + s + "]:" + strconv.Itoa(int(f.Port))
		}
		out.Filters = append(out.Filters, s)
	}
	return out
}

// Status is the daemon's state at a glance (`pcpd status`).
type Status struct {
	Version string    `json:"version,omitempty"`
	PID     int       `json:"pid"`
	Started time.Time `json:"started"`
	Epoch   uint32    `json:"epoch"`
	Leases  int       `json:"leases"`
	Owners  int       `json:"owners"` // clients holding leases
	// Restarted: the epoch continued from stored state (no client needs
	// to re-map after this restart).
	Restarted       bool     `json:"restarted"`
	OwnershipSource string   `json:"ownership_source"`
	Listen          []string `json:"listen"`
	NftTable        string   `json:"nft_table,omitempty"`
	StateDir        string   `json:"state_dir,omitempty"`
}

// Revoke selects leases to end; exactly one field is set.
type Revoke struct {
	All   bool
	Owner string     // every lease of this client (store.Key.Owner)
	Key   *store.Key // this one lease
	// Opens: every lease, whoever holds it, on one of these (pcpd revoke
	// PROTO/ADDR/PORT...).
	Opens []Opening
}

// Opening is what a lease opens, as a LeaseRef names it: protocol
// number, internal address (unmapped) and port.
type Opening struct {
	Protocol     uint8
	InternalAddr netip.Addr
	InternalPort uint16
}

// Backend is what the socket exposes: the engine (*server.Server behind a
// thin adapter in cmd/pcpd). No operation takes a copy of every lease at
// once: the engine copies them under its lock, and at 100 000 leases
// that held it 132 ms (before h/opsleft the leases op fell back to such
// a copy for a backend that did not stream, and revoke PROTO/ADDR/PORT
// made one in pcpd to find the leases named).
type Backend interface {
	// StreamLeases serves the leases op: count gets the number of
	// leases, then each every lease, sorted by owner, internal address,
	// protocol, port and remote (the lease is reused after each
	// returns). A million leases need not be copied whole for one
	// listing (server.ListLeases).
	StreamLeases(count func(n int) error, each func(*store.Lease) error) error
	// HasOwner tells revoke --client whether a lease owner exists.
	HasOwner(id string) bool
	// Revoke ends the leases selected. ctx is Serve's: when it ends
	// (pcpd stopping) a revoke in progress is to stop, with an error
	// saying it was cut short (server.ErrRevokeStopped), which the
	// client is sent.
	Revoke(ctx context.Context, r Revoke) (int, error)
	Status() Status
}

// ProtocolName spells an IANA protocol number as operators write it.
func ProtocolName(p uint8) string {
	switch p {
	case 0:
		return "all"
	case 6:
		return "tcp"
	case 17:
		return "udp"
	}
	return strconv.Itoa(int(p))
}

// ParseProtocol is ProtocolName's inverse; it also accepts numbers.
func ParseProtocol(s string) (uint8, error) {
	switch strings.ToLower(s) {
	case "all":
		return 0, nil
	case "tcp":
		return 6, nil
	case "udp":
		return 17, nil
	}
	n, err := strconv.ParseUint(s, 10, 8)
	if err != nil {
		return 0, fmt.Errorf("protocol %q: want tcp, udp, all or a number 0-255", s)
	}
	return uint8(n), nil
}

// appendLeaseJSON appends l as a JSON object, exactly as json.Marshal of
// LeaseFrom(l) would (TestAppendLeaseJSON checks), without reflection: the
// daemon streams 100 000 of these for one `pcpd leases --json`.
func appendLeaseJSON(b []byte, l *store.Lease) []byte {
	b = append(b, `{"client":`...)
	b = appendJSONString(b, l.Owner)
	b = append(b, `,"kind":`...)
	b = appendJSONString(b, l.Kind.String())
	b = append(b, `,"protocol":"`...)
	b = append(b, ProtocolName(l.Protocol)...)
	b = append(b, `","internal_address":`...)
	b = appendJSONAddr(b, l.InternalAddr)
	b = append(b, `,"internal_port":`...)
	b = strconv.AppendUint(b, uint64(l.InternalPort), 10)
	b = append(b, `,"external_address":`...)
	b = appendJSONAddr(b, l.ExternalAddr)
	b = append(b, `,"external_port":`...)
	b = strconv.AppendUint(b, uint64(l.ExternalPort), 10)
	if l.Remote.IsValid() {
		b = append(b, `,"remote":`...)
		b = appendJSONString(b, l.Remote.String())
	}
	if len(l.Filters) > 0 {
		b = append(b, `,"filters":[`...)
		for i, f := range l.Filters {
			if i > 0 {
				b = append(b, ',')
			}
			s := f.Prefix.String()
			if f.Port != 0 {
				s = "[" + s + "]:" + strconv.Itoa(int(f.Port))
			}
			b = appendJSONString(b, s)
		}
		b = append(b, ']')
	}
	if l.Description != "" {
		b = append(b, `,"description":`...)
		b = appendJSONString(b, l.Description)
	}
	if l.ThirdParty {
		b = append(b, `,"third_party":true`...)
	}
	b = append(b, `,"created_at":"`...)
	b = l.Created.UTC().Truncate(time.Second).AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","expires_at":"`...)
	b = l.Expires.UTC().Truncate(time.Second).AppendFormat(b, time.RFC3339Nano)
	return append(b, `"}`...)
}

func appendJSONAddr(b []byte, a netip.Addr) []byte {
	if !a.IsValid() {
		return append(b, `""`...)
	}
	b = append(b, '"')
	b = a.AppendTo(b)
	return append(b, '"')
}

// appendJSONString quotes s as encoding/json does; plain ASCII (all that
// owner names, addresses and most descriptions hold) takes the fast path.
func appendJSONString(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x20 || c >= 0x7f || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			q, _ := json.Marshal(s)
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}
