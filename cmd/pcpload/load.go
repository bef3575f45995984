package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/pcp"
)

// config is one load run. The zero value is not usable; see defaults in
// main.go.
type config struct {
	Server netip.AddrPort
	// Src is the prefix the simulated clients' source addresses come from
	// (the first Clients addresses after the prefix's own address). The
	// server must consider them owned.
	Src     netip.Prefix
	Clients int
	// PerPrefix, if set, gives each client its own /PerPrefix inside Src
	// (address 1 of it), as WireGuard peers each own a prefix; servers
	// that rate-limit per /64 then see each client apart.
	PerPrefix int
	// UnauthSrc holds sources the server must refuse (opUnauth); the
	// first UnauthClients of them are used (0: as many as Clients, so a
	// per-source rate limit in the server bites no sooner than for the
	// owned clients).
	UnauthSrc     netip.Prefix
	UnauthClients int
	// Freebind sets IP(V6)_FREEBIND so sources need not be configured
	// addresses (a local route for the prefix suffices).
	Freebind bool

	Ports    int // lease slots per client: internal ports PortBase..PortBase+Ports-1
	PortBase int
	Protocol pcp.Protocol
	Lifetime time.Duration

	Concurrency int           // closed loop: workers; open loop: most requests in flight
	Rate        float64       // requests/s; 0 = closed loop (flat out)
	Duration    time.Duration // 0 = unbounded (Count must be set)
	Count       int64         // 0 = unbounded (Duration must be set)
	Timeout     time.Duration // a reply later than this is a loss
	// Tick (open loop) is the shortest time between two of the loop's
	// wake-ups: the requests due in between go out together in one
	// sendmmsg (0: defaultTick). Their wait counts as latency.
	Tick    time.Duration
	Prefill int // leases created (closed loop) before the measured phase
	Mix     mix
	Seed    uint64
	// ProbeTimeout bounds the wait for the server's first answer (default 5 s).
	ProbeTimeout time.Duration
	// OnMeasure, if set, is called as the measured phase starts (after
	// the probe and the prefill), so a driver can time a profiler.
	OnMeasure func()
	// Timeline, if set, splits the measured phase into buckets this long
	// (by intended send time) and reports each one's count and worst
	// latency, so a tail can be matched with events in the server.
	Timeline time.Duration
}

// opStats counts what happened to one kind of request.
type opStats struct {
	Sent       uint64            `json:"sent"`
	Answered   uint64            `json:"answered"`
	Timeouts   uint64            `json:"timeouts"`
	SendErrors uint64            `json:"send_errors"`
	Results    map[string]uint64 `json:"results"`
	Latency    latency           `json:"latency_us"`
	RatePerSec float64           `json:"rate_per_s"`

	results [256 + numExtra]uint64
	hist    *hist
}

// Reply classes besides the 256 PCP result codes.
const (
	resEcho     = 256 + iota // the reply is the request, byte for byte (the floor)
	resUnparsed              // a matching reply that does not decode as a PCP response
	numExtra
)

func resultName(i int) string {
	switch i {
	case resEcho:
		return "echo"
	case resUnparsed:
		return "unparsed"
	}
	return pcp.ResultCode(i).String()
}

func (s *opStats) merge(o *opStats) {
	s.Sent += o.Sent
	s.Answered += o.Answered
	s.Timeouts += o.Timeouts
	s.SendErrors += o.SendErrors
	for i, c := range o.results {
		s.results[i] += c
	}
	if s.hist == nil {
		s.hist = new(hist)
	}
	if o.hist != nil {
		s.hist.merge(o.hist)
	}
}

func (s *opStats) finish(elapsed time.Duration) {
	s.Results = map[string]uint64{}
	for i, c := range s.results {
		if c > 0 {
			s.Results[resultName(i)] = c
		}
	}
	if s.hist != nil {
		s.Latency = s.hist.summary()
	}
	if elapsed > 0 {
		s.RatePerSec = float64(s.Answered) / elapsed.Seconds()
	}
}

// phase is the outcome of the prefill or the measured phase.
type phase struct {
	ElapsedSec float64             `json:"elapsed_s"`
	Total      opStats             `json:"total"`
	Ops        map[string]*opStats `json:"ops"`
	Unmatched  uint64              `json:"unmatched"`
	// Announces counts unsolicited ANNOUNCEs (RFC 6887 §14.1.3): a
	// server that just started or lost state sends them to its clients.
	Announces uint64            `json:"unsolicited_announces"`
	Fallbacks map[string]uint64 `json:"fallbacks,omitempty"`
	// Start is the wall-clock start of the phase; Timeline its buckets
	// (config.Timeline), for matching slow requests with server events.
	Start    time.Time `json:"start"`
	Timeline []bucket  `json:"timeline,omitempty"`
	// SendLag (open loop) is how long after its intended time each request
	// was sent: the generator's own lateness, not in the latency (which
	// counts from the send) but in LatencyFromDue.
	SendLag *latency `json:"send_lag_us,omitempty"`
	// RecvLag (open loop) is how long after the kernel received each reply
	// the generator read it: not in the latency, which ends at the
	// kernel's receive timestamp.
	RecvLag *latency `json:"recv_lag_us,omitempty"`
	// LatencyFromDue (open loop) is every request's latency counted from
	// its intended send time (the measure before 2026-12-03: latency plus
	// the send lag), for comparison; Total.Latency counts from the send.
	LatencyFromDue *latency `json:"latency_from_due_us,omitempty"`
	// SendCall (open loop) is how long each sendmmsg call took: a
	// datagram left at most that long after the stamp its latency counts
	// from.
	SendCall *latency `json:"send_call_us,omitempty"`
	// Burst (open loop) is how many requests each wake-up sent (in
	// requests, not µs): at a steady pace about rate × tick, more when
	// the thread woke late and caught up.
	Burst *latency `json:"burst,omitempty"`
	// WindowHeld (open loop) counts tickets sent late because the most
	// requests were in flight (their latency counts from their intended
	// time).
	WindowHeld uint64 `json:"window_held,omitempty"`
	// SendCalls (open loop) counts sendmmsg calls: Total.Sent/SendCalls
	// requests went out per wake-up.
	SendCalls uint64 `json:"send_calls,omitempty"`
	// CPU is the generator's own CPU time over the phase (the whole
	// process: every thread, the runtime included), so its cost per
	// request can be set against the server's on a shared machine.
	CPU       *cpuUse `json:"cpu,omitempty"`
	lag       *hist
	rlag      *hist
	dueLat    *hist
	call      *hist
	burst     *hist // requests a wake-up, recorded as µs
	ops       [numOps]opStats
	fallbacks [numOps][numOps]uint64
	tlStart   time.Time
	tlBucket  time.Duration
}

// cpuUse is CPU time spent by this process.
type cpuUse struct {
	UserSec float64 `json:"user_s"`
	SysSec  float64 `json:"sys_s"`
	// PerRequestUs is user+sys per request sent, in µs.
	PerRequestUs float64 `json:"us_per_request"`
}

// cpuNow is the process's user and system CPU time so far.
func cpuNow() (user, sys time.Duration) {
	var ru unix.Rusage
	if unix.Getrusage(unix.RUSAGE_SELF, &ru) != nil {
		return 0, 0
	}
	return time.Duration(ru.Utime.Nano()), time.Duration(ru.Stime.Nano())
}

// setCPU fills p.CPU from the CPU times taken at the phase's start; call
// after finish (it needs Total.Sent).
func (p *phase) setCPU(user0, sys0 time.Duration) {
	u, s := cpuNow()
	c := &cpuUse{UserSec: (u - user0).Seconds(), SysSec: (s - sys0).Seconds()}
	if p.Total.Sent > 0 {
		c.PerRequestUs = (c.UserSec + c.SysSec) * 1e6 / float64(p.Total.Sent)
	}
	p.CPU = c
}

// bucket is one slice of the measured phase's timeline.
type bucket struct {
	AtMs     int64   `json:"at_ms"` // intended send time, from the phase's start
	Sent     uint64  `json:"sent"`
	Lost     uint64  `json:"lost"`
	Over5ms  uint64  `json:"over_5ms"`
	MaxUs    float64 `json:"max_us"`
	maxNanos time.Duration
}

// note records one request in the timeline: sent at its intended time at,
// answered after d (lost: d < 0).
func (p *phase) note(at time.Time, d time.Duration) {
	if p.tlBucket <= 0 {
		return
	}
	i := int(max(at.Sub(p.tlStart), 0) / p.tlBucket)
	for len(p.Timeline) <= i {
		p.Timeline = append(p.Timeline, bucket{AtMs: int64(len(p.Timeline)) * p.tlBucket.Milliseconds()})
	}
	b := &p.Timeline[i]
	b.Sent++
	switch {
	case d < 0:
		b.Lost++
	default:
		if d > 5*time.Millisecond {
			b.Over5ms++
		}
		b.maxNanos = max(b.maxNanos, d)
	}
}

func (p *phase) merge(o *phase) {
	for i := range p.ops {
		p.ops[i].merge(&o.ops[i])
		for j := range p.fallbacks[i] {
			p.fallbacks[i][j] += o.fallbacks[i][j]
		}
	}
	p.Unmatched += o.Unmatched
	p.Announces += o.Announces
	if o.lag != nil {
		if p.lag == nil {
			p.lag = new(hist)
		}
		p.lag.merge(o.lag)
	}
	if o.rlag != nil {
		if p.rlag == nil {
			p.rlag = new(hist)
		}
		p.rlag.merge(o.rlag)
	}
	for len(p.Timeline) < len(o.Timeline) {
		p.Timeline = append(p.Timeline, bucket{AtMs: o.Timeline[len(p.Timeline)].AtMs})
	}
	for i, b := range o.Timeline {
		t := &p.Timeline[i]
		t.Sent += b.Sent
		t.Lost += b.Lost
		t.Over5ms += b.Over5ms
		t.maxNanos = max(t.maxNanos, b.maxNanos)
	}
}

func (p *phase) finish(elapsed time.Duration) {
	p.ElapsedSec = elapsed.Seconds()
	for i := range p.Timeline {
		p.Timeline[i].MaxUs = float64(p.Timeline[i].maxNanos) / 1e3
	}
	if p.lag != nil {
		l := p.lag.summary()
		p.SendLag = &l
	}
	if p.rlag != nil {
		l := p.rlag.summary()
		p.RecvLag = &l
	}
	for _, h := range []struct {
		h   *hist
		out **latency
	}{{p.dueLat, &p.LatencyFromDue}, {p.call, &p.SendCall}, {p.burst, &p.Burst}} {
		if h.h != nil && h.h.n > 0 {
			l := h.h.summary()
			*h.out = &l
		}
	}
	p.Ops = map[string]*opStats{}
	p.Fallbacks = map[string]uint64{}
	p.Total = opStats{}
	for i := range p.ops {
		s := &p.ops[i]
		if s.Sent == 0 {
			continue
		}
		p.Total.merge(s)
		s.finish(elapsed)
		p.Ops[op(i).String()] = s
		for j, c := range p.fallbacks[i] {
			if c > 0 {
				p.Fallbacks[op(i).String()+"->"+op(j).String()] = c
			}
		}
	}
	p.Total.finish(elapsed)
}

// report is the whole result of a run.
type report struct {
	Server      string  `json:"server"`
	Mode        string  `json:"mode"` // "closed" or "open"
	Concurrency int     `json:"concurrency"`
	Rate        float64 `json:"rate,omitempty"`
	Clients     int     `json:"clients"`
	Mix         string  `json:"mix"`
	Timeout     string  `json:"timeout"`
	Prefill     *phase  `json:"prefill,omitempty"`
	Run         *phase  `json:"run"`
	LiveLeases  int     `json:"live_leases"` // slots this run believes live at the end
	// LiveAtStart is the slots it believed live as the measured phase
	// began (after the prefill): with LiveLeases, the lease count a
	// run's figures were measured at (a growth from 0, or a steady
	// population).
	LiveAtStart int `json:"live_leases_at_start"`
}

// source is one simulated client: a UDP socket bound to its own address
// and connected to the server, so the kernel filters replies by address.
//
// Plain blocking reads (one thread per worker, SO_RCVTIMEO) were tried and
// measured 25-35 % slower than Go's netpoller here: the netpoller collects
// many replies per epoll_wait, where blocking reads pay a context switch
// each, and on 2 shared cores that decides.
type source struct {
	addr netip.Addr
	conn *net.UDPConn
}

// worker drives its own share of the clients with one request in flight
// at a time. Slots (client, port) of its clients are its alone, so its
// lease bookkeeping needs no locks.
type worker struct {
	cfg     *config
	id      int
	srcs    []source // clients g with g % workers == id
	unauth  []source
	nextUn  int
	rng     *rand.Rand
	workers int
	tag     uint32 // nonce prefix unique to this run

	// Slot s = port*len(srcs) + local source, so consecutive new MAPs
	// come from different clients.
	gen  []uint32 // per slot: bumped on delete, so a re-created lease gets a fresh nonce
	pos  []int32  // per slot: index in live, or -1
	live []uint32 // live slots
	free []uint32 // never-used or deleted slots, popped from the end
	seq  uint32   // for malformed/unauth nonces

	req  pcp.Request
	resp pcp.Response
	out  []byte
	in   []byte
}

const (
	nonceMalformed = 0xffffffff // nonce word 1 of malformed requests
	nonceUnauth    = 0xfffffffe // of unauthorised ones
)

var (
	errConfig = errors.New("bad configuration")
	errSocket = errors.New("socket")
)

func newWorker(cfg *config, id, workers int, tag uint32) *worker {
	w := &worker{cfg: cfg, id: id, workers: workers, tag: tag,
		rng: rand.New(rand.NewPCG(cfg.Seed, uint64(id)+1)),
		out: make([]byte, 0, 128), in: make([]byte, pcp.MaxMessageSize+4)}
	return w
}

// initSlots sets up lease bookkeeping once the sources are known.
func (w *worker) initSlots() {
	n := len(w.srcs) * w.cfg.Ports
	w.gen = make([]uint32, n)
	w.pos = make([]int32, n)
	w.free = make([]uint32, n)
	for i := range w.pos {
		w.pos[i] = -1
		w.free[i] = uint32(n - 1 - i) // pop yields 0, 1, 2, ...
	}
}

func (w *worker) slotSource(s uint32) int { return int(s) % len(w.srcs) }
func (w *worker) slotPort(s uint32) uint16 {
	return uint16(w.cfg.PortBase + int(s)/len(w.srcs))
}

// slotGlobal numbers slots across workers (client g = local*workers+id),
// for the nonce.
func (w *worker) slotGlobal(s uint32) uint32 {
	return uint32(w.slotSource(s)*w.workers+w.id)*uint32(w.cfg.Ports) + uint32(int(s)/len(w.srcs))
}

func (w *worker) setLive(s uint32) {
	if w.pos[s] >= 0 {
		return
	}
	w.pos[s] = int32(len(w.live))
	w.live = append(w.live, s)
}

func (w *worker) setFree(s uint32) {
	i := w.pos[s]
	if i < 0 {
		return
	}
	last := w.live[len(w.live)-1]
	w.live[i] = last
	w.pos[last] = i
	w.live = w.live[:len(w.live)-1]
	w.pos[s] = -1
	w.gen[s]++
	w.free = append(w.free, s)
}

// choose turns the mix's pick into something doable: renewing or deleting
// needs a live lease, a new MAP a free slot. It returns the op done and
// the slot (for new, renew, delete).
func (w *worker) choose(want op) (op, uint32) {
	o := want
	switch {
	case o == opNew && len(w.free) == 0 && len(w.live) > 0:
		o = opRenew
	case (o == opRenew || o == opDelete) && len(w.live) == 0 && len(w.free) > 0:
		o = opNew
	}
	switch o {
	case opNew:
		// A slot is in free only while not live: taken here, it returns
		// to free unless the server grants it (see do).
		s := w.free[len(w.free)-1]
		w.free = w.free[:len(w.free)-1]
		return o, s
	case opRenew, opDelete:
		return o, w.live[w.rng.IntN(len(w.live))]
	}
	return o, 0
}

func (w *worker) nonce(a, b uint32) pcp.Nonce {
	var n pcp.Nonce
	binary.BigEndian.PutUint32(n[0:4], w.tag)
	binary.BigEndian.PutUint32(n[4:8], a)
	binary.BigEndian.PutUint32(n[8:12], b)
	return n
}

// build writes the request for o into w.out and returns the socket to send
// it on.
func (w *worker) build(o op, slot uint32) *source {
	r := &w.req
	*r = pcp.Request{Opcode: pcp.OpMap, Lifetime: w.cfg.Lifetime}
	r.Map.Protocol = w.cfg.Protocol
	var src *source
	switch o {
	case opNew, opRenew, opDelete:
		src = &w.srcs[w.slotSource(slot)]
		r.Map.Nonce = w.nonce(w.slotGlobal(slot), w.gen[slot])
		r.Map.InternalPort = w.slotPort(slot)
		r.Map.ExternalPort = r.Map.InternalPort
		if o == opDelete {
			r.Lifetime = 0
		}
	case opUnauth:
		src = &w.unauth[w.nextUn]
		w.nextUn = (w.nextUn + 1) % len(w.unauth)
		w.seq++
		r.Map.Nonce = w.nonce(nonceUnauth, w.seq)
		r.Map.InternalPort = uint16(w.cfg.PortBase)
		r.Map.ExternalPort = r.Map.InternalPort
	case opMalformed:
		src = &w.srcs[w.rng.IntN(len(w.srcs))]
		w.seq++
		r.Map.Nonce = w.nonce(nonceMalformed, w.seq)
		r.Map.InternalPort = uint16(w.cfg.PortBase)
	}
	r.ClientAddr = src.addr
	r.Map.ExternalAddr = unspecified(src.addr)
	if o != opMalformed {
		w.out = pcp.AppendRequest(w.out[:0], r)
		return src
	}
	// Rotate through rejections that still carry the nonce at its MAP
	// offset, so the (copied) error reply can be matched.
	switch w.seq % 4 {
	case 0: // protocol 0 with a port: MALFORMED_REQUEST (PROTOCOL.md MAP-03)
		r.Map.Protocol = pcp.ProtoAll
		w.out = pcp.AppendRequest(w.out[:0], r)
	case 1: // length not a multiple of 4: MALFORMED_REQUEST (PKT-05)
		w.out = append(pcp.AppendRequest(w.out[:0], r), 0)
	case 2: // unknown mandatory option 4: UNSUPP_OPTION (OPT-03)
		w.out = append(pcp.AppendRequest(w.out[:0], r), 4, 0, 0, 4, 0, 0, 0, 0)
	case 3: // unassigned opcode 5: UNSUPP_OPCODE, payload copied (PKT-07)
		w.out = pcp.AppendRequest(w.out[:0], r)
		w.out[1] = 5
	}
	return src
}

// unspecified is the all-zeros suggested address of a's family (§11.1).
func unspecified(a netip.Addr) netip.Addr {
	if a.Is4() {
		return netip.IPv4Unspecified()
	}
	return netip.IPv6Unspecified()
}

// do sends one request and waits for its reply; start is when it counts
// from (the intended send time in the open loop, else zero = now).
func (w *worker) do(ph *phase, want op, start time.Time) {
	o, slot := w.choose(want)
	if o != want {
		ph.fallbacks[want][o]++
	}
	st := &ph.ops[o]
	if st.hist == nil {
		st.hist = new(hist)
	}
	src := w.build(o, slot)
	st.Sent++
	now := time.Now()
	// Open loop: the latency counts from the ticket's intended time (see
	// pace), so a generator or server that falls behind shows in the
	// percentiles; how late the generator itself sent is kept apart
	// (SendLag). It used to count from the actual send whenever the ticket
	// was late, which hid every queueing delay before the send.
	switch {
	case start.IsZero():
		start = now
	default:
		if ph.lag == nil {
			ph.lag = new(hist)
		}
		ph.lag.record(max(now.Sub(start), 0))
	}
	if _, err := src.conn.Write(w.out); err != nil {
		st.SendErrors++
		ph.note(start, -1)
		w.lost(o, slot)
		return
	}
	src.conn.SetReadDeadline(now.Add(w.cfg.Timeout))
	for {
		n, err := src.conn.Read(w.in)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				st.Timeouts++
			} else {
				// ICMP port unreachable (nobody listening) surfaces as
				// ECONNREFUSED on a connected socket: also a loss.
				st.SendErrors++
			}
			ph.note(start, -1)
			w.lost(o, slot)
			return
		}
		b := w.in[:n]
		if !w.matches(b) {
			if len(b) >= 2 && b[0] == pcp.Version && b[1] == 0x80|byte(pcp.OpAnnounce) {
				ph.Announces++
			} else {
				ph.Unmatched++ // a late reply to an earlier, timed-out request
			}
			continue
		}
		d := time.Since(start)
		st.hist.record(d)
		ph.note(start, d)
		st.Answered++
		res := w.classify(b)
		st.results[res]++
		ok := res == int(pcp.Success) || res == resEcho
		switch {
		case o == opNew && ok:
			w.setLive(slot)
		case o == opNew: // refused: the slot stays free
			w.free = append(w.free, slot)
		case o == opDelete:
			w.setFree(slot)
		}
		return
	}
}

// lost updates the bookkeeping for a request that got no reply: the
// server's state is unknown, so a new MAP's slot is tried again later
// (then as a renewal, if the server did install it) and a deleted lease
// is taken as gone.
func (w *worker) lost(o op, slot uint32) {
	switch o {
	case opNew:
		w.free = append(w.free, slot)
	case opDelete:
		w.setFree(slot)
	}
}

// matches reports whether b answers the request in w.out: same opcode and
// the same nonce (MAP replies copy it; error replies copy the request).
func (w *worker) matches(b []byte) bool {
	const nonceAt = pcp.HeaderSize
	if len(b) < nonceAt+12 || len(w.out) < nonceAt+12 {
		return false
	}
	return b[1]&0x7f == w.out[1]&0x7f && bytes.Equal(b[nonceAt:nonceAt+12], w.out[nonceAt:nonceAt+12])
}

func (w *worker) classify(b []byte) int {
	if bytes.Equal(b, w.out) {
		return resEcho
	}
	if err := pcp.ParseResponse(b, &w.resp); err != nil {
		return resUnparsed
	}
	return int(w.resp.Result)
}

// nthAddr returns the n-th address after p's own address.
func nthAddr(p netip.Prefix, n int) (netip.Addr, error) {
	return nthSubnetAddr(p, 0, n)
}

// nthSubnetAddr returns address 1 of the n-th /per subnet of p (n counts
// from 1, like nthAddr); per == 0 means plain addresses (nthAddr).
func nthSubnetAddr(p netip.Prefix, per, n int) (netip.Addr, error) {
	a := p.Masked().Addr()
	bits := a.BitLen()
	var hi, lo uint64 // the 128-bit offset to add
	switch {
	case per == 0:
		lo = uint64(n)
	case per < p.Bits() || per > bits:
		return netip.Addr{}, fmt.Errorf("pcpload: /%d subnets do not fit in %s: %w", per, p, errConfig)
	default:
		// (n-1) << (bits-per), plus 1 for the subnet's first host.
		shift := uint(bits - per)
		m := uint64(n - 1)
		switch {
		case shift >= 64:
			hi = m << (shift - 64)
		case shift == 0:
			lo = m
		default:
			hi, lo = m>>(64-shift), m<<shift
		}
		if per < bits {
			lo++ // never overflows: the low bits were zero
		}
	}
	if a.Is4() {
		lo += uint64(binary.BigEndian.Uint32(a.AsSlice()))
		if hi != 0 || lo > 0xffffffff {
			return netip.Addr{}, fmt.Errorf("pcpload: %s has fewer than %d addresses: %w", p, n, errConfig)
		}
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], uint32(lo))
		out := netip.AddrFrom4(b)
		if !p.Contains(out) {
			return netip.Addr{}, fmt.Errorf("pcpload: %s has fewer than %d addresses: %w", p, n, errConfig)
		}
		return out, nil
	}
	b := a.As16()
	ahi, alo := binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])
	nlo := alo + lo
	carry := uint64(0)
	if nlo < alo {
		carry = 1
	}
	nhi := ahi + hi + carry
	binary.BigEndian.PutUint64(b[:8], nhi)
	binary.BigEndian.PutUint64(b[8:], nlo)
	out := netip.AddrFrom16(b)
	if nhi < ahi || !p.Contains(out) {
		return netip.Addr{}, fmt.Errorf("pcpload: %s has fewer than %d addresses: %w", p, n, errConfig)
	}
	return out, nil
}

// freebind lets a socket bind an address that is not configured on any
// interface: a "local" route for the whole source prefix (ip route add
// local PFX dev lo) then delivers replies, and thousands of clients need
// no thousands of addresses.
func freebind(network, address string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		if network == "udp6" {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_FREEBIND, 1)
		} else {
			serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_FREEBIND, 1)
		}
	})
	if err != nil {
		return err
	}
	return serr
}

func dial(cfg *config, a netip.Addr) (source, error) {
	d := net.Dialer{LocalAddr: net.UDPAddrFromAddrPort(netip.AddrPortFrom(a, 0))}
	if cfg.Freebind {
		d.Control = freebind
	}
	c, err := d.Dial("udp", cfg.Server.String())
	if err != nil {
		return source{}, fmt.Errorf("pcpload: socket from %s: %w: %w", a, errSocket, err)
	}
	return source{addr: a, conn: c.(*net.UDPConn)}, nil
}

func (c *config) validate() error {
	switch {
	case !c.Server.IsValid():
		return fmt.Errorf("pcpload: --server is required: %w", errConfig)
	case !c.Src.IsValid():
		return fmt.Errorf("pcpload: --src is required: %w", errConfig)
	case c.Src.Addr().Is4() != c.Server.Addr().Unmap().Is4():
		return fmt.Errorf("pcpload: --src %s and --server %s are of different families: %w", c.Src, c.Server, errConfig)
	case c.Concurrency < 1:
		return fmt.Errorf("pcpload: --concurrency must be >= 1: %w", errConfig)
	case c.Clients < c.Concurrency:
		return fmt.Errorf("pcpload: --clients (%d) must be >= --concurrency (%d): each worker owns its clients: %w", c.Clients, c.Concurrency, errConfig)
	case c.Ports < 1 || c.PortBase < 1 || c.PortBase+c.Ports > 65536:
		return fmt.Errorf("pcpload: ports %d..%d out of range: %w", c.PortBase, c.PortBase+c.Ports-1, errConfig)
	case c.Duration <= 0 && c.Count <= 0:
		return fmt.Errorf("pcpload: give --duration or --count: %w", errConfig)
	case c.Timeout <= 0:
		return fmt.Errorf("pcpload: --timeout must be > 0: %w", errConfig)
	case c.Rate < 0:
		return fmt.Errorf("pcpload: --rate must be >= 0: %w", errConfig)
	case c.Mix[opUnauth] > 0 && !c.UnauthSrc.IsValid():
		return fmt.Errorf("pcpload: unauth in --mix needs --unauth-src: %w", errConfig)
	case int64(c.Clients)*int64(c.Ports) > 1<<26:
		return fmt.Errorf("pcpload: --clients x --ports exceeds %d slots: %w", 1<<26, errConfig)
	case c.Prefill > c.Clients*c.Ports:
		return fmt.Errorf("pcpload: --prefill %d exceeds the %d slots (--clients x --ports): %w", c.Prefill, c.Clients*c.Ports, errConfig)
	}
	return nil
}

// dialSources dials n sources, the first n addresses of src's subnets,
// dealt to ws in turn: source g goes to *list(ws[g%len(ws)]).
func dialSources(cfg *config, src netip.Prefix, n int, ws []*worker, list func(*worker) *[]source) error {
	for g := range n {
		a, err := nthSubnetAddr(src, cfg.PerPrefix, g+1)
		if err != nil {
			return err
		}
		s, err := dial(cfg, a)
		if err != nil {
			return err
		}
		l := list(ws[g%len(ws)])
		*l = append(*l, s)
	}
	return nil
}

// run opens the sockets, runs the prefill, then the measured phase.
func run(ctx context.Context, cfg config) (*report, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	nw := cfg.Concurrency
	tag := rand.Uint32()
	ws := make([]*worker, nw)
	for i := range ws {
		ws[i] = newWorker(&cfg, i, nw, tag)
	}
	defer func() {
		for _, w := range ws {
			for _, s := range w.srcs {
				s.conn.Close()
			}
			for _, s := range w.unauth {
				s.conn.Close()
			}
		}
	}()
	if err := dialSources(&cfg, cfg.Src, cfg.Clients, ws, func(w *worker) *[]source { return &w.srcs }); err != nil {
		return nil, err
	}
	if cfg.UnauthSrc.IsValid() {
		n := cfg.UnauthClients
		if n == 0 {
			n = cfg.Clients
		}
		if err := dialSources(&cfg, cfg.UnauthSrc, max(n, nw), ws, func(w *worker) *[]source { return &w.unauth }); err != nil {
			return nil, err
		}
	}
	for _, w := range ws {
		w.initSlots()
	}
	if err := probe(ctx, &cfg, &ws[0].srcs[0]); err != nil {
		return nil, err
	}
	rep := &report{
		Server: cfg.Server.String(), Mode: "closed", Concurrency: nw, Clients: cfg.Clients,
		Mix: cfg.Mix.String(), Timeout: cfg.Timeout.String(),
	}
	if cfg.Rate > 0 {
		rep.Mode, rep.Rate = "open", cfg.Rate
	}

	if cfg.Prefill > 0 {
		ph := runPhase(ws, 0, func(w *worker, ph *phase) {
			n := cfg.Prefill / nw
			if w.id < cfg.Prefill%nw {
				n++
			}
			for range n {
				if ctx.Err() != nil {
					return
				}
				w.do(ph, opNew, time.Time{})
			}
		})
		rep.Prefill = ph
	}

	for _, w := range ws {
		rep.LiveAtStart += len(w.live)
	}
	if cfg.OnMeasure != nil {
		cfg.OnMeasure()
	}
	var issued atomic.Int64
	var stop atomic.Bool
	if cfg.Duration > 0 {
		t := time.AfterFunc(cfg.Duration, func() { stop.Store(true) })
		defer t.Stop()
	}
	go func() { <-ctx.Done(); stop.Store(true) }()
	total := cfg.Mix.total()
	if cfg.Rate == 0 {
		rep.Run = runPhase(ws, cfg.Timeline, func(w *worker, ph *phase) {
			for !stop.Load() && (cfg.Count <= 0 || issued.Add(1) <= cfg.Count) {
				w.do(ph, cfg.Mix.pick(w.rng.IntN(total)), time.Time{})
			}
		})
	} else {
		l, err := newOpenLoop(&cfg, ws)
		if err != nil {
			return nil, fmt.Errorf("pcpload: open loop: %w: %w", errSocket, err)
		}
		rep.Run = l.run(&stop, cfg.Timeline)
	}
	for _, w := range ws {
		rep.LiveLeases += len(w.live)
	}
	return rep, nil
}

// probe sends ANNOUNCE every 500 ms until something answers, so the first
// measured requests do not pay for neighbour discovery, and a server that
// is not there is an error, not a run of timeouts.
func probe(ctx context.Context, cfg *config, src *source) error {
	req := pcp.Request{Opcode: pcp.OpAnnounce, ClientAddr: src.addr}
	out := pcp.AppendRequest(nil, &req)
	in := make([]byte, pcp.MaxMessageSize+4)
	wait := cfg.ProbeTimeout
	if wait <= 0 {
		wait = 5 * time.Second
	}
	for t0 := time.Now(); time.Since(t0) < wait; {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if _, err := src.conn.Write(out); err != nil {
			time.Sleep(500 * time.Millisecond)
			continue
		}
		src.conn.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		if _, err := src.conn.Read(in); err == nil {
			return nil
		}
	}
	return fmt.Errorf("pcpload: no reply from %s to ANNOUNCE from %s in %s: %w", cfg.Server, src.addr, wait, errSocket)
}

// runPhase runs body on every worker at once and merges their counts;
// timeline > 0 also keeps a timeline in buckets that long.
func runPhase(ws []*worker, timeline time.Duration, body func(*worker, *phase)) *phase {
	parts := make([]phase, len(ws))
	var wg sync.WaitGroup
	u0, s0 := cpuNow()
	t0 := time.Now()
	for i := range parts {
		parts[i].tlStart, parts[i].tlBucket = t0, timeline
	}
	for i, w := range ws {
		wg.Add(1)
		go func() {
			defer wg.Done()
			body(w, &parts[i])
		}()
	}
	wg.Wait()
	elapsed := time.Since(t0)
	ph := phase{Start: t0}
	for i := range parts {
		ph.merge(&parts[i])
	}
	ph.finish(elapsed)
	ph.setCPU(u0, s0)
	return &ph
}
