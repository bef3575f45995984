package main

import (
	"encoding/binary"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/pcp"
)

// The open loop (--rate) is driven by two OS threads instead of one
// goroutine per worker:
//
//   - the sender sleeps to each batch's intended time with nanosleep
//     (timer slack 1 µs), then writes every request that is due on the
//     raw socket of its client;
//   - the receiver waits on one epoll set over every client socket and
//     reads each reply as it comes.
//
// The goroutine-per-worker loop (a pacer handing tickets over a channel
// to 256 workers, each parked in the netpoller) sent its requests 0.3 ms
// late at the median and 1–3 ms at p99 on the 2-core bench machine at
// 23 000/s, and every hand-over was a goroutine wake-up competing with
// the server under test for the same two cores. Latency still counts from
// the intended send time, so whatever the generator adds stays in the
// figures; SendLag reports the generator's own share.
//
// Both threads share the workers' lease bookkeeping, the in-flight table
// and the statistics under one mutex; neither system call runs under it.
type openLoop struct {
	cfg   *config
	ws    []*worker
	base  time.Time // the phase's start; every instant below is ns since base
	ph    *phase
	mu    sync.Mutex
	slots []inflight // at most cfg.Concurrency requests in flight
	idle  []int32    // indices of free slots
	// pidx maps a worker's lease slot to its in-flight entry (or -1), so
	// a reply, which names the slot by its nonce, finds its request.
	pidx  [][]int32
	epfd  int
	stop  atomic.Bool
	count uint64 // sequence of requests, for the in-flight entries' stamps
}

// inflight is one request awaiting its reply.
type inflight struct {
	stamp  uint64 // 0: free
	worker int32
	slot   uint32 // lease slot (new, renew, delete); unused otherwise
	op     op
	opcode byte  // of the request, which the reply repeats
	due    int64 // intended send time
	sent   int64 // actual send time; the timeout counts from it
}

// openNonceIdx marks the nonce of a malformed or unauthorised request in
// the open loop: its word 2 is the in-flight index | stamp<<16, since such
// requests have no lease slot to be found by.
const openIdxBits = 16

func newOpenLoop(cfg *config, ws []*worker) (*openLoop, error) {
	l := &openLoop{cfg: cfg, ws: ws, ph: &phase{}}
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
	var err error
	if l.epfd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC); err != nil {
		return nil, err
	}
	for _, w := range ws {
		for _, group := range [][]source{w.srcs, w.unauth} {
			for i := range group {
				fd, err := rawFD(group[i].conn)
				if err != nil {
					unix.Close(l.epfd)
					return nil, err
				}
				group[i].fd = fd
				ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(fd)}
				if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
					unix.Close(l.epfd)
					return nil, err
				}
			}
		}
	}
	return l, nil
}

func (l *openLoop) now() int64 { return int64(time.Since(l.base)) }

// run sends at cfg.Rate until stop (or cfg.Count), waits for the requests
// still in flight (at most cfg.Timeout) and returns the phase.
func (l *openLoop) run(stop *atomic.Bool, timeline time.Duration) *phase {
	defer unix.Close(l.epfd)
	u0, s0 := cpuNow()
	l.base = time.Now()
	l.ph.Start, l.ph.tlStart, l.ph.tlBucket = l.base, l.base, timeline
	done := make(chan struct{})
	go func() { defer close(done); l.receive() }()
	l.send(stop)
	l.stop.Store(true)
	<-done
	elapsed := time.Since(l.base)
	l.ph.finish(elapsed)
	l.ph.setCPU(u0, s0)
	return l.ph
}

// send is the sender thread.
func (l *openLoop) send(stop *atomic.Bool) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	// Sleeps end within a few µs of the asked time instead of the default
	// 50 µs slack (this thread only).
	unix.Prctl(unix.PR_SET_TIMERSLACK, 1000, 0, 0, 0)
	cfg := l.cfg
	interval := float64(time.Second) / cfg.Rate
	total := cfg.Mix.total()
	var next int64 // tickets issued
	var lastSweep int64
	for cfg.Count <= 0 || next < cfg.Count {
		if stop.Load() {
			break
		}
		now := l.now()
		if now-lastSweep >= int64(5*time.Millisecond) {
			l.sweep(now)
			lastSweep = now
		}
		due := int64(float64(next) * interval)
		if due > now {
			// Sleep to the next ticket, but wake for the sweep.
			sleepNs(min(due-now, int64(5*time.Millisecond)))
			continue
		}
		// Every ticket due by now goes out in this round, round robin
		// over the workers (each owns its clients' lease slots).
		for due <= now && (cfg.Count <= 0 || next < cfg.Count) {
			w := l.ws[next%int64(len(l.ws))]
			if !l.sendOne(w, cfg.Mix.pick(w.rng.IntN(total)), due) {
				// Concurrency requests in flight: the ticket waits (and
				// its wait is latency); look again shortly.
				sleepNs(int64(20 * time.Microsecond))
				break
			}
			next++
			due = int64(float64(next) * interval)
		}
	}
	// Wait for the replies still due, as the closed loop's workers do.
	deadline := l.now() + int64(cfg.Timeout) + int64(10*time.Millisecond)
	for l.now() < deadline {
		l.mu.Lock()
		busy := len(l.idle) < len(l.slots)
		l.mu.Unlock()
		if !busy {
			return
		}
		l.sweep(l.now())
		sleepNs(int64(time.Millisecond))
	}
	l.sweep(int64(1) << 62)
}

// sendOne sends the request for ticket due from w; false when the most
// requests are in flight.
func (l *openLoop) sendOne(w *worker, want op, due int64) bool {
	l.mu.Lock()
	if len(l.idle) == 0 {
		l.mu.Unlock()
		return false
	}
	ph := l.ph
	o, slot := w.choose(want)
	if (o == opRenew || o == opDelete) && l.pidx[w.id][slot] >= 0 {
		// That lease has a request in flight already; a second one would
		// race it. Another live slot, or a new MAP if there is none.
		o, slot = l.otherLive(w)
	}
	if o != want {
		ph.fallbacks[want][o]++
	}
	src := w.build(o, slot)
	l.count++
	i := l.idle[len(l.idle)-1]
	l.idle = l.idle[:len(l.idle)-1]
	sent := l.now()
	l.slots[i] = inflight{stamp: l.count, worker: int32(w.id), slot: slot, op: o, opcode: w.out[1], due: due, sent: sent}
	switch o {
	case opNew, opRenew, opDelete:
		l.pidx[w.id][slot] = i
	default:
		binary.BigEndian.PutUint32(w.out[pcp.HeaderSize+8:], uint32(i)|uint32(l.count)<<openIdxBits)
	}
	ph.ops[o].Sent++
	ph.lag.record(time.Duration(max(sent-due, 0)))
	l.mu.Unlock()
	// w.out is the sender's alone (the receiver matches by the in-flight
	// table), so the write runs outside the lock.
	_, err := unix.Write(src.fd, w.out)
	if err != nil {
		l.mu.Lock()
		if l.slots[i].stamp == l.count {
			ph.ops[o].SendErrors++
			l.finish(i, -1)
		}
		l.mu.Unlock()
	}
	return true
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
// Called with l.mu held.
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
	l.mu.Lock()
	defer l.mu.Unlock()
	limit := int64(l.cfg.Timeout)
	for i := range l.slots {
		e := &l.slots[i]
		if e.stamp != 0 && now-e.sent > limit {
			l.ph.ops[e.op].Timeouts++
			l.finish(int32(i), -1)
		}
	}
}

// receive is the receiver thread: it reads every reply as it arrives and
// stamps it before taking the lock.
func (l *openLoop) receive() {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	const maxEv = 256
	type got struct {
		n  int
		at int64
	}
	events := make([]unix.EpollEvent, maxEv)
	bufs := make([]byte, maxEv*(pcp.MaxMessageSize+4))
	gots := make([]got, maxEv)
	var resp pcp.Response
	for !l.stop.Load() {
		n, err := unix.EpollWait(l.epfd, events, 20)
		if err != nil || n <= 0 {
			continue
		}
		// Level-triggered: one read per ready socket per round; a socket
		// with more queued is reported again at once.
		for k := range n {
			b := bufs[k*(pcp.MaxMessageSize+4) : (k+1)*(pcp.MaxMessageSize+4)]
			m, _, err := unix.Recvfrom(int(events[k].Fd), b, unix.MSG_DONTWAIT)
			gots[k] = got{n: m, at: l.now()}
			if err != nil {
				// ECONNREFUSED (nothing listening) arrives as an error on
				// the connected socket; the request then times out.
				gots[k].n = -1
			}
		}
		l.mu.Lock()
		for k := range n {
			if gots[k].n < 0 {
				continue
			}
			b := bufs[k*(pcp.MaxMessageSize+4) : k*(pcp.MaxMessageSize+4)+gots[k].n]
			l.reply(b, gots[k].at, &resp)
		}
		l.mu.Unlock()
	}
}

// reply matches one datagram with its request by the nonce and records
// it. Called with l.mu held.
func (l *openLoop) reply(b []byte, at int64, resp *pcp.Response) {
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
	d := time.Duration(at - e.due)
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

// rawFD returns the descriptor of c, which stays open (and owned by c)
// until the run closes its sockets.
func rawFD(c *net.UDPConn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	if err := rc.Control(func(f uintptr) { fd = int(f) }); err != nil {
		return -1, err
	}
	return fd, nil
}

// sleepNs sleeps d nanoseconds on this thread (nanosleep: precise with
// the timer slack the sender sets, unlike a Go timer).
func sleepNs(d int64) {
	if d <= 0 {
		return
	}
	ts := unix.NsecToTimespec(d)
	unix.Nanosleep(&ts, nil)
}
