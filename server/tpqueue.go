package server

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/policy"
)

// freshPolicy is a Policy whose ownership view may lag (policy.Policy
// over WireGuard: --wireguard-fresh): a request that opens or extends a
// pinhole (a THIRD_PARTY target since h/tpfresh, every MAP, PEER and
// NAT-PMP mapping since h/fresh: Server.freshFirst) is judged by a view
// read no earlier than the fresh bound before the request arrived.
type freshPolicy interface {
	// Stale: such a request judged now needs a re-read first.
	Stale() bool
	// FreshenAt waits (at most the ownership's fresh wait) for a view
	// fresh enough for a request that arrived at at; when none could be
	// had, Authorize refuses THIRD_PARTY targets (PeersUnread).
	FreshenAt(at time.Time)
	// SwapPending: the view was read before the last device change and
	// takes no request arriving there as anybody's: a delete judged now
	// needs a re-read first (Server.freshFirst).
	SwapPending() bool
}

// tpQueue holds the requests that wait for a fresher WireGuard view (its
// name is of when only THIRD_PARTY ones did: since h/fresh, any request
// that opens or extends a pinhole and finds the view older than the
// bound, and since h/delwait a delete while a device change is not yet
// read, Server.freshFirst), so that no socket reader waits for a read (review
// h/revtp's MEDIUM left: with --wireguard-fresh 0 each such request made
// its reader read WireGuard, 8 ms at 1000 peers, and every request behind
// it waited; with 1s every reader waited one read a second). The readers
// hand such a request over (Server.deferThirdParty) and go on; one
// goroutine (Server.serveThirdParty) takes them in arrival order, waits
// for a read begun within the bound before each one's arrival (one read
// serves all that arrived before it began), and passes each on exactly
// as the reader would have (Server.earlyIn: the same checks, the reply
// out of the socket it came in on, or the engine's queue).
//
// While anything is queued or being judged (busy), the readers hand over
// every request for the engine (PCP MAP and PEER, NAT-PMP), deletes and
// fresh ones too: a client's requests reach the engine in the order its
// socket received them (a delete never overtakes the MAP it undoes).
//
// It is bounded: tpQueueCap requests, tpQueueOwnerCap of them any one
// owner's (the readers' owner key; unowned sources share one), so a
// flooding client fills its own share and others' requests still get in.
// One that finds no room is dropped without a reply, counted as
// "thirdparty-queue-full", as the engine's full queue and the rate
// limits drop (PKT-08: overload MAY drop or send NO_RESOURCES; pcpd
// drops, so that shedding a flood sends nothing back, SEC-04): the client
// retransmits. NO_RESOURCES stays the answer of a read that fails or
// hangs (PeersUnread): a state the client cannot wait out by resending
// within a second.
type tpQueue struct {
	mu      sync.Mutex
	items   []tpItem
	byOwner map[policy.OwnerKey]int
	// busy counts the requests queued or being judged.
	busy atomic.Int64
	wake chan struct{}
}

type tpItem struct {
	p packet
	k policy.OwnerKey
}

// Bounds of the THIRD_PARTY queue.
const (
	tpQueueCap      = 1024
	tpQueueOwnerCap = tpQueueCap / 4
)

func newTPQueue() *tpQueue {
	return &tpQueue{byOwner: make(map[policy.OwnerKey]int), wake: make(chan struct{}, 1)}
}

// push queues p as owner k's; false when full (the whole queue, or k's
// share).
func (q *tpQueue) push(p packet, k policy.OwnerKey) bool {
	q.mu.Lock()
	if len(q.items) >= tpQueueCap || q.byOwner[k] >= tpQueueOwnerCap {
		q.mu.Unlock()
		return false
	}
	q.byOwner[k]++
	q.items = append(q.items, tpItem{p: p, k: k})
	q.busy.Add(1)
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
	return true
}

// take moves everything queued to buf (emptied first).
func (q *tpQueue) take(buf []tpItem) []tpItem {
	q.mu.Lock()
	defer q.mu.Unlock()
	buf = append(buf[:0], q.items...)
	clear(q.items)
	q.items = q.items[:0]
	return buf
}

// done ends the judging of one of owner k's requests.
func (q *tpQueue) done(k policy.OwnerKey) {
	q.mu.Lock()
	if q.byOwner[k]--; q.byOwner[k] <= 0 {
		delete(q.byOwner, k)
	}
	q.mu.Unlock()
	q.busy.Add(-1)
}

// deferThirdParty is the readers' hand-over of a THIRD_PARTY request the
// early path found needing a fresher view (earlyDeferred); p.b is the
// reader's copy.
func (s *Server) deferThirdParty(p packet) {
	// toEngine's bucket: the unowned sources share one, the host's own
	// requests have theirs (a local user's flood from the host's
	// address in an owner's prefix filled that owner's share).
	if !s.tpq.push(p, s.bucketOwner(p.src.Addr(), p.conn.local.Addr(), p.conn.kname, policy.Owner{}, false)) {
		s.dropEarly("thirdparty-queue-full", p.src)
	}
}

// serveThirdParty judges the queued THIRD_PARTY requests (tpQueue) until
// ctx ends.
func (s *Server) serveThirdParty(ctx context.Context) {
	var batch []tpItem
	buf := make([]byte, 0, readSize)
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.tpq.wake:
		}
		for batch = s.tpq.take(batch); len(batch) > 0; batch = s.tpq.take(batch) {
			for i := range batch {
				s.judgeQueued(batch[i].p, buf)
				s.tpq.done(batch[i].k)
				batch[i] = tpItem{}
			}
		}
	}
}

// judgeQueued passes p on as its socket reader would have, with a view
// fresh enough for when it arrived (earlyIn waits for it).
func (s *Server) judgeQueued(p packet, buf []byte) {
	reply, v := s.earlyIn(nil, buf[:0], p.b, p.src, p.conn.local.Addr(), p.conn.kname, s.steady(), p.at, false)
	switch v {
	case earlyAnswered:
		if len(reply) > 0 {
			if err := p.conn.send(reply, p.src); err != nil {
				s.lis.log.Debug("send reply", zap.Stringer("from", p.conn.local), zap.Error(err))
			}
		}
	case earlyEngine:
		select {
		case s.in <- p:
		default:
			s.dropEarly("queue-full", p.src) // as the reader's (listener.read)
		}
	}
}
