package main

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"runtime"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/pcp"
)

// The open loop (--rate) runs on one locked OS thread and one socket.
// Each round it
//
//   - reads every reply queued (recvmmsg, up to 64 a call, MSG_DONTWAIT),
//     each with the kernel's time of arrival (SO_TIMESTAMPNS);
//   - hands every request due by now to the kernel in one sendmmsg, each
//     with its client's source address in an IPV6_PKTINFO / IP_PKTINFO
//     message (with IP(V6)_FREEBIND, as the clients' own sockets bind
//     them); the socket is bound to the wildcard address, and the
//     clients' addresses are local, so replies to any of them come back
//     to it;
//   - sleeps with nanosleep (timer slack 1 µs) to the next request's time,
//     but no sooner than --tick after the last send, so at high rates one
//     wake-up carries several requests and reads several replies.
//
// A request's latency runs from when it left the generator (the clock
// read immediately before the sendmmsg call that carried it) to the
// kernel's receive timestamp of its reply: what the server and the
// network took, not the generator's own delays on either side. Those are
// reported apart: how late the request went out after its intended time
// (its ticket; at least the wait for the next tick, plus however long the
// thread waited for a CPU) is SendLag, and how long a reply waited to be
// read is RecvLag. A ticket that waited because --concurrency requests
// were in flight waited for the server, not for the generator: its
// latency counts from its intended time (no coordinated omission; see
// inflight.latency). The old measure, every request from its intended
// time, is kept as LatencyFromDue; SendCall bounds how far "immediately
// before the call" can be from the datagram's actual departure (the
// kernel may reschedule inside a sendmmsg between datagrams).
//
// Before this, the sender thread woke once per request for one write(2)
// on its client's connected socket, and a receiver thread once per reply
// from an epoll set over 4096 sockets for one recvfrom: 32-39 µs of
// pcpload CPU a request at 20 000-25 000/s, twice the closed loop's
// 16 µs, on the same two cores as the server (BENCHMARKS.md, open loop).
type openLoop struct {
	cfg      *config
	ws       []*worker
	base     time.Time // the phase's start; every instant below is ns since base
	baseUnix int64     // base as Unix ns, for the kernel's receive timestamps
	ph       *phase
	slots    []inflight // at most cfg.Concurrency requests in flight
	idle     []int32    // indices of free slots
	// pidx maps a worker's lease slot to its in-flight entry (or -1), so
	// a reply, which names the slot by its nonce, finds its request.
	pidx  [][]int32
	fd    int // the socket every request goes out on and every reply comes in on
	v4    bool
	count uint64 // sequence of requests, for the in-flight entries' stamps
	// fullAt is when the loop last found --concurrency requests in
	// flight (-1: never): every ticket due by then was held back by the
	// server's slowness, not by the generator.
	fullAt int64
}

// inflight is one request awaiting its reply.
type inflight struct {
	stamp  uint64 // 0: free
	worker int32
	slot   uint32 // lease slot (new, renew, delete); unused otherwise
	op     op
	opcode byte  // of the request, which the reply repeats
	held   bool  // the ticket waited for a free in-flight entry
	due    int64 // intended send time
	sent   int64 // actual send time (just before its sendmmsg); the timeout counts from it
}

// latency is the request's latency if its reply arrived at at, and the
// old measure, from its intended time. The latency counts from the send,
// except for a ticket held back because the most requests were in
// flight: that wait was the server's (its replies were late), so it
// counts from the intended time, as a client that had to wait would see
// it. Negative spans (a clock step) count as 0.
func (e *inflight) latency(at int64) (d, fromDue time.Duration) {
	from := e.sent
	if e.held {
		from = e.due
	}
	return time.Duration(max(at-from, 0)), time.Duration(max(at-e.due, 0))
}

// openNonceIdx marks the nonce of a malformed or unauthorised request in
// the open loop: its word 2 is the in-flight index | stamp<<16, since such
// requests have no lease slot to be found by.
const openIdxBits = 16

const (
	openBatch   = 64 // datagrams per sendmmsg / recvmmsg
	openMsgSize = pcp.MaxMessageSize + 4
	openCtlSize = 64 // room for one PKTINFO (send) or one timestamp (receive)
	// defaultTick is the open loop's shortest time between two sends:
	// at 25 000/s, 5 requests a wake-up instead of 1.
	defaultTick = 200 * time.Microsecond
)

func newOpenLoop(cfg *config, ws []*worker) (*openLoop, error) {
	l := &openLoop{cfg: cfg, ws: ws, ph: &phase{}, fullAt: -1}
	n := min(cfg.Concurrency, 1<<openIdxBits)
	l.slots = make([]inflight, n)
	l.idle = make([]int32, n)
	for i := range l.idle {
		l.idle[i] = int32(n - 1 - i)
	}
	l.pidx = make([][]int32, len(ws))
	for i, w := range ws {
		p := make([]int32, len(w.gen))
		for j := range p {
			p[j] = -1
		}
		l.pidx[i] = p
	}
	for o := range l.ph.ops {
		l.ph.ops[o].hist = new(hist)
	}
	l.ph.lag = new(hist)
	l.ph.rlag = new(hist)
	l.ph.dueLat = new(hist)
	l.ph.call = new(hist)
	l.ph.burst = new(hist)
	l.v4 = cfg.Server.Addr().Unmap().Is4()
	var err error
	if l.fd, err = openSocket(l.v4); err != nil {
		return nil, err
	}
	return l, nil
}

// openSocket opens the open loop's socket: bound to the wildcard address
// (a port of its own), sources set per datagram, receive timestamps on.
func openSocket(v4 bool) (int, error) {
	family, level, freebind := unix.AF_INET6, unix.IPPROTO_IPV6, unix.IPV6_FREEBIND
	var sa unix.Sockaddr = &unix.SockaddrInet6{}
	if v4 {
		family, level, freebind = unix.AF_INET, unix.IPPROTO_IP, unix.IP_FREEBIND
		sa = &unix.SockaddrInet4{}
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	fail := func(what string, err error) (int, error) {
		unix.Close(fd)
		return -1, fmt.Errorf("%s: %w", what, err)
	}
	if err := unix.SetsockoptInt(fd, level, freebind, 1); err != nil {
		return fail("freebind", err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TIMESTAMPNS, 1); err != nil {
		return fail("SO_TIMESTAMPNS", err)
	}
	// One socket now queues what 4096 did: room for every request in
	// flight and then some (FORCE passes rmem_max as root).
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 4<<20) != nil {
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
	}
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, 4<<20) != nil {
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 4<<20)
	}
	if err := unix.Bind(fd, sa); err != nil {
		return fail("bind", err)
	}
	return fd, nil
}

func (l *openLoop) now() int64 { return int64(time.Since(l.base)) }

// run sends at cfg.Rate until stop (or cfg.Count), waits for the requests
// still in flight (at most cfg.Timeout) and returns the phase.
func (l *openLoop) run(stop *atomic.Bool, timeline time.Duration) *phase {
	defer unix.Close(l.fd)
	// The loop's thread spends most of its time in nanosleep, holding a
	// P. With no P idle, sysmon takes the P of a thread whose system call
	// lasts over 20 µs (polling every 20 µs to see), and each return from
	// a sleep then wins a P back through the scheduler: a quarter of
	// pcpload's CPU in a profile at 20 000/s. A spare P keeps sysmon from
	// doing so (it leaves a thread in a system call alone while a P sits
	// idle, and backs off to 10 ms).
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(runtime.GOMAXPROCS(0) + 1))
	u0, s0 := cpuNow()
	l.base = time.Now()
	l.baseUnix = l.base.UnixNano()
	l.ph.Start, l.ph.tlStart, l.ph.tlBucket = l.base, l.base, timeline
	l.loop(stop)
	elapsed := time.Since(l.base)
	l.ph.finish(elapsed)
	l.ph.setCPU(u0, s0)
	return l.ph
}

// sendBuf is the sender's batch: one datagram, its address and its
// source per entry, allocated once.
type sendBuf struct {
	hdrs   [openBatch]unix.Mmsghdr
	iovs   [openBatch]unix.Iovec
	data   [openBatch][openMsgSize]byte
	ctl    [openBatch][openCtlSize]byte
	idx    [openBatch]int32  // in-flight entry of each datagram
	stamps [openBatch]uint64 // and its stamp, to tell a reused entry
	ops    [openBatch]op
	name   unix.RawSockaddrInet6 // the server (an Inet4 for IPv4)
}

func (l *openLoop) newSendBuf() *sendBuf {
	b := new(sendBuf)
	a := l.cfg.Server
	namelen := uint32(unix.SizeofSockaddrInet6)
	if l.v4 {
		sa := (*unix.RawSockaddrInet4)(unsafe.Pointer(&b.name))
		sa.Family = unix.AF_INET
		sa.Addr = a.Addr().Unmap().As4()
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&sa.Port))[:], a.Port())
		namelen = unix.SizeofSockaddrInet4
	} else {
		b.name.Family = unix.AF_INET6
		b.name.Addr = a.Addr().As16()
		binary.BigEndian.PutUint16((*[2]byte)(unsafe.Pointer(&b.name.Port))[:], a.Port())
	}
	for i := range b.hdrs {
		h := &b.hdrs[i].Hdr
		h.Name = (*byte)(unsafe.Pointer(&b.name))
		h.Namelen = namelen
		h.Iov = &b.iovs[i]
		h.SetIovlen(1)
		h.Control = &b.ctl[i][0]
		b.iovs[i].Base = &b.data[i][0]
	}
	return b
}

// setSource writes datagram k's source address (a PKTINFO message).
func (l *openLoop) setSource(b *sendBuf, k int, a netip.Addr) {
	c := b.ctl[k][:]
	h := (*unix.Cmsghdr)(unsafe.Pointer(&c[0]))
	if l.v4 {
		h.Level, h.Type = unix.IPPROTO_IP, unix.IP_PKTINFO
		h.SetLen(unix.CmsgLen(unix.SizeofInet4Pktinfo))
		p := (*unix.Inet4Pktinfo)(unsafe.Pointer(&c[unix.CmsgLen(0)]))
		*p = unix.Inet4Pktinfo{Spec_dst: a.Unmap().As4()}
		b.hdrs[k].Hdr.SetControllen(unix.CmsgSpace(unix.SizeofInet4Pktinfo))
		return
	}
	h.Level, h.Type = unix.IPPROTO_IPV6, unix.IPV6_PKTINFO
	h.SetLen(unix.CmsgLen(unix.SizeofInet6Pktinfo))
	p := (*unix.Inet6Pktinfo)(unsafe.Pointer(&c[unix.CmsgLen(0)]))
	*p = unix.Inet6Pktinfo{Addr: a.As16()}
	b.hdrs[k].Hdr.SetControllen(unix.CmsgSpace(unix.SizeofInet6Pktinfo))
}

// loop is the open loop's thread.
func (l *openLoop) loop(stop *atomic.Bool) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	// Sleeps end within a few µs of the asked time instead of the default
	// 50 µs slack (this thread only).
	unix.Prctl(unix.PR_SET_TIMERSLACK, 1000, 0, 0, 0)
	cfg := l.cfg
	interval := float64(time.Second) / cfg.Rate
	tick := int64(cfg.Tick)
	if tick <= 0 {
		tick = int64(defaultTick)
	}
	sb, rb := l.newSendBuf(), newRecvBuf()
	var next int64 // tickets issued
	var lastSweep, lastSend int64
	for cfg.Count <= 0 || next < cfg.Count {
		if stop.Load() {
			break
		}
		l.receive(rb)
		now := l.now()
		if now-lastSweep >= int64(5*time.Millisecond) {
			l.sweep(now)
			lastSweep = now
			// A goroutine that never passes through the scheduler looks
			// to sysmon like one running for over 10 ms: it then takes
			// the P at every system call and polls every 20 µs to do
			// it again (18 % of pcpload's CPU in a profile at
			// 20 000/s). A yield now and then resets that clock.
			runtime.Gosched()
		}
		// The next wake-up: the next ticket's time, but no sooner than a
		// tick after the last send (the tickets due by then go together).
		due := int64(float64(next) * interval)
		wake := max(due, lastSend+tick)
		if wake > now {
			// Wake for the sweep at least every 5 ms (or every tick, if
			// longer).
			sleepNs(min(wake-now, max(int64(5*time.Millisecond), tick)))
			continue
		}
		lastSend = now
		// Every ticket due by now goes out, round robin over the workers
		// (each owns its clients' lease slots), up to openBatch a call.
		burst := next
		for due <= now && (cfg.Count <= 0 || next < cfg.Count) {
			k, full := l.fill(sb, &next, now, interval)
			l.flush(sb, k)
			if full {
				l.fullAt = now
				l.ph.burst.record(time.Duration(next-burst) * time.Microsecond)
				// Concurrency requests in flight: the tickets wait (and
				// their wait is latency); look again shortly.
				sleepNs(int64(20 * time.Microsecond))
				burst = -1
				break
			}
			due = int64(float64(next) * interval)
		}
		if burst >= 0 {
			l.ph.burst.record(time.Duration(next-burst) * time.Microsecond)
		}
	}
	// Wait for the replies still due, as the closed loop's workers do.
	deadline := l.now() + int64(cfg.Timeout) + int64(10*time.Millisecond)
	for l.now() < deadline {
		l.receive(rb)
		if len(l.idle) == len(l.slots) {
			return
		}
		l.sweep(l.now())
		sleepNs(int64(tick))
	}
	l.receive(rb)
	l.sweep(int64(1) << 62)
}

// fill builds up to openBatch requests for the tickets from *next that
// are due by now into b, registering each in flight, and returns how
// many; full reports that the most requests are in flight.
func (l *openLoop) fill(b *sendBuf, next *int64, now int64, interval float64) (k int, full bool) {
	cfg := l.cfg
	total := cfg.Mix.total()
	ph := l.ph
	for k < openBatch && (cfg.Count <= 0 || *next < cfg.Count) {
		due := int64(float64(*next) * interval)
		if due > now {
			break
		}
		if len(l.idle) == 0 {
			return k, true
		}
		w := l.ws[*next%int64(len(l.ws))]
		want := cfg.Mix.pick(w.rng.IntN(total))
		o, slot := w.choose(want)
		if (o == opRenew || o == opDelete) && l.pidx[w.id][slot] >= 0 {
			// That lease has a request in flight already; a second one
			// would race it. Another live slot, or a new MAP if there is
			// none.
			o, slot = l.otherLive(w)
		}
		if o != want {
			ph.fallbacks[want][o]++
		}
		src := w.build(o, slot)
		l.count++
		i := l.idle[len(l.idle)-1]
		l.idle = l.idle[:len(l.idle)-1]
		// sent is set again by flush, just before the call that sends it.
		l.slots[i] = inflight{stamp: l.count, worker: int32(w.id), slot: slot, op: o, opcode: w.out[1], due: due, sent: now, held: due <= l.fullAt}
		if due <= l.fullAt {
			ph.WindowHeld++
		}
		switch o {
		case opNew, opRenew, opDelete:
			l.pidx[w.id][slot] = i
		default:
			binary.BigEndian.PutUint32(w.out[pcp.HeaderSize+8:], uint32(i)|uint32(l.count)<<openIdxBits)
		}
		ph.ops[o].Sent++
		ph.lag.record(time.Duration(max(now-due, 0)))
		b.iovs[k].SetLen(copy(b.data[k][:], w.out))
		l.setSource(b, k, src.addr)
		b.idx[k], b.stamps[k], b.ops[k] = i, l.count, o
		k++
		*next++
	}
	return k, false
}

// flush sends the k datagrams of b; one the kernel refuses is a send
// error (and its request no longer in flight), the rest still go.
func (l *openLoop) flush(b *sendBuf, k int) {
	for off := 0; off < k; {
		l.ph.SendCalls++
		t0 := l.now()
		n, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, uintptr(l.fd), uintptr(unsafe.Pointer(&b.hdrs[off])), uintptr(k-off), 0, 0, 0)
		l.ph.call.record(time.Duration(l.now() - t0))
		if errno == 0 {
			l.stampSent(b, off, int(n), t0)
		}
		switch {
		case errno == unix.EINTR:
			continue
		case errno != 0:
			if i := b.idx[off]; l.slots[i].stamp == b.stamps[off] {
				l.ph.ops[b.ops[off]].SendErrors++
				l.finish(i, -1)
			}
			off++
		default:
			off += max(int(n), 1)
		}
	}
}

// stampSent records t, read just before the sendmmsg call, as the send
// time of the n datagrams of b from off that the call sent (an entry
// reused since, which a stamp mismatch tells, is left alone).
func (l *openLoop) stampSent(b *sendBuf, off, n int, t int64) {
	for j := off; j < min(off+n, len(b.idx)); j++ {
		if e := &l.slots[b.idx[j]]; e.stamp == b.stamps[j] {
			e.sent = t
		}
	}
}

// otherLive picks a live slot of w with no request in flight (a few
// tries), else falls back to a new MAP (or, with no free slot, keeps the
// busy one: the server then sees two requests for one lease).
func (l *openLoop) otherLive(w *worker) (op, uint32) {
	for range 8 {
		s := w.live[w.rng.IntN(len(w.live))]
		if l.pidx[w.id][s] < 0 {
			return opRenew, s
		}
	}
	if len(w.free) > 0 {
		return w.choose(opNew)
	}
	return opRenew, w.live[w.rng.IntN(len(w.live))]
}

// finish releases in-flight entry i, answered after d (lost: d < 0), and
// updates the lease bookkeeping as the closed loop's worker.do does.
func (l *openLoop) finish(i int32, d time.Duration) {
	e := &l.slots[i]
	w := l.ws[e.worker]
	l.ph.note(l.base.Add(time.Duration(e.due)), d)
	switch e.op {
	case opNew, opRenew, opDelete:
		if l.pidx[w.id][e.slot] == i {
			l.pidx[w.id][e.slot] = -1
		}
		if d < 0 {
			w.lost(e.op, e.slot)
		}
	}
	e.stamp = 0
	l.idle = append(l.idle, i)
}

// sweep counts requests sent more than cfg.Timeout before now as lost.
func (l *openLoop) sweep(now int64) {
	limit := int64(l.cfg.Timeout)
	for i := range l.slots {
		e := &l.slots[i]
		if e.stamp != 0 && now-e.sent > limit {
			l.ph.ops[e.op].Timeouts++
			l.finish(int32(i), -1)
		}
	}
}

// recvBuf is the receiving side's batch, allocated once.
type recvBuf struct {
	hdrs [openBatch]unix.Mmsghdr
	iovs [openBatch]unix.Iovec
	data [openBatch][openMsgSize]byte
	ctl  [openBatch][openCtlSize]byte
	resp pcp.Response
}

func newRecvBuf() *recvBuf {
	b := new(recvBuf)
	for i := range b.hdrs {
		b.hdrs[i].Hdr.Iov = &b.iovs[i]
		b.hdrs[i].Hdr.SetIovlen(1)
		b.hdrs[i].Hdr.Control = &b.ctl[i][0]
		b.iovs[i].Base = &b.data[i][0]
	}
	return b
}

// receive reads every reply queued, each stamped with its arrival.
func (l *openLoop) receive(b *recvBuf) {
	for {
		for i := range b.hdrs {
			b.iovs[i].SetLen(openMsgSize)
			b.hdrs[i].Hdr.SetControllen(openCtlSize)
			b.hdrs[i].Hdr.Flags = 0
		}
		r, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, uintptr(l.fd), uintptr(unsafe.Pointer(&b.hdrs[0])), openBatch, unix.MSG_DONTWAIT, 0, 0)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 || r == 0 {
			return // EAGAIN: nothing more queued
		}
		user := l.now()
		n := int(r)
		for k := range n {
			at := user
			if t, ok := rxStamp(b.ctl[k][:b.hdrs[k].Hdr.Controllen]); ok {
				// The kernel's clock is the wall clock; base was read from
				// both. A stamp after the read (a clock step) is not used.
				if a := t - l.baseUnix; a > 0 && a <= user {
					at = a
				}
			}
			l.reply(b.data[k][:b.hdrs[k].Len], at, user, &b.resp)
		}
		if n < openBatch {
			return
		}
	}
}

// rxStamp returns the SCM_TIMESTAMPNS receive time (Unix ns) in the
// control messages c.
func rxStamp(c []byte) (int64, bool) {
	hl := unix.CmsgLen(0)
	for len(c) >= hl {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&c[0]))
		if int(h.Len) < hl || int(h.Len) > len(c) {
			return 0, false
		}
		if h.Level == unix.SOL_SOCKET && h.Type == unix.SCM_TIMESTAMPNS && int(h.Len) >= hl+int(unsafe.Sizeof(unix.Timespec{})) {
			ts := (*unix.Timespec)(unsafe.Pointer(&c[hl]))
			return ts.Nano(), true
		}
		c = c[min(unix.CmsgSpace(int(h.Len)-hl), len(c)):]
	}
	return 0, false
}

// reply matches one datagram with its request by the nonce and records
// it.
//
// at is the reply's arrival (the kernel's stamp), user when the loop
// read it.
func (l *openLoop) reply(b []byte, at, user int64, resp *pcp.Response) {
	const nonceAt = pcp.HeaderSize
	ph := l.ph
	if len(b) < nonceAt+12 {
		ph.Unmatched++
		return
	}
	if b[1] == 0x80|byte(pcp.OpAnnounce) {
		ph.Announces++
		return
	}
	w1 := binary.BigEndian.Uint32(b[nonceAt+4:])
	w2 := binary.BigEndian.Uint32(b[nonceAt+8:])
	i := int32(-1)
	var w *worker
	switch w1 {
	case nonceMalformed, nonceUnauth:
		j := int32(w2 & (1<<openIdxBits - 1))
		if int(j) < len(l.slots) && uint32(l.slots[j].stamp)<<openIdxBits == w2&^(1<<openIdxBits-1) && l.slots[j].stamp != 0 {
			i = j
		}
	default:
		g := w1 / uint32(l.cfg.Ports)
		wid := int(g % uint32(len(l.ws)))
		w = l.ws[wid]
		local := int(g / uint32(len(l.ws)))
		if local < len(w.srcs) {
			slot := uint32(int(w1%uint32(l.cfg.Ports))*len(w.srcs) + local)
			if int(slot) < len(l.pidx[wid]) && w.gen[slot] == w2 {
				i = l.pidx[wid][slot]
			}
		}
	}
	if i < 0 || l.slots[i].opcode&0x7f != b[1]&0x7f || binary.BigEndian.Uint32(b[nonceAt:]) != l.ws[0].tag {
		ph.Unmatched++ // a late reply to a request already timed out
		return
	}
	e := &l.slots[i]
	w = l.ws[e.worker]
	d, fromDue := e.latency(at)
	ph.rlag.record(time.Duration(user - at))
	ph.dueLat.record(fromDue)
	st := &ph.ops[e.op]
	st.hist.record(d)
	st.Answered++
	res := resEcho // a server never answers with the R bit clear: the floor
	if b[1]&0x80 != 0 {
		res = resUnparsed
		if pcp.ParseResponse(b, resp) == nil {
			res = int(resp.Result)
		}
	}
	st.results[res]++
	ok := res == int(pcp.Success) || res == resEcho
	o, slot := e.op, e.slot
	l.finish(i, d)
	switch {
	case o == opNew && ok:
		w.setLive(slot)
	case o == opNew:
		w.free = append(w.free, slot)
	case o == opDelete:
		w.setFree(slot)
	}
}

// sleepNs sleeps d nanoseconds on this thread (nanosleep: precise with
// the timer slack the loop sets, unlike a Go timer).
func sleepNs(d int64) {
	if d <= 0 {
		return
	}
	ts := unix.NsecToTimespec(d)
	unix.Nanosleep(&ts, nil)
}
