package server

import (
	"errors"
	"net/netip"
	"slices"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// Request is one datagram for HandleBatch: what arrived, where from, and on
// which serving address.
type Request struct {
	Local  netip.AddrPort // the serving address it was sent to
	Source netip.AddrPort // the sender
	// Iface is the kernel name of the interface it arrived on (its
	// socket's: SO_BINDTODEVICE lets a socket see only what arrives
	// there). A WireGuard peer's source is its peer's only on an
	// interface where the peer holds it (policy.Request.Iface); "" (not
	// known) makes such sources nobody's. Static owners ignore it.
	Iface string
	Data  []byte
	// admitted: the socket reader already ran admit.
	admitted bool
	// ifk is the arrival interface's key for the per-source bucket
	// (sourceKey of ifaceKey: the reader's socket's index); 0:
	// sourceKey of ifaceKey(0, Iface).
	ifk uint32
}

// outcome is what handling one request produced.
type outcome struct {
	reply []byte // nil: no reply (silent drop)
	// fail says how to build the reply if the batch's commit fails: set
	// by requests that staged a state change (NO_RESOURCES, choice (g)).
	// It is built only then.
	fail  failReply
	proto string // "pcp" or "natpmp", for metrics
	op    string
	res   string
	// log is the decision's log line, written after a successful commit
	// (built only if the logger wants it); after, if set, runs then too.
	log   logRec
	after func()
	// ends: the request ended a mapping on purpose whose flows the
	// ruleset does not cut by itself (mustWaitFlush), so its reply waits
	// for the conntrack flush (PMP-12); other replies need not.
	ends bool
	// absorbed: the request was an absorbed renewal (absorb.go), which
	// does not depend on its batch's commit.
	absorbed bool
}

// failReply is what a request's reply becomes if its change cannot be
// committed: NO_RESOURCES (PCP) or OUT_OF_RESOURCES (NAT-PMP).
type failReply struct {
	kind  uint8 // 0: none (nothing staged)
	epoch pcp.Epoch
	pmpOp pcp.PMPOpcode
	port  uint16 // NAT-PMP internal port
}

const (
	failPCP = 1 + iota
	failPMP
)

// build encodes the failure reply to request b.
func (f *failReply) build(b []byte) []byte {
	switch f.kind {
	case failPCP:
		return pcp.AppendErrorResponse(nil, b, pcp.NoResources, pcp.NoResources.ErrorLifetime(), f.epoch)
	case failPMP:
		return pcp.AppendPMPMapResponse(nil, f.pmpOp, pcp.PMPOutOfResources, f.epoch, f.port, 0, 0)
	}
	return nil
}

// logRec is a decision's log line: msg about lease, requested from from.
type logRec struct {
	msg   string // "": none
	lease store.Lease
	from  netip.AddrPort
	grant time.Duration // lifetime granted; 0: not logged
}

// Log messages of logRec and the logger that writes each: new mappings
// and deletions through the sampled per-packet logger, renewals (the bulk
// of the traffic) only at debug.
const (
	msgMapped     = "mapped"
	msgRenewed    = "renewed"
	msgDeleted    = "deleted"
	msgPeerMapped = "peer mapped"
)

// write logs r if its logger is enabled for it; the fields are built only
// then.
func (s *Server) writeLog(r *logRec) {
	var ce *zapcore.CheckedEntry
	switch r.msg {
	case "":
		return
	case msgRenewed:
		ce = s.log.Check(zap.DebugLevel, r.msg)
	default:
		ce = s.plog.Check(zap.InfoLevel, r.msg)
	}
	if ce == nil {
		return
	}
	fs := leaseFields(&r.lease, r.from)
	if r.grant != 0 {
		fs = append(fs, zap.Duration("lifetime", r.grant))
	}
	ce.Write(fs...)
}

// reqLabels are the requests counter's labels.
type reqLabels struct{ proto, op, res string }

// countRequest counts an answered request; the counters are cached per
// label set (under mu).
func (s *Server) countRequest(proto, op, res string) {
	k := reqLabels{proto, op, res}
	c, ok := s.counters[k]
	if !ok {
		c = s.m.requests.WithLabelValues(proto, op, res)
		if len(s.counters) < 1024 {
			s.counters[k] = c
		}
	}
	c.Inc()
}

// Handle handles one request as a batch of its own and returns the reply
// (nil for a silent drop). Tests, fuzzing and benchmarks drive the engine
// through it; the network path uses HandleBatch. It knows no arrival
// interface (Request.Iface): sources owned by WireGuard peers are
// nobody's here, static owners are served as on the network. An
// IPv4-mapped source (::ffff:a.b.c.d) is dropped, as on the network
// (pcpd_requests_dropped_total{reason="bad-source"}): pass IPv4 sources
// unmapped.
func (s *Server) Handle(local, src netip.AddrPort, b []byte) []byte {
	return s.HandleBatch([]Request{{Local: local, Source: src, Data: b}})[0]
}

// HandleBatch handles requests that arrived together: every state change
// goes to the kernel in one transaction and to the store in one commit,
// and only then are the replies released. If the commit fails, the batch
// is rolled back and each request is handled again on its own, so one bad
// request does not fail the others.
//
// It returns once the connections of mappings the batch ended are gone
// (PMP-12): cut by the ruleset as their pinholes' elements went
// (mustWaitFlush), or else flushed from conntrack.
func (s *Server) HandleBatch(reqs []Request) [][]byte {
	replies, ends := s.handleBatch(reqs, nil)
	if ends != nil {
		// Not for the expiries handleBatch ran first: no reply waits
		// for their flush.
		s.waitConntrack()
	}
	return replies
}

// handleBatch is HandleBatch without waiting for the conntrack flush; ends
// marks the requests whose replies must wait for it (nil: none). The
// replies go into dst's array when it has room (the engine's, reused from
// batch to batch). A batch that answered an unsolicited update whose
// send is in flight returns once that send has ended: its SUCCESS for a
// re-map never leaves before the stale update of the same nonce
// (updates.go).
func (s *Server) handleBatch(reqs []Request, dst [][]byte) (replies [][]byte, ends []bool) {
	replies, ends, behind := s.handleBatchLocked(reqs, dst)
	if behind {
		s.awaitUpdateSends()
	}
	return replies, ends
}

// handleBatchLocked is handleBatch's part under s.mu; behind reports a
// request answering an update in flight (updateBehind).
func (s *Server) handleBatchLocked(reqs []Request, dst [][]byte) (replies [][]byte, ends []bool, behind bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now() // under s.mu: a rebase (clock.go) moves the table's times
	s.expireLocked(now)
	if cap(s.outs) < len(reqs) {
		s.outs = make([]outcome, len(reqs))
	}
	outs := s.outs[:len(reqs)]
	s.handleTx(reqs, now, false, outs)
	replies = slices.Grow(dst[:0], len(outs))[:len(outs)]
	for i := range outs {
		o := &outs[i]
		replies[i] = o.reply
		if o.ends {
			// Rare (deletes): only then is there anything to mark.
			if ends == nil {
				ends = make([]bool, len(outs))
			}
			ends[i] = true
		}
		if o.reply != nil {
			s.countRequest(o.proto, o.op, o.res)
		}
	}
	clear(outs) // the buffer is kept: drop its references to replies and leases
	return replies, ends, s.updateBehind()
}

// handleTx handles reqs in as few transactions as fit (see the cut below)
// and leaves their outcomes in outs (len(reqs) of them). retry marks the
// one-by-one re-run after a failed batch: those requests already passed
// the rate limiter.
func (s *Server) handleTx(reqs []Request, now time.Time, retry bool, outs []outcome) {
	for start := 0; start < len(reqs); {
		// Cut the batch where its kernel changes would no longer fit one
		// transaction: every SUCCESS rests on one atomic change.
		t := s.begin(now)
		t.retry = retry
		end := start
		for end < len(reqs) && (end == start || len(t.ops) <= s.opsBudget) {
			n, a := len(t.ended), t.absorbs
			outs[end] = s.handle(t, &reqs[end])
			outs[end].ends = s.mustWaitFlush(t.ended[n:])
			outs[end].absorbed = t.absorbs > a
			end++
		}
		s.commitOutcomes(t, reqs[start:end], outs[start:end])
		s.release(t)
		start = end
	}
}

// commitOutcomes commits t, the changes of reqs; on failure it rolls back
// and handles each request again alone (or, alone already, answers with
// its failure reply).
func (s *Server) commitOutcomes(t *tx, reqs []Request, outs []outcome) {
	if t.empty() {
		// A request that changed no lease may still have ended a
		// quarantine that was over (usable): not worth a commit of its
		// own, the next one writes it.
		t.oweQuar()
		for i := range outs {
			s.writeLog(&outs[i].log) // absorbed renewals (absorb.go)
		}
		return
	}
	s.m.batchSize.Observe(float64(len(reqs)))
	if err := t.commit(); err != nil {
		t.rollback()
		if len(reqs) > 1 {
			s.log.Warn("batch commit failed; handling its requests one by one", zap.Int("requests", len(reqs)), zap.Error(err))
			for i := range reqs {
				if outs[i].absorbed {
					// Its SUCCESS stands: the rollback left the absorbed
					// renewal in the table (absorb.go). Handled again,
					// later, it may find its lease due and be written
					// through; a failure then would answer NO_RESOURCES
					// with the table still holding the first pass's
					// expiry (HDR-06).
					s.writeLog(&outs[i].log)
					continue
				}
				// Each retry at its own time: after a failed commit (and
				// the retries before it) the batch's now may be well
				// behind, and kernel timeouts computed from it would
				// outlast their leases.
				s.handleTx(reqs[i:i+1], s.now(), true, outs[i:i+1])
			}
			return
		}
		s.log.Error("cannot make a change durable; answered NO_RESOURCES", zap.Stringer("client", reqs[0].Source), zap.Error(err))
		o := &outs[0]
		outs[0] = outcome{reply: o.fail.build(reqs[0].Data), proto: o.proto, op: o.op, res: "commit-failed"}
		return
	}
	for i := range outs {
		o := &outs[i]
		s.writeLog(&o.log)
		if o.after != nil {
			o.after()
		}
	}
}

// pfPenalty is how many extra rate-limit tokens a failed PREFER_FAILURE
// request costs (PF-06).
const pfPenalty = 4

// call is the context of one request.
type call struct {
	t     *tx
	src   netip.AddrPort
	local netip.AddrPort
	iface string // Request.Iface
	ifk   uint32 // the per-source bucket's interface key (Request.ifk)
	data  []byte
	now   time.Time
	epoch pcp.Epoch
	// ex is mapInbound's copy of the lease it renews or replaces: the
	// table's get would allocate one per request (288 B), and the call
	// lives on the handler's stack.
	ex store.Lease
}

func (s *Server) drop(reason string, src netip.AddrPort) outcome {
	s.m.dropped.WithLabelValues(reason).Inc()
	s.plog.Debug("dropped", zap.String("reason", reason), zap.Stringer("from", src))
	return outcome{}
}

// handle runs the checks of PKT-09 in order and dispatches by version.
func (s *Server) handle(t *tx, r *Request) outcome {
	b := r.Data
	src := r.Source
	if src.Addr().Is4In6() {
		// As the readers do (sockaddrPort): unmapped, such a source was
		// taken as the IPv4 address's owner's (review h/revreq), and every
		// serving socket is bound to an address of its own family, so no
		// real IPv4 request arrives mapped. In-process callers (Handle,
		// HandleBatch: tests, fuzzing) get the same drop.
		return s.drop("bad-source", src)
	}
	ifk := r.ifk
	if ifk == 0 {
		ifk = sourceKey(ifaceKey(0, r.Iface), src.Addr(), r.Local.Addr())
	}
	c := &call{t: t, src: src, local: r.Local, iface: r.Iface, ifk: ifk, data: b, now: t.now, epoch: s.epoch.at(t.now)}
	if !r.admitted && !t.retry {
		if reason := s.admit(b, src, ifk, s.steadyAt(c.now)); reason != "" {
			return s.drop(reason, src)
		}
	}
	pmp := len(b) >= 2 && b[0] == pcp.PMPVersion && s.natpmpOn(src.Addr())
	if pmp {
		return s.handlePMP(c)
	}
	return s.handlePCP(c)
}

// admit runs the checks of PKT-09 that come before any work: silent drops
// (PKT-01..03) and the per-source token bucket (PKT-08: excess is dropped,
// so a flooding client cannot starve the others). It returns why a packet
// is dropped, or "". The network path runs it in the socket readers,
// before a packet takes a place in the engine's queue. iface is the
// arrival interface (ifaceKey): the bucket is the source's on that
// interface, so a peer of another interface sending from a client's
// address (WireGuard checks sources per interface) spends its own.
func (s *Server) admit(b []byte, src netip.AddrPort, iface uint32, now time.Time) string {
	switch {
	case len(b) < 2:
		return "short"
	case b[1]&0x80 != 0:
		return "response"
	}
	if b[0] == pcp.Version && len(b) < pcp.HeaderSize {
		return "short" // PKT-03
	}
	// Every packet that would be answered spends a token, unsupported
	// versions too (their answer is never larger than 4 octets over the
	// request, VER-04): otherwise one client could fill the shared queue
	// with them for free. PKT-09 puts the version check before overload
	// for which result code an answer carries; under overload the packet
	// is not answered at all (PKT-08 allows dropping).
	if !s.rl.AllowOn(src.Addr(), iface, now) {
		return "rate-limit"
	}
	// The per-owner bucket comes after the early answers, for what needs
	// the engine (Server.early, ownerGate).
	return ""
}

// ifaceKey numbers an arrival interface for the per-source bucket
// (policy.RateLimiter.AllowOn): its index when known (a socket's; it
// survives a rename), else, for requests handed in by name alone
// (HandleBatch), a hash of the name above every index (Linux indexes are
// positive int32s); 0 when neither is known.
func ifaceKey(index int, name string) uint32 {
	switch {
	case index > 0:
		return uint32(index)
	case name == "":
		return 0
	}
	h := uint32(2166136261) // FNV-1a
	for i := range len(name) {
		h = (h ^ uint32(name[i])) * 16777619
	}
	return 1<<31 | h&(1<<30-1)
}

// hostIfaceKey is the per-source bucket's interface key (ifaceKey) of the
// host's own requests (sourceKey): loopback's index, as they come through
// loopback.
const hostIfaceKey = loopbackIndex

// sourceKey is the per-source bucket's interface key for a request from
// src to the serving address local that arrived on the interface keyed
// ifk: ifk, or hostIfaceKey when src is local itself, the host's own
// request. The serving sockets' filter (hostOwnFilter) takes nothing else
// through loopback, so every request a process of this host sends, any
// local user's, has that source; one from the link with the served
// address as its source is the host's too (the standalone rules drop it
// before, servedSourceRules).
//
// Security (issue 9, review h/revh3, LOW): IPv6 sources share a bucket
// per /64 (--rate-limit, Config.RatePrefix6), and the host's served
// address lies in its LAN's /64: a local user's flood from it (ANNOUNCEs
// will do) spent the bucket of every client of that /64 on that
// interface, and their requests were dropped "rate-limit"
// (TestHostSourceOwnBuckets). One comparison, no lookup: it runs for
// every datagram.
func sourceKey(ifk uint32, src, local netip.Addr) uint32 {
	if hostOwn(src, local) {
		return hostIfaceKey
	}
	return ifk
}

// hostOwn reports whether a request from src to the serving address local
// is the host's own: its source is local itself (sourceKey, bucketOwner).
// False when local is not known (invalid).
func hostOwn(src, local netip.Addr) bool {
	return local.IsValid() && src.WithZone("") == local.WithZone("")
}

// natpmpOn reports whether NAT-PMP is served to src (PMP-01): it needs an
// external IPv4 and an IPv4 client.
func (s *Server) natpmpOn(src netip.Addr) bool {
	return !s.cfg.DisableNATPMP && s.cfg.ExternalIPv4.IsValid() && src.Is4()
}

func (s *Server) handlePCP(c *call) outcome {
	o := outcome{proto: "pcp"}
	p := pcp.Parser{
		DisableThirdParty: s.pol.ThirdPartyMode() == policy.ThirdPartyOff,
		// PORT_SET is ignored: every MAP is single-port, which RFC 7753
		// allows (OPT-10).
		IgnorePortSet: true,
		// Option semantics come after ownership and protocol (MAP-01).
		DeferOptionChecks: true,
	}
	// The engine's scratch request: handlePCP runs under mu, one at a time.
	req := &s.pcpReq
	if err := p.ParseRequest(c.data, c.src.Addr(), req); err != nil {
		var pe *pcp.ParseError
		if !errors.As(err, &pe) || pe.Silent {
			return s.drop("malformed", c.src)
		}
		o.op = opName(c.data)
		o.res = pe.Result.String()
		o.reply = pcp.AppendErrorResponse(nil, c.data, pe.Result, pe.Result.ErrorLifetime(), c.epoch)
		s.plog.Debug("refused", zap.Stringer("from", c.src), zap.Stringer("result", pe.Result), zap.Error(err))
		return o
	}
	o.op = req.Opcode.String()
	resp := &s.pcpResp
	*resp = pcp.Response{Opcode: req.Opcode, Epoch: c.epoch}
	var code pcp.ResultCode
	var err error
	mark := c.t.mark()
	switch req.Opcode {
	case pcp.OpAnnounce:
		// ANN-01, ANN-02: no state, lifetime 0, nothing echoed.
		code = pcp.Success
	case pcp.OpMap:
		code, err = s.serveMap(c, req, resp, &o)
	case pcp.OpPeer:
		code, err = s.servePeer(c, req, resp, &o)
	}
	o.res = code.String()
	if code == pcp.CannotProvideExternal && req.Options.PreferFailure && !c.t.retry {
		// PF-06: failed PREFER_FAILURE requests probe which ports are in
		// use; each costs extra tokens, so probing is throttled sooner
		// than ordinary requests. The bucket is the one admit spends
		// (the source's on its arrival interface): the interface-0 one
		// no network request is admitted by made the penalty inert
		// (review h/revreq, TestPF06ProbeThrottle).
		for range pfPenalty {
			s.rl.AllowOn(c.src.Addr(), c.ifk, s.steadyAt(c.now))
		}
	}
	if code != pcp.Success {
		if c.t.mark() != mark {
			// A handler must not stage changes and then fail; undoing here
			// keeps HDR-06 even if one does.
			s.log.DPanic("handler staged changes and failed", zap.Stringer("result", code))
		}
		lt := resp.Lifetime
		if lt == 0 {
			lt = code.ErrorLifetime()
		}
		o.reply = pcp.AppendErrorResponse(nil, c.data, code, lt, c.epoch)
		if ce := s.plog.Check(zap.DebugLevel, "refused"); ce != nil {
			ce.Write(zap.Stringer("from", c.src), zap.Stringer("opcode", req.Opcode), zap.Stringer("result", code), zap.Error(err))
		}
		o.after, o.log.msg = nil, ""
		return o
	}
	resp.Result = pcp.Success
	if resp.Len() > pcp.MaxMessageSize || resp.Len() > len(c.data) {
		// Cannot happen (echoed options never exceed the request's), but
		// the no-amplification promise (f) must not rest on that.
		s.log.DPanic("success reply larger than its request", zap.Int("reply", resp.Len()), zap.Int("request", len(c.data)))
	}
	o.reply = pcp.AppendResponse(nil, resp)
	if c.t.mark() != mark {
		o.fail = failReply{kind: failPCP, epoch: c.epoch}
	}
	return o
}

func opName(b []byte) string {
	if len(b) < 2 {
		return "none"
	}
	if b[0] != pcp.Version {
		return "bad-version"
	}
	switch op := pcp.Opcode(b[1] & 0x7f); op {
	case pcp.OpAnnounce, pcp.OpMap, pcp.OpPeer:
		return op.String()
	}
	return "other"
}

// Internal errors of the engine. resultCode maps them, and policy reasons,
// to PCP result codes in one place.
var (
	errDisabled         = errors.New("opcode switched off")
	errNoExternalIPv4   = errors.New("no external IPv4 configured")
	errNonce            = errors.New("mapping nonce mismatch (strict mode)")
	errPeerOnly         = errors.New("only PEER mappings exist; MAP cannot delete them")
	errCannotProvide    = errors.New("suggested external address or port not available")
	errNoPorts          = errors.New("no external port free")
	errHostPortsUnread  = errors.New("the host's sockets not listed yet")
	errDNATCatchAll     = errors.New("a DNAT rule of the host's before pcpd's chain takes every connection to the external address")
	errTooManyFilters   = errors.New("too many filters for one mapping")
	errUnsuppProtocol   = errors.New("protocol not supported")
	errInternalPortZero = errors.New("internal port 0 with a lifetime")
)

// policyError carries a policy decision as an error.
type policyError struct{ reason policy.Reason }

func (e *policyError) Error() string { return "server: policy: " + e.reason.String() }

// resultCode maps an engine error to the PCP result code it is answered
// with.
func resultCode(err error) pcp.ResultCode {
	var pe *policyError
	var parse *pcp.ParseError
	switch {
	case err == nil:
		return pcp.Success
	case errors.As(err, &pe):
		switch pe.reason {
		case policy.Allowed:
			return pcp.Success
		case policy.ThirdPartyDenied:
			return pcp.UnsuppOption
		case policy.ProtocolDenied, policy.AllPortsDenied, policy.AllProtocolsDenied:
			return pcp.UnsuppProtocol
		case policy.ClientQuota:
			return pcp.UserExQuota
		case policy.GlobalQuota, policy.HostUnread, policy.PeersUnread, policy.HostSourceUnread:
			return pcp.NoResources
		}
		return pcp.NotAuthorized // NoOwner, NotOwned, NeverOpenable, PortDenied
	case errors.As(err, &parse):
		return parse.Result
	case errors.Is(err, errDisabled), errors.Is(err, errNoExternalIPv4),
		errors.Is(err, errNonce), errors.Is(err, errPeerOnly):
		return pcp.NotAuthorized
	case errors.Is(err, errCannotProvide):
		return pcp.CannotProvideExternal
	case errors.Is(err, errTooManyFilters):
		return pcp.ExcessiveRemotePeers
	case errors.Is(err, errUnsuppProtocol):
		return pcp.UnsuppProtocol
	case errors.Is(err, errInternalPortZero):
		return pcp.NotAuthorized
	}
	return pcp.NoResources // errNoPorts, errHostPortsUnread, errDNATCatchAll and anything unforeseen: the catch-all
}

// pmpResult maps a PCP result code to NAT-PMP's (RFC 6886 §3.5).
func pmpResult(c pcp.ResultCode) pcp.PMPResultCode {
	switch c {
	case pcp.Success:
		return pcp.PMPSuccess
	case pcp.NetworkFailure:
		return pcp.PMPNetworkFailure
	case pcp.NoResources, pcp.UserExQuota:
		return pcp.PMPOutOfResources
	}
	return pcp.PMPNotAuthorized
}

// fail is the handlers' return for a refusal: the code for the wire, the
// error for the log.
func fail(err error) (pcp.ResultCode, error) { return resultCode(err), err }
