// Package conformance is a black-box RFC 6887 (PCP) and RFC 6886
// (NAT-PMP) conformance suite. It talks to a server only over UDP (and,
// when the target offers data-plane hooks, over real TCP/UDP traffic from
// "the internet"), so it runs against any PCP server: pcpd, miniupnpd,
// or whatever else answers on port 5351.
//
// The suite is one table of checks (Checks), each named by its
// PROTOCOL.md ID and RFC section. `go test` runs them as subtests and the
// pcp-conformance command prints them as a markdown report; both call
// Run. Every check uses fresh nonces and its own ports, and deletes what
// it created, so checks are independent and may be run alone.
package conformance

import (
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"runtime/debug"
	"sync/atomic"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// Env describes the target server and what the suite may do to it. Only
// Server and Client are required; every other capability is optional and
// the checks that need a missing one report NA.
type Env struct {
	// Name labels the target in reports ("pcpd", "miniupnpd 2.3.1").
	Name string

	// Server is the PCP server's address and port (normally 5351) the
	// suite talks to from Client. Its family is the family of the main
	// run (IPv6 for pcpd's deployment).
	Server netip.AddrPort
	// Client is the local address requests are sent from; the target must
	// let it map itself.
	Client netip.Addr
	// ServerAlt is a second address of the same server, same family as
	// Server (HDR-02: one mapping table across serving addresses).
	ServerAlt netip.AddrPort

	// Server4 and Client4 are an IPv4 server address and an owned local
	// IPv4 address, for IPv4 PCP mappings and NAT-PMP.
	Server4 netip.AddrPort
	Client4 netip.Addr
	// ExternalV4 is the external IPv4 address the target maps IPv4
	// clients to. Invalid: the target has none, and IPv4 mappings and
	// NAT-PMP must be refused (MAP-12, VER-02, PMP-01).
	ExternalV4 netip.Addr
	// NATPMP says the target serves NAT-PMP on Server4 (RFC 6887 App. A).
	NATPMP bool

	// ThirdParty is a second address the client owns, same family as
	// Client, that it may name in THIRD_PARTY. Invalid: the target does
	// not offer THIRD_PARTY to this client, so it must answer
	// UNSUPP_OPTION (TP-02).
	ThirdParty netip.Addr
	// OtherClient (and OtherClient4) is an address of another client of
	// the target that the suite can also send from: a different
	// administrative domain (SEC-02, TP-03, MAP-22, PMP-06, MAP-15).
	OtherClient  netip.Addr
	OtherClient4 netip.Addr
	// NotOwned is an address the suite can send from that no client of
	// the target owns (SEC-02).
	NotOwned netip.Addr

	// NonceReplaces declares the target's nonce policy: true means a new
	// nonce from the mapping's owner replaces the mapping (pcpd's default,
	// PROTOCOL.md (c)); false means RFC 6887's strict checks (§11.3, §12.3:
	// NOT_AUTHORIZED with the remaining lifetime). MAP-14, MAP-19 and
	// PEER-06 check the declared policy.
	NonceReplaces bool
	// FilterLimit is the target's per-mapping FILTER limit, 0 if unknown
	// (then FLT-06 sends as many FILTERs as fit in 1100 octets).
	FilterLimit int
	// Quota is the per-client mapping limit, 0 if none is configured; the
	// quota check (MAP-15) runs from OtherClient so it does not starve the
	// other checks.
	Quota int
	// MinLifetime is the target's lifetime floor (default 120 s, the
	// RFC's SHOULD). Expiry checks (LIFE-04) run only when it is at most
	// 10 s, so the suite stays fast.
	MinLifetime time.Duration

	// Timeout is how long to wait for a reply before retransmitting
	// (default 1 s; three transmissions in all).
	Timeout time.Duration
	// Silence is how long a check waits to conclude that a request was
	// dropped (default 1 s).
	Silence time.Duration

	// ListenPacket opens a UDP socket bound to laddr (port 0: any). The
	// default is net.ListenUDP in the current network namespace; a
	// namespace harness opens it inside the client's namespace.
	ListenPacket func(laddr netip.AddrPort) (net.PacketConn, error)

	// Outside, if set, sends from beyond the target's serving interfaces
	// (SEC-01: requests there must be ignored).
	Outside *Outside
	// Data, if set, lets checks test real traffic through mappings.
	Data *DataPlane
	// Restart, if set, restarts the target keeping its durable state
	// (kill -9, then start; it returns once the server answers again).
	// Used by ANN-03..05, EPO-04 and PMP-13.
	Restart func() error
	// Wipe, if set, restarts the target with its mapping state destroyed
	// (EPO-03: the epoch must then reset).
	Wipe func() error
	// Stop and Start, if both set, let the expiry check kill the server
	// and prove the kernel expires pinholes on its own (LIFE-04).
	Stop, Start func() error

	// Logf, if set, receives a trace of every exchange.
	Logf func(format string, args ...any)

	// per-check state, and state shared by the checks of one Env
	cleanups []func()
	shared   *sharedState
}

// sharedState is what checks of one Env share: the one restart
// (checks_restart.go).
type sharedState struct {
	restart restartCapture
}

// Outside is a vantage point outside the served networks.
type Outside struct {
	// ListenPacket opens a UDP socket on the outside (port 0: any).
	ListenPacket func(laddr netip.AddrPort) (net.PacketConn, error)
	// Targets are the server's addresses as seen from outside (its
	// external addresses), port 5351.
	Targets []netip.AddrPort
	// Source4 and Source6 are the outside sources to bind to.
	Source4, Source6 netip.Addr
}

// DataPlane lets checks send real traffic.
type DataPlane struct {
	// Serve starts a server on the client, on every address, at port:
	// TCP answers each connection with a greeting, UDP echoes.
	Serve func(proto byte, port uint16) (io.Closer, error)
	// Probe connects from the internet (source from; an invalid address
	// or port 0 lets the system choose) to to, and returns nil only when
	// the greeting or echo came back from the client.
	Probe func(proto byte, from, to netip.AddrPort) error
	// Sources6 and Sources4 are internet source addresses Probe can use;
	// FILTER checks need at least two of the client's family.
	Sources6, Sources4 []netip.Addr
	// EchoTCP, if set, starts a TCP echo server on the client at port
	// (every address), and DialTCP connects to it from the internet and
	// keeps the connection open (PMP-12: a deleted mapping ends it).
	EchoTCP func(port uint16) (io.Closer, error)
	DialTCP func(to netip.AddrPort) (net.Conn, error)
	// Outbound, if set, sends a UDP datagram from the client's address
	// and port from to an internet reflector and returns the source
	// address and port the internet saw (PMP-11: two-way mappings).
	Outbound func(from netip.AddrPort) (netip.AddrPort, error)
}

// Status is a check's verdict.
type Status int

// Verdicts. NA means the target lacks what the check needs (it never
// stands for a pass).
const (
	Pass Status = iota
	Fail
	NA
)

func (s Status) String() string {
	switch s {
	case Pass:
		return "pass"
	case Fail:
		return "FAIL"
	}
	return "n.a."
}

// Result is a check's verdict and what it saw.
type Result struct {
	Status Status
	Detail string
}

// Level is the strength of the rule a check tests.
type Level string

// Levels: RFC keywords, or Impl for a choice the RFC leaves open where the
// check tests pcpd's documented behaviour (PROTOCOL.md "(impl)").
const (
	Must   Level = "MUST"
	Should Level = "SHOULD"
	May    Level = "MAY"
	Impl   Level = "impl"
)

// Need names a capability a check requires of the Env.
type Need string

// Capabilities.
const (
	NeedIPv4       Need = "IPv4 server"
	NeedExternalV4 Need = "IPv4 external"
	NeedNATPMP     Need = "NAT-PMP"
	NeedTP         Need = "THIRD_PARTY"
	NeedOther      Need = "other client"
	NeedOther4     Need = "other IPv4 client"
	NeedNotOwned   Need = "non-owned source"
	NeedData       Need = "data plane"
	NeedRestart    Need = "restart hook"
	NeedWipe       Need = "state-wipe hook"
	NeedOutbound   Need = "outbound reflector"
	NeedHold       Need = "long-lived TCP hooks"
	NeedStopStart  Need = "stop/start hooks"
	NeedOutside    Need = "outside vantage"
	NeedServerAlt  Need = "second server address"
)

// Check is one conformance check.
type Check struct {
	ID      string // PROTOCOL.md ID, e.g. "PKT-04"
	Section string // e.g. "RFC 6887 §8.2"
	Level   Level
	Name    string
	Needs   []Need
	Run     func(*Env) Result
}

// missing returns the first capability e lacks for c.
func (e *Env) missing(c *Check) (Need, bool) {
	for _, n := range c.Needs {
		ok := true
		switch n {
		case NeedIPv4:
			ok = e.Server4.IsValid() && e.Client4.IsValid()
		case NeedExternalV4:
			ok = e.Server4.IsValid() && e.Client4.IsValid() && e.ExternalV4.IsValid()
		case NeedNATPMP:
			ok = e.NATPMP && e.Server4.IsValid() && e.Client4.IsValid() && e.ExternalV4.IsValid()
		case NeedTP:
			ok = e.ThirdParty.IsValid()
		case NeedOther:
			ok = e.OtherClient.IsValid()
		case NeedOther4:
			ok = e.OtherClient4.IsValid() && e.Server4.IsValid()
		case NeedNotOwned:
			ok = e.NotOwned.IsValid()
		case NeedData:
			ok = e.Data != nil
		case NeedRestart:
			ok = e.Restart != nil
		case NeedWipe:
			ok = e.Wipe != nil
		case NeedHold:
			ok = e.Data != nil && e.Data.EchoTCP != nil && e.Data.DialTCP != nil
		case NeedOutbound:
			ok = e.Data != nil && e.Data.Outbound != nil
		case NeedStopStart:
			ok = e.Stop != nil && e.Start != nil
		case NeedOutside:
			ok = e.Outside != nil
		case NeedServerAlt:
			ok = e.ServerAlt.IsValid()
		}
		if !ok {
			return n, true
		}
	}
	return "", false
}

// abort carries a verdict out of a check by panic, the way t.Fatal ends a
// test: checks read straight down and helpers stop them on the first
// unexpected event.
type abort struct{ r Result }

func (e *Env) failf(format string, args ...any) {
	panic(abort{Result{Fail, fmt.Sprintf(format, args...)}})
}

func (e *Env) naf(format string, args ...any) {
	panic(abort{Result{NA, fmt.Sprintf(format, args...)}})
}

func pass(format string, args ...any) Result {
	return Result{Pass, fmt.Sprintf(format, args...)}
}

func failr(format string, args ...any) Result {
	return Result{Fail, fmt.Sprintf(format, args...)}
}

// Run runs one check against the target: NA if a capability is missing,
// otherwise the check's verdict. Whatever the check created is deleted
// and its sockets closed before Run returns.
func (e *Env) Run(c *Check) (res Result) {
	if n, missing := e.missing(c); missing {
		return Result{NA, "target has no " + string(n)}
	}
	e.defaults()
	run := *e
	run.cleanups = nil
	defer func() {
		for i := len(run.cleanups) - 1; i >= 0; i-- {
			run.cleanups[i]()
		}
		if p := recover(); p != nil {
			if a, ok := p.(abort); ok {
				res = a.r
				return
			}
			res = Result{Fail, fmt.Sprintf("check panicked: %v\n%s", p, debug.Stack())}
		}
	}()
	return c.Run(&run)
}

func (e *Env) defaults() {
	if e.shared == nil {
		e.shared = &sharedState{}
	}
	if e.Timeout == 0 {
		e.Timeout = time.Second
	}
	if e.Silence == 0 {
		e.Silence = time.Second
	}
	if e.MinLifetime == 0 {
		e.MinLifetime = 120 * time.Second
	}
	if e.ListenPacket == nil {
		e.ListenPacket = func(laddr netip.AddrPort) (net.PacketConn, error) {
			return net.ListenUDP("udp", net.UDPAddrFromAddrPort(laddr))
		}
	}
}

func (e *Env) cleanup(f func()) { e.cleanups = append(e.cleanups, f) }

func (e *Env) logf(format string, args ...any) {
	if e.Logf != nil {
		e.Logf(format, args...)
	}
}

// portBase spreads ports over runs so leftovers of an aborted run (which
// expire on their own) do not collide with the next one.
var portCounter atomic.Uint32

func init() { portCounter.Store(20000 + rand.Uint32N(20000)) }

// port returns a port no other check of this process uses.
func (e *Env) port() uint16 { return uint16(portCounter.Add(1)) }

// nonce returns a fresh random mapping nonce.
func nonce() [12]byte { return pcp.NewNonce() }

// sock is a UDP socket from one local address to one server address.
type sock struct {
	e      *Env
	c      net.PacketConn
	server netip.AddrPort
	local  netip.AddrPort
	// stamped: the kernel stamps arrivals (stampArrivals), and recv
	// reports those stamps instead of when the reader got to them.
	stamped bool
}

// sock opens a socket from the main client address to the main server.
func (e *Env) sock() *sock { return e.sockFrom(e.Client, e.Server) }

// sock4 opens a socket from Client4 to Server4.
func (e *Env) sock4() *sock { return e.sockFrom(e.Client4, e.Server4) }

// sockFrom opens a socket bound to src (any port) talking to server.
func (e *Env) sockFrom(src netip.Addr, server netip.AddrPort) *sock {
	return e.sockAt(netip.AddrPortFrom(src, 0), server)
}

func (e *Env) sockAt(local, server netip.AddrPort) *sock {
	c, err := e.ListenPacket(local)
	if err != nil {
		e.failf("open UDP socket on %s: %v", local, err)
	}
	e.cleanup(func() { c.Close() })
	l := c.LocalAddr().(*net.UDPAddr).AddrPort()
	l = netip.AddrPortFrom(l.Addr().Unmap(), l.Port())
	return &sock{e: e, c: c, server: server, local: l}
}

type datagram struct {
	b    []byte
	from netip.AddrPort
	at   time.Time // arrival: the kernel's stamp if stamped, else when read
	// stamped: at is the kernel's arrival stamp (sock.stamped).
	stamped bool
}

// recv waits until deadline for one datagram.
func (s *sock) recv(deadline time.Time) (datagram, error) {
	buf := make([]byte, 2048) // larger than 1100 so oversize replies show (PKT-04)
	s.c.SetReadDeadline(deadline)
	if u, ok := s.c.(*net.UDPConn); ok && s.stamped {
		oob := make([]byte, 128)
		n, oobn, _, ua, err := u.ReadMsgUDPAddrPort(buf, oob)
		if err != nil {
			return datagram{}, err
		}
		d := datagram{b: buf[:n], from: netip.AddrPortFrom(ua.Addr().Unmap(), ua.Port()), at: time.Now()}
		d.at, d.stamped = arrivalStamp(oob[:oobn])
		if !d.stamped {
			d.at = time.Now()
		}
		return d, nil
	}
	n, from, err := s.c.ReadFrom(buf)
	if err != nil {
		return datagram{}, err
	}
	ua := from.(*net.UDPAddr).AddrPort()
	return datagram{b: buf[:n], from: netip.AddrPortFrom(ua.Addr().Unmap(), ua.Port()), at: time.Now()}, nil
}

func (s *sock) send(b []byte) {
	s.e.logf("→ %s %s", s.server, hexdump(b))
	if _, err := s.c.WriteTo(b, net.UDPAddrFromAddrPort(s.server)); err != nil {
		s.e.failf("send to %s: %v", s.server, err)
	}
}

// matches reports whether reply could answer req: the opcode with R set,
// and for MAP/PEER of at least 60 octets the nonce. Unsolicited traffic
// (ANNOUNCE after a restart) and late answers to earlier retransmissions
// are skipped this way.
func matches(req, reply []byte) bool {
	if len(req) < 2 || len(reply) < 2 {
		return len(reply) >= 1
	}
	if reply[1]&0x7f != req[1]&0x7f {
		return false
	}
	if (req[1] == opMap || req[1] == opPeer) && req[0] == pcp.Version && len(req) >= 36 && len(reply) >= 36 {
		return [12]byte(req[24:36]) == [12]byte(reply[24:36])
	}
	return true
}

// drain discards datagrams already queued on the socket: late answers to
// an earlier request's retransmissions would otherwise match the next
// request with the same nonce (a create and its delete).
func (s *sock) drain() {
	for {
		d, err := s.recv(time.Now())
		if err != nil {
			return
		}
		s.e.logf("← drained stale %s from %s", hexdump(d.b), d.from)
	}
}

// try sends b and waits for a matching reply from the server, sending up
// to three times. It returns nil if none came.
func (s *sock) try(b []byte) []byte {
	s.drain()
	for attempt := 0; attempt < 3; attempt++ {
		s.send(b)
		deadline := time.Now().Add(s.e.Timeout)
		for {
			d, err := s.recv(deadline)
			if err != nil {
				break
			}
			if d.from != s.server {
				s.e.logf("← ignored datagram from %s (not the server)", d.from)
				continue
			}
			if !matches(b, d.b) {
				s.e.logf("← ignored unmatched %s", hexdump(d.b))
				continue
			}
			s.e.logf("← %s", hexdump(d.b))
			return d.b
		}
	}
	return nil
}

// raw sends b and returns the reply bytes, failing the check if none came.
func (s *sock) raw(b []byte) []byte {
	r := s.try(b)
	if r == nil {
		s.e.failf("no reply from %s to %s", s.server, hexdump(b))
	}
	return r
}

// ask sends a PCP request and returns the decoded reply.
func (s *sock) ask(b []byte) *response {
	r, err := parseResponse(s.raw(b))
	if err != nil {
		s.e.failf("reply to %s: %v", hexdump(b), err)
	}
	return r
}

// silent sends b once and reports what arrived within Silence (nil: the
// request was dropped, as wanted).
func (s *sock) silent(b []byte) []byte {
	s.drain()
	s.send(b)
	deadline := time.Now().Add(s.e.Silence)
	for {
		d, err := s.recv(deadline)
		if err != nil {
			return nil
		}
		if d.from == s.server && matches(b, d.b) {
			return d.b
		}
	}
}

// collect gathers every datagram that arrives within d.
func (s *sock) collect(d time.Duration) []datagram {
	var out []datagram
	deadline := time.Now().Add(d)
	for {
		g, err := s.recv(deadline)
		if err != nil {
			return out
		}
		out = append(out, g)
	}
}

// expectResult fails the check unless r has the wanted result code.
func (e *Env) expectResult(r *response, want pcp.ResultCode, what string) {
	if r.Result != want {
		e.failf("%s: want %s, got %s (%s)", what, want, r.Result, hexdump(r.Raw))
	}
}

// mapping describes a MAP or PEER mapping a check made, so it can be
// renewed and deleted.
type mapping struct {
	s   *sock
	req request
	r   *response
}

// newMap builds a MAP request from s's local address.
func (s *sock) newMap(proto byte, intPort, extPort uint16, lifetime uint32, opts ...[]byte) request {
	return request{Op: opMap, Lifetime: lifetime, Client: s.local.Addr(), Nonce: nonce(), Proto: proto, IntPort: intPort, ExtPort: extPort, Opts: opts}
}

// create sends req (a MAP or PEER) expecting SUCCESS, and registers a
// delete for the end of the check.
func (s *sock) create(req request) *mapping {
	r := s.ask(req.bytes())
	s.e.expectResult(r, pcp.Success, fmt.Sprintf("%s proto %d port %d", opName(req.Op), req.Proto, req.IntPort))
	m := &mapping{s: s, req: req, r: r}
	s.e.cleanup(m.deleteQuietly)
	return m
}

// mapTCP creates a TCP MAP for a fresh internal port, suggesting the same
// external port, lifetime 600 s.
func (s *sock) mapTCP(opts ...[]byte) *mapping {
	p := s.e.port()
	return s.create(s.newMap(protoTCP, p, p, 600, opts...))
}

// deleteReq is the lifetime-0 form of m's request (same nonce, protocol,
// port and THIRD_PARTY; no FILTER or PREFER_FAILURE).
func (m *mapping) deleteReq() request {
	d := m.req
	d.Lifetime = 0
	d.Opts = nil
	for _, o := range m.req.Opts {
		if o[0] == optThirdParty {
			d.Opts = append(d.Opts, o)
		}
	}
	return d
}

func (m *mapping) deleteQuietly() {
	if m.req.Op != opMap {
		return // PEER mappings cannot be deleted (§15); they expire
	}
	b := m.deleteReq()
	m.s.send(b.bytes())
	m.s.recv(time.Now().Add(m.s.e.Timeout / 2))
}

func opName(op byte) string { return pcp.Opcode(op).String() }

// errNoPath explains NA verdicts for data-plane probes that cannot run.
var errNoPath = errors.New("conformance: no data plane")

// serve starts a data-plane server on the client for the check.
func (e *Env) serve(proto byte, port uint16) {
	c, err := e.Data.Serve(proto, port)
	if err != nil {
		e.failf("data plane: serve %d/%d on the client: %v", proto, port, err)
	}
	e.cleanup(func() { c.Close() })
}

// probe reports whether traffic from the internet reaches the client.
func (e *Env) probe(proto byte, from netip.Addr, to netip.AddrPort) error {
	if e.Data == nil {
		return errNoPath
	}
	return e.Data.Probe(proto, netip.AddrPortFrom(from, 0), to)
}
