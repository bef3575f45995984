package server

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// early answers, in the socket reader and without the engine, the PCP
// requests whose answer depends on no lease: malformed ones (the codec's
// error, PKT-05..07, OPT-03, VER-01) and MAP or PEER requests the policy
// refuses at the first step of MAP-01 (ownership: NOT_AUTHORIZED and the
// other policy codes). Such answers then neither queue behind the engine
// nor wait for a batch's kernel transaction and fsync, and the socket's
// reader answers them as fast as it reads (the engine is one goroutine).
//
// ANNOUNCE is answered here too (it depends on nothing but the epoch).
// It returns handled=false for anything else, which goes to the engine:
// NAT-PMP, requests the policy allows, and configurations where
// a refusal would come from an earlier step (MAP or PEER switched off).
// Before that, the sender's owner spends a token of its bucket (ownerGate):
// a packet over the owner's quota while others want the engine is dropped
// here (handled, no reply) and never takes a place in the queue.
// A nil reply with handled=true is a silent drop. The checks are the
// engine's own (pcp.Parser with the same settings, Policy.Authorize as
// Server.authorize calls it, resultCode), so both paths give the same
// answer. A reply is appended to dst. Nothing is allocated per request.
//
// now is the readers' clock (Server.steady, never rebased), for the owner
// gate and bucket; an answer's epoch is the epoch at the running clock's
// reading that corresponds to it (epochAt), as the engine's.
//
// early knows no arrival interface (as Handle): WireGuard peers' sources
// are nobody's. The readers call earlyTallied with their socket's.
func (s *Server) early(dst, b []byte, src netip.AddrPort, now time.Time) (reply []byte, handled bool) {
	return s.earlyTallied(nil, dst, b, src, "", now)
}

// earlyTallied is early counting its answers in t (a socket reader's, nil:
// count each at once), for a request that arrived on the interface whose
// kernel name is iface (Request.Iface).
//
// A THIRD_PARTY target is judged by a view fresh enough for the request
// (--wireguard-fresh), waited for here: earlyTallied is for callers that
// may wait; the socket readers call earlyRead, which hands such a request
// to the THIRD_PARTY queue instead.
func (s *Server) earlyTallied(t *tally, dst, b []byte, src netip.AddrPort, iface string, now time.Time) (reply []byte, handled bool) {
	reply, v := s.earlyIn(t, dst, b, src, netip.Addr{}, iface, now, time.Time{}, false)
	return reply, v == earlyAnswered
}

// earlyVerdict is what earlyIn decided for a request.
type earlyVerdict uint8

const (
	earlyEngine   earlyVerdict = iota // for the engine: the caller queues it
	earlyAnswered                     // answered: the reply (nil: a silent drop)
	earlyDeferred                     // THIRD_PARTY needing a fresher view: the THIRD_PARTY queue's (tpQueue)
)

// earlyRead is the socket readers' earlyTallied: it never waits for a
// WireGuard read. A THIRD_PARTY request that needs a fresher view, and
// every THIRD_PARTY request whose target is not its source while the
// THIRD_PARTY queue is busy (its order), is earlyDeferred: the reader
// hands it to Server.deferThirdParty. local is the serving address the
// request was sent to (the socket's).
func (s *Server) earlyRead(t *tally, dst, b []byte, src netip.AddrPort, local netip.Addr, iface string, now time.Time) ([]byte, earlyVerdict) {
	return s.earlyIn(t, dst, b, src, local, iface, now, time.Time{}, true)
}

// earlyIn is earlyTallied and earlyRead: arrived is when the request was
// received (zero: now, at the call), for the view a THIRD_PARTY target
// is judged by; reader says the caller is a socket reader (earlyRead);
// local is the serving address the request was sent to (invalid: not
// known, as for Handle's callers), which tells the host's own requests
// (bucketOwner).
func (s *Server) earlyIn(t *tally, dst, b []byte, src netip.AddrPort, local netip.Addr, iface string, now, arrived time.Time, reader bool) ([]byte, earlyVerdict) {
	if len(b) < 2 {
		return nil, earlyEngine
	}
	if b[0] == pcp.PMPVersion && s.natpmpOn(src.Addr()) {
		if s.freshFirst(reader, pmpOpens(b), arrived) {
			return nil, earlyDeferred
		}
		return s.toEngine(src, local, iface, policy.Owner{}, false, now) // NAT-PMP: the engine's (handle's dispatch)
	}
	p := pcp.Parser{
		DisableThirdParty: s.pol.ThirdPartyMode() == policy.ThirdPartyOff,
		IgnorePortSet:     true,
		DeferOptionChecks: true,
	}
	req := reqPool.Get().(*pcp.Request)
	defer reqPool.Put(req)
	if err := p.ParseRequest(b, src.Addr(), req); err != nil {
		// The parser's errors are *pcp.ParseError, never wrapped; a type
		// assertion, unlike errors.As, keeps pe off the heap.
		pe, ok := err.(*pcp.ParseError)
		if !ok || pe.Silent {
			s.dropEarly("malformed", src)
			return nil, earlyAnswered
		}
		s.lis.es.count(t, s.m, opName(b), pe.Result)
		if ce := s.plog.Check(zap.DebugLevel, "refused"); ce != nil {
			ce.Write(zap.Stringer("from", src), zap.Stringer("result", pe.Result), zap.Error(err))
		}
		return pcp.AppendErrorResponse(dst, b, pe.Result, pe.Result.ErrorLifetime(), s.epochAt(now)), earlyAnswered
	}
	switch {
	case req.Opcode == pcp.OpAnnounce:
		// ANN-01, ANN-02: stateless, the same for any source (handlePCP's
		// answer, byte for byte). Answered here it never waits behind
		// the engine's commits: a client probing the server's epoch is
		// not slowed by someone else's flood of mappings (issue 9). The
		// per-source bucket (admit) already ran, as for every early
		// answer; it spends no owner token, as no engine work is done.
		s.lis.es.count(t, s.m, req.Opcode.String(), pcp.Success)
		return pcp.AppendResponse(dst, &pcp.Response{Opcode: pcp.OpAnnounce, Result: pcp.Success, Epoch: s.epochAt(now)}), earlyAnswered
	case req.Opcode == pcp.OpMap && !s.cfg.DisableMap, req.Opcode == pcp.OpPeer && !s.cfg.DisablePeer:
	default:
		return s.toEngine(src, local, iface, policy.Owner{}, false, now) // refused by the engine's earlier step
	}
	internal, tp := requestInternal(src, req)
	// Server.authorize, without its error value (one allocation per
	// refusal): the same policy call and the same leniency for deletes.
	deleting := req.Opcode == pcp.OpMap && req.Lifetime == 0
	if s.freshFirst(reader, req.Lifetime != 0, arrived) {
		return nil, earlyDeferred
	}
	owner, reason := s.pol.Authorize(policy.Request{
		Source: src.Addr(), Iface: iface, Target: internal, ThirdParty: tp, Delete: deleting, Protocol: uint8(req.Map.Protocol), InternalPort: req.Map.InternalPort,
	})
	if deleting {
		switch reason {
		case policy.ProtocolDenied, policy.PortDenied, policy.AllPortsDenied, policy.AllProtocolsDenied, policy.HostUnread:
			reason = policy.Allowed
		}
	}
	if reason == policy.Allowed {
		return s.toEngine(src, local, iface, owner, true, now)
	}
	code := policyCodes[reason]
	s.lis.es.count(t, s.m, req.Opcode.String(), code)
	if ce := s.plog.Check(zap.DebugLevel, "refused"); ce != nil {
		ce.Write(zap.Stringer("from", src), zap.Stringer("opcode", req.Opcode), zap.Stringer("result", code), zap.Stringer("reason", reason))
	}
	return pcp.AppendErrorResponse(dst, b, code, code.ErrorLifetime(), s.epochAt(now)), earlyAnswered
}

// freshFirst applies the freshness rule to a request for the engine
// (PCP MAP or PEER, NAT-PMP) when the ownership's view may lag (s.fresh,
// WireGuard): one that opens or extends a pinhole (opens: not a delete)
// is judged by a view whose read began no more than the fresh bound
// before it arrived (one read for all requests that arrived before it
// began), here, outside the engine: the engine's Authorize then sees the
// same view or a newer one. Before h/fresh only THIRD_PARTY targets were
// (h/tpfresh): a request whose source the held view found was judged by
// it however old, so a device swapped by the admin (old peer removed, a
// new key with the same AllowedIPs) had its first mapping granted in the
// old peer's name and revoked by the next read
// (TestWireGuardDeviceSwapFirstMapping). A socket reader (reader) does
// not wait for the read: it is told to hand the request to the
// THIRD_PARTY queue (tpQueue), which waits for it; while the queue holds
// anything, every request for the engine goes there too, deletes
// included, so that none overtakes one of its client's queued before it.
// Under load the ownership keeps its view fresh itself (WireGuard.Stale,
// keepFresh), so the readers seldom hand anything over. Others (the
// queue, earlyTallied) wait here for the view a request arrived at
// (zero arrived: now). Static ownership: nothing (s.fresh nil).
//
// A request that opens nothing (a delete, a PEER query, a NAT-PMP
// delete or address request) needs no fresh view, but it needs one read
// after the last device change (SwapPending: the listener reported the
// served WireGuard device swapped, back from another namespace, or not
// the one the ownership read at the start): till then the view has no
// peers on that interface, and a delete judged by it found no owner and
// was refused NOT_AUTHORIZED with a 30-minute error lifetime (RFC 6887:
// the client backs off that long, and its mapping lives to its expiry),
// though the read would have found the owner (h/flake's left;
// TestE2EDeleteAfterDeviceChange). Such a request goes the opening
// requests' way (the queue, FreshenAt), and so keeps its place behind
// its client's queued MAP. The read serves every request that arrived
// before it began, so a flood of deletes (from unowned sources too)
// costs the one read the change asked for, not one each; once it is
// read, a delete the view finds nobody's is refused as before. With no
// change pending a delete costs two atomic loads and no read.
func (s *Server) freshFirst(reader, opens bool, arrived time.Time) (deferred bool) {
	switch {
	case s.fresh == nil:
	case reader:
		return s.tpq.busy.Load() > 0 || opens && s.fresh.Stale() || !opens && s.fresh.SwapPending()
	case !opens && !s.fresh.SwapPending():
	case arrived.IsZero():
		s.fresh.FreshenAt(time.Now())
	default:
		s.fresh.FreshenAt(arrived)
	}
	return false
}

// pmpOpens reports whether the NAT-PMP request b opens or extends a
// mapping: a mapping request (UDP, TCP) of a lifetime other than 0.
// Anything else (the address request, a delete, one the engine refuses
// as malformed) opens nothing.
func pmpOpens(b []byte) bool {
	var r pcp.PMPRequest
	return pcp.ParsePMPRequest(b, &r) == nil && r.Opcode != pcp.PMPOpAddress && r.Lifetime != 0
}

// reqPool holds the decoded requests of early: the parser's result escapes
// (its options are filled in place), and one per packet was an allocation.
var reqPool = sync.Pool{New: func() any { return new(pcp.Request) }}

// policyCodes is resultCode for each policy reason, computed once so that
// a refusal costs no error value.
var policyCodes = func() (t [256]pcp.ResultCode) {
	for r := range t {
		t[r] = resultCode(&policyError{policy.Reason(r)})
	}
	return t
}()

// toEngine decides whether a request that needs the engine is queued: its
// owner (known is false when the caller has not looked it up yet) spends
// a token, and is held to its bucket when it is not alone (ownerGate).
// The bucket is bucketOwner's.
func (s *Server) toEngine(src netip.AddrPort, local netip.Addr, iface string, o policy.Owner, known bool, now time.Time) ([]byte, earlyVerdict) {
	k := s.bucketOwner(src.Addr(), local, iface, o, known)
	// Both run for every request: the gate must see every owner, and the
	// bucket is spent even while it does not bind.
	contended := s.lis.es.gate.contended(k, now, len(s.in), cap(s.in))
	if s.orl.AllowKey(k, now) || !contended {
		return nil, earlyEngine
	}
	s.dropEarly("owner-rate-limit", src)
	return nil, earlyAnswered
}

// hostOwner is the owner bucket (and THIRD_PARTY queue share) of the
// requests from the host's own addresses (bucketOwner). No ownership
// makes it: owners are "wg:..." and "static:...".
const hostOwner policy.OwnerID = "host"

// bucketOwner is the key of the owner bucket, and of the THIRD_PARTY
// queue's share, a request from src to the serving address local that
// arrived on the interface whose kernel name is iface spends: o's, the
// owner Authorize allowed it as (known), else the one it is taken as on
// its interface (Policy.Requester), so that a peer of another interface
// sending from an owner's address spends the unowned bucket (the zero
// key), not that owner's. The host's own request (hostOwn: its source is
// local itself) spends the host's bucket (hostOwner), whatever owner's
// prefix holds the address.
//
// Security (issue 9, review h/revh3, LOW): any local user may send from
// the host's served address (the serving sockets' filter takes the
// host's own requests through loopback: source = the served address),
// and when that address lies in an owner's prefix (a static client given
// the LAN's /64 or 10.0.0.0/24, a WireGuard peer with ::/0), its requests
// were taken as that owner's: Authorize finds them nobody's or never
// openable, yet a flood of NAT-PMP requests from the host's IPv4
// address, or of deferred ones, spent the owner's bucket and queue
// share, and the owner's own requests were dropped "owner-rate-limit"
// (TestHostSourceOwnBuckets). An allowed request (known) is never the
// host's: its own address is never openable and its THIRD_PARTY
// requests are nobody's, so only the lookup a caller has not made pays
// the host check.
//
// The host's own request is told by the serving address, not by the
// host's address set (review h/revl9, LOW): a source that is one of the
// host's addresses but not local came from a link, as the serving
// sockets' filter takes a loopback datagram only from the address it was
// sent to: client a sending from the host's other address in its prefix
// (its WAN or another interface's address, or one the host has just
// given up: the set lags), or a WireGuard peer whose AllowedIPs hold it
// (IPv6 has no martian-source check). Judged by the set (h/local9's
// Policy.HostSource), such requests spent the host's bucket and queue
// share, not the sender's: a escaped its own owner bucket and THIRD_PARTY
// share by sending from that address, and its flood spent the bucket of
// the host's own requests (TestLinkSourceHostAddressOwnersBucket). The
// lag the other way (a served address not yet in the set) charged the
// host's own requests from it to the owner. One comparison, no lookup.
func (s *Server) bucketOwner(src, local netip.Addr, iface string, o policy.Owner, known bool) policy.OwnerKey {
	if !known {
		if hostOwn(src, local) {
			return s.hostKey
		}
		o, _ = s.pol.Requester(src, iface)
	}
	if o.ID == "" {
		return policy.OwnerKey{} // every unowned source together
	}
	return s.orl.Key(o.ID)
}

// ownerGate decides when the per-owner bucket binds (PKT-08, SEC-04). The
// bucket (ownerRateFactor times the per-source rate and burst) is spent on
// every request that needs the engine, but it is enforced only when the
// owner is not alone: another owner sent a request for the engine within
// ownerContendWindow, or the queue is 1/ownerQueueShare full. An owner
// with many prefixes (a /48 is 65 536 /64 source buckets) therefore
// cannot take the engine from anyone else, however many sources it uses,
// while a static client with a LAN of many hosts may still use all of it
// when nobody else wants it. Enforcing only past a queue threshold (the
// former rule) let a flooding owner keep 1/8 of the queue in front of
// every other client: 17 ms p99 for a victim, 4 ms without the flood.
//
// It remembers the two owners that most recently sent engine-bound
// requests, with when; the readers update it without a lock (a lost
// update only delays the decision by one request).
type ownerGate struct {
	last, prev       atomic.Uint64 // owner keys (hashes); 0 and unset alike are harmless: the times decide
	lastAt, prevAt   atomic.Int64  // Unix nanoseconds of the steady clock (Server.steady: never stepped)
	lastSet, prevSet atomic.Bool
}

// Tunables of the owner bucket.
const (
	ownerRateFactor    = policy.OwnerRateFactor
	ownerQueueShare    = 8
	ownerContendWindow = 5 * time.Second
	// gateResolution is how stale the latest owner's time may be before
	// it is written again: a flood from one owner then writes the shared
	// cache line once a millisecond, not once a packet.
	gateResolution = int64(time.Millisecond)
)

// contended reports whether an owner other than k sent an engine-bound
// request within ownerContendWindow of now, or the queue (qlen of qcap)
// is filling, and records k's request.
func (g *ownerGate) contended(k policy.OwnerKey, now time.Time, qlen, qcap int) bool {
	id, t := k.Hi, now.UnixNano()
	var other bool
	if g.lastSet.Load() && g.last.Load() == id {
		if t-g.lastAt.Load() > gateResolution {
			g.lastAt.Store(t)
		}
		other = g.prevSet.Load() && g.prev.Load() != id && t-g.prevAt.Load() < int64(ownerContendWindow)
	} else {
		// A different owner than the latest: that one becomes the other.
		had := g.lastSet.Load()
		pid, pat := g.last.Load(), g.lastAt.Load()
		g.prev.Store(pid)
		g.prevAt.Store(pat)
		g.prevSet.Store(had)
		g.last.Store(id)
		g.lastAt.Store(t)
		g.lastSet.Store(true)
		other = had && t-pat < int64(ownerContendWindow)
	}
	return other || qlen >= max(qcap/ownerQueueShare, 1)
}

// earlyState is what the socket readers keep for Server.early: the owner
// gate and the request counters they update.
type earlyState struct {
	gate ownerGate
	mu   sync.Mutex
	ctrs map[counterKey]prometheus.Counter
	// byKey is ctrs published for lock-free reads: a copy-on-write map
	// replaced whenever a new label combination appears (a few dozen at
	// most: opcodes × result codes, drop reasons).
	byKey atomic.Pointer[map[counterKey]prometheus.Counter]
}

type counterKey struct {
	op, res string // requests_total; op "" means dropped_total with reason res
}

// counter returns the counter for k, creating it once: a CounterVec's
// WithLabelValues hashes the labels and takes a lock on every call.
func (e *earlyState) counter(m *metrics, k counterKey) prometheus.Counter {
	if cur := e.byKey.Load(); cur != nil {
		if c, ok := (*cur)[k]; ok {
			return c
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if c, ok := e.ctrs[k]; ok {
		return c
	}
	var c prometheus.Counter
	if k.op == "" {
		c = m.dropped.WithLabelValues(k.res)
	} else {
		c = m.requests.WithLabelValues("pcp", k.op, k.res)
	}
	next := make(map[counterKey]prometheus.Counter, len(e.ctrs)+1)
	for kk, v := range e.ctrs {
		next[kk] = v
	}
	next[k] = c
	e.ctrs = next
	e.byKey.Store(&next)
	return c
}

// count counts one answer of res to an op request, in t when there is one.
func (e *earlyState) count(t *tally, m *metrics, op string, res pcp.ResultCode) {
	if t == nil || !t.add(e, m, op, res) {
		e.counter(m, counterKey{op: op, res: res.String()}).Inc()
	}
}

// tally is one socket reader's count of its early answers, added to the
// shared counters once per batch (flush). A counter's Inc is an atomic
// add on a cache line every reader writes: per answer, the two readers
// of the bench machine's two cores passed that line back and forth at
// each request. An op and result code it counted once keep their entry,
// so the counter is looked up once, not per request.
type tally struct {
	n       int
	entries [tallySize]tallyEntry
}

type tallyEntry struct {
	op    string
	res   pcp.ResultCode
	c     prometheus.Counter
	count uint64
}

// tallySize bounds the kinds of answers a reader keeps; more (not seen
// in practice: a few opcodes times a few result codes) are counted at once.
const tallySize = 16

// add counts one answer in t; false when t has no room for a new kind.
func (t *tally) add(e *earlyState, m *metrics, op string, res pcp.ResultCode) bool {
	for i := range t.n {
		if en := &t.entries[i]; en.res == res && en.op == op {
			en.count++
			return true
		}
	}
	if t.n == tallySize {
		return false
	}
	t.entries[t.n] = tallyEntry{op: op, res: res, c: e.counter(m, counterKey{op: op, res: res.String()}), count: 1}
	t.n++
	return true
}

// flush adds the counts to the shared counters.
func (t *tally) flush() {
	for i := range t.n {
		if en := &t.entries[i]; en.count > 0 {
			en.c.Add(float64(en.count))
			en.count = 0
		}
	}
}

// dropEarly is Server.drop for the readers: the same counter and sampled
// log line, without a lookup or an allocation per packet.
func (s *Server) dropEarly(reason string, src netip.AddrPort) {
	s.lis.es.counter(s.m, counterKey{res: reason}).Inc()
	if ce := s.plog.Check(zap.DebugLevel, "dropped"); ce != nil {
		ce.Write(zap.String("reason", reason), zap.Stringer("from", src))
	}
}
