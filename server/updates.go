package server

import (
	"context"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/store"
)

// Unsolicited mapping updates (RFC 6887 §14.2; PROTOCOL.md UPD-02,
// UPD-03, (f)). When the server ends a PCP mapping its client did not
// ask to end, the client is told with an unsolicited response in the
// normal form of the mapping's own reply, so it need not wait for its
// renewal to learn it:
//
//   - a PREFER_FAILURE MAP or an IPv4 PEER ended because the host's own
//     DNAT rules forward its external port now (forwardend.go): it lost
//     its external and cannot have another, CANNOT_PROVIDE_EXTERNAL
//     (UPD-02, SHOULD);
//   - a lease revoked (LIFE-05: its owner no longer owns the address, or
//     the host reaches it itself; or `pcpd revoke`): NOT_AUTHORIZED
//     (UPD-03, optional; §8.3 names it).
//
// A plain MAP on a port forwarded since is not ended: its next renewal
// moves it (mapInbound). NAT-PMP has no per-mapping unsolicited message
// (RFC 6886 announces only the address): NAT-PMP leases get none.
//
// The message: the mapping's opcode (MAP or PEER), the result, the
// error's lifetime (pcp.ResultCode.ErrorLifetime: what its renewal would
// be answered now, RFC 6887 §8's identical responses), the epoch of its
// send, the mapping's nonce, protocol, internal port, assigned external
// port and address (PEER: remote port and address too), THIRD_PARTY when
// the mapping was made with it (§14.2 MUST), the MAP's FILTERs (none if
// they do not all fit in pcp.MaxMessageSize), no other option. It goes to the address:port the mapping's last reply went to
// (Lease.ClientAddr, stored since the first store format), from the
// serving address that reply left from (Lease.ServerAddr): that
// address's socket, bound to its interface (SO_BINDTOIFINDEX), and only
// while that interface is the one the kernel routes the client out of
// (updateSocket: a reply goes out of the socket its request came in on;
// an address the admin moved to another served interface would make the
// send leave on a link the client is not on). Three sends: at once,
// then ≥ 250 ms, then ≥ 500 ms after the send before (§14.2 SHOULD),
// each gap measured from the end of the send before. A send is skipped, and the update dropped,
// when the client has re-mapped (a lease with the key again) or asked
// about that mapping meanwhile (its MAP or PEER request: it has an
// answer), when the destination address is no longer the mapping
// owner's (a peer whose AllowedIPs lost the address: WireGuard would
// route it to another peer, or to none; the host's own address) or its
// serving socket is gone or no longer on the client's route.
//
// A request never overtakes the update it answers (review h/revsu,
// left 1): the round checks each update under s.mu, then sends with the
// lock free, the updates in flight marked; a MAP or PEER request of
// such a mapping handled meanwhile (updateAnswered) has its batch's
// replies wait for that send to end (awaitUpdateSends), so its client
// never gets the fresh mapping's SUCCESS and then the stale update of
// the same nonce. Only such a batch waits (one sendmmsg), no other.
//
// Bounded (PROTOCOL.md (f)): at most maxUpdates mappings wait at a time;
// the ends beyond are not told (their clients learn at their renewal)
// and counted, pcpd_mapping_updates_dropped_total{reason="queue_full"}.
// Enqueueing is a message's encoding under s.mu (the end's own hold);
// the sends run on their own goroutine (sendUpdates), updateChunk a
// hold of s.mu and a sendmmsg, updatePause apart: a revocation of
// 100 000 leases queues maxUpdates and drops the rest.

const (
	updateSends    = 3                      // §14.2: three times
	updateFirstGap = 250 * time.Millisecond // then 500 ms
	maxUpdates     = 4096
	updateChunk    = 64
	updatePause    = time.Millisecond
)

// update is one ended mapping whose client is being told.
type update struct {
	key  store.Key
	msg  []byte // octets 8-11 (epoch) set at each send
	to   netip.AddrPort
	from netip.AddrPort
	sent int
	due  time.Time // s.steady's
	// inflight: picked by a round whose send has not ended (under s.mu).
	inflight bool
}

// updates is the queue of unsolicited updates, under s.mu.
type updates struct {
	q     []*update
	byKey map[store.Key]*update
	wake  chan struct{}
	// behind: a request answered an update in flight (updateAnswered);
	// its batch's replies wait for the send (handleBatch takes it).
	behind bool
	// sending is held by a round from its pick (under s.mu) to the end
	// of its send: awaitUpdateSends waits for it. Taken under s.mu, never
	// waited for while holding s.mu by anyone else.
	sending sync.Mutex
}

// updateMessage is the unsolicited response telling l's client of its
// end with code (the form above; epoch set at each send).
func updateMessage(l *store.Lease, code pcp.ResultCode) []byte {
	r := pcp.Response{
		Opcode:   pcp.OpMap,
		Result:   code,
		Lifetime: code.ErrorLifetime(),
		Map: pcp.MapData{
			Nonce: l.Nonce, Protocol: pcp.Protocol(l.Protocol), InternalPort: l.InternalPort,
			ExternalPort: l.ExternalPort, ExternalAddr: l.ExternalAddr,
		},
	}
	if l.Kind == store.KindPeer {
		r.Opcode = pcp.OpPeer
		r.Peer = pcp.PeerData{RemotePort: l.Remote.Port(), RemoteAddr: l.Remote.Addr()}
	}
	if l.ThirdParty {
		r.Options.ThirdParty = l.InternalAddr
	}
	if l.Kind == store.KindMap && len(l.Filters) > 0 {
		fs := make([]pcp.Filter, len(l.Filters))
		for i, f := range l.Filters {
			fs[i] = pcp.Filter{Remote: f.Prefix, RemotePort: f.Port}
		}
		r.Options.Filters = fs
		if r.Len() > pcp.MaxMessageSize {
			// FILTERs add up over renewals (FLT-04) to more than one
			// message holds (--max-filters 64: 1616 octets): none then,
			// rather than a part of them, and the result kept (the
			// encoder's guard would make it MALFORMED_REQUEST).
			r.Options.Filters = nil
		}
	}
	return pcp.AppendResponse(nil, &r)
}

// queueUpdates queues the unsolicited update of each PCP lease of gone
// (ended by the server, committed) with code. The caller holds s.mu.
func (s *Server) queueUpdates(gone []store.Lease, code pcp.ResultCode) {
	now := s.steady()
	queued := false
	for i := range gone {
		l := &gone[i]
		if l.Kind == store.KindNATPMP || !l.ClientAddr.IsValid() || !l.ServerAddr.IsValid() {
			continue
		}
		if p, ok := s.upd.byKey[l.Key]; ok {
			// Ended again (re-mapped, then ended): the new one replaces it.
			p.msg, p.to, p.from, p.sent, p.due = updateMessage(l, code), l.ClientAddr, l.ServerAddr, 0, now
			queued = true
			continue
		}
		if len(s.upd.q) >= maxUpdates {
			s.m.updatesDropped.WithLabelValues("queue_full").Inc()
			continue
		}
		if s.upd.byKey == nil {
			s.upd.byKey = map[store.Key]*update{}
		}
		p := &update{key: l.Key, msg: updateMessage(l, code), to: l.ClientAddr, from: l.ServerAddr, due: now}
		s.upd.byKey[l.Key] = p
		s.upd.q = append(s.upd.q, p)
		queued = true
	}
	if queued && s.upd.wake != nil {
		select {
		case s.upd.wake <- struct{}{}:
		default:
		}
	}
}

// updateAnswered drops the update of key, if any: its client asked
// about that mapping (a MAP or PEER request), and has its answer. The
// caller holds s.mu.
func (s *Server) updateAnswered(key store.Key) {
	if len(s.upd.byKey) == 0 {
		return
	}
	if p, ok := s.upd.byKey[key]; ok {
		if p.inflight {
			s.upd.behind = true
		}
		p.sent = updateSends
		delete(s.upd.byKey, key)
		s.m.updatesDropped.WithLabelValues("answered").Inc()
	}
}

// updateBehind reports (and forgets) whether the requests handled since
// its last call answered an update whose send was in flight: their
// replies must wait for it (awaitUpdateSends). The caller holds s.mu.
func (s *Server) updateBehind() bool {
	b := s.upd.behind
	s.upd.behind = false
	return b
}

// awaitUpdateSends returns once the update send in flight, if any, has
// ended. The caller does not hold s.mu.
func (s *Server) awaitUpdateSends() {
	s.upd.sending.Lock()
	s.upd.sending.Unlock()
}

// sendUpdates sends the queued updates until ctx ends (Serve's
// goroutine).
func (s *Server) sendUpdates(ctx context.Context) {
	t := time.NewTimer(time.Hour)
	defer t.Stop()
	for {
		next, ok := s.updateRound(ctx)
		d := time.Hour
		if ok {
			d = max(next.Sub(s.steady()), 0)
		}
		t.Reset(d)
		select {
		case <-ctx.Done():
			return
		case <-s.upd.wake:
		case <-t.C:
		}
	}
}

// updateRound sends every update due, updateChunk a hold of s.mu, and
// returns when the next is due (false: none queued).
func (s *Server) updateRound(ctx context.Context) (time.Time, bool) {
	socks := map[netip.AddrPort]*udpConn{}
	if s.lis != nil {
		for _, c := range s.lis.sockets() {
			socks[c.local] = c
		}
	}
	var h *netlink.Handle // the round's route handle (updateSocket)
	defer func() {
		if h != nil {
			h.Close()
		}
	}()
	via := map[routeFrom]int{}
	type out struct {
		p  *update
		rs reply
		c  *udpConn // nil: no socket on the client's route (updateSocket)
	}
	var batch []out
	for first := true; ; first = false {
		if !first && !sleepCtx(ctx, updatePause) {
			return time.Time{}, false
		}
		batch = batch[:0]
		s.mu.Lock()
		now := s.steady()
		epoch := s.epoch.at(s.now())
		own := s.pol.Ownership()
		for _, p := range s.upd.q {
			if len(batch) == updateChunk {
				break
			}
			if p.sent >= updateSends || p.due.After(now) {
				continue
			}
			reason := ""
			if _, ok := s.tab.get(p.key); ok {
				reason = "answered"
			} else if o, ok := own.Lookup(p.to.Addr().Unmap()); !ok || string(o.ID) != p.key.Owner || s.pol.NeverOpenable(p.to.Addr().Unmap()) {
				reason = "unserved"
			} else if _, ok := socks[p.from]; !ok && s.updateSend == nil {
				reason = "no_socket"
			}
			if reason != "" {
				s.m.updatesDropped.WithLabelValues(reason).Inc()
				p.sent = updateSends
				delete(s.upd.byKey, p.key)
				continue
			}
			p.msg[8], p.msg[9], p.msg[10], p.msg[11] = byte(epoch>>24), byte(epoch>>16), byte(epoch>>8), byte(epoch)
			batch = append(batch, out{p: p, rs: reply{b: slices.Clone(p.msg), to: p.to}})
			p.sent++
			p.due = time.Time{} // set once sent
			p.inflight = true
		}
		if len(batch) == 0 {
			s.mu.Unlock()
			break
		}
		// From here to the end of the send, a request answering one of
		// these (updateAnswered) has its replies wait (awaitUpdateSends).
		s.upd.sending.Lock()
		s.mu.Unlock()
		if s.updateSend == nil {
			for i := range batch {
				batch[i].c = s.updateSocket(&h, via, socks[batch[i].p.from], batch[i].p.to.Addr())
			}
		}
		slices.SortFunc(batch, func(a, b out) int { return a.p.from.Compare(b.p.from) })
		for i := 0; i < len(batch); {
			j := i
			var rs []reply
			for ; j < len(batch) && batch[j].p.from == batch[i].p.from; j++ {
				if s.updateSend != nil || batch[j].c != nil {
					rs = append(rs, batch[j].rs)
				}
			}
			var err error
			if s.updateSend != nil {
				err = s.updateSend(batch[i].p.from, rs)
			} else if len(rs) > 0 {
				// Every c of the group is nil or its address's socket.
				err = socks[batch[i].p.from].sendBatch(rs)
			}
			if err != nil {
				s.plog.Debug("mapping update", zap.Stringer("from", batch[i].p.from), zap.Error(err))
			}
			i = j
		}
		s.upd.sending.Unlock()
		s.mu.Lock()
		after := s.steady()
		sent := 0
		for _, o := range batch {
			o.p.inflight = false
			left := o.c != nil || s.updateSend != nil
			if left {
				sent++
			}
			if o.p.sent == 0 {
				// Ended again while this send was in flight
				// (queueUpdates restarted it, due now): its
				// three sends start over.
				continue
			}
			if !left {
				// Not sent: its serving address is on another
				// interface than the client's route.
				s.m.updatesDropped.WithLabelValues("no_socket").Inc()
				o.p.sent = updateSends
				if s.upd.byKey[o.p.key] == o.p {
					delete(s.upd.byKey, o.p.key)
				}
				continue
			}
			if o.p.sent < updateSends {
				// The next send at least the gap after this one has left.
				o.p.due = after.Add(updateFirstGap << (o.p.sent - 1))
			}
		}
		s.m.updatesSent.Add(float64(sent))
		s.mu.Unlock()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var next time.Time
	q := s.upd.q[:0]
	for _, p := range s.upd.q {
		if p.sent >= updateSends {
			if s.upd.byKey[p.key] == p {
				delete(s.upd.byKey, p.key)
			}
			continue
		}
		q = append(q, p)
		if next.IsZero() || p.due.Before(next) {
			next = p.due
		}
	}
	clear(s.upd.q[len(q):])
	s.upd.q = q
	return next, len(q) > 0
}

// updateSocket is the socket an update from c (the lease's serving
// address's socket, nil if none) to the client address a leaves by: c,
// if the kernel routes a datagram from c's address to a out of c's
// interface (routeIndex, with the source: a rule "from" that address
// counts; via its cache, *h its handle), else nil. c is bound to its interface: an address the
// admin moved to another served interface while the client stays
// routed through the first would have the update leave on a link the
// client is not on (IPv4 asks ARP for it there, and whoever answers
// gets its nonce), the orphan ANNOUNCE's defect h/swap2 fixed
// (orphanSocket). No other address's socket stands in: a client takes
// responses only from the address it sends its requests to.
func (s *Server) updateSocket(h **netlink.Handle, via map[routeFrom]int, c *udpConn, a netip.Addr) *udpConn {
	if c == nil {
		return nil
	}
	if index := s.routeIndex(h, via, c.local.Addr().WithZone(""), a.Unmap()); index == 0 || index != c.index {
		return nil
	}
	return c
}
