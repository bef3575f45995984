package server

import (
	"context"
	"net/netip"
	"slices"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"

	"github.com/pcpd/pcpd/pcp"
)

// announceSends is how many unsolicited announcements go out per event
// (ANN-05, PMP-13: at most 10).
const announceSends = 10

// announceChunk is how many announcements share one sendmmsg, and
// announcePause the pause between two chunks (4 096 clients: 64 ms).
const (
	announceChunk = 64
	announcePause = time.Millisecond
)

var (
	allHosts4 = netip.MustParseAddr("224.0.0.1")
	allHosts6 = netip.MustParseAddr("ff02::1")
)

// announce sends the unsolicited ANNOUNCE after start (ANN-03..06), and on
// IPv4 the NAT-PMP external address announcement (PMP-13): 10 times, gaps
// of 250 ms doubling, each with the epoch of its moment. Every start
// announces, also when the epoch continued (EPO-04): clients learn the
// server is back and their epoch check passes.
//
// The clients are those of the leases restored at start (and the orphan
// pinholes' addresses the audit finds): the ones that may not know the
// server restarted. A client that maps after the start has the new epoch
// in its reply already. Listing them once, before serving, also keeps the
// rounds from growing with the traffic of the first minutes: rounds
// re-listed every lease, and one datagram per client of a busy fresh
// start (4 096 in the benchmark) made each round a burst of CPU on a
// small host, visible as 25-70 ms stalls in the open-loop run.
func (s *Server) announce(ctx context.Context) {
	defer close(s.announceDone)
	pcpT, pmpT := s.announceTargets()
	// Wait for the serving sockets (the listener opens them at start).
	for i := 0; i < 50 && len(s.lis.sockets()) == 0; i++ {
		select {
		case <-ctx.Done():
			return
		case <-time.After(20 * time.Millisecond):
		}
	}
	via := map[routeFrom]int{}
	announceRounds(ctx, s.cfg.AnnounceGap, announceSends, time.Now, sleepCtx, func() {
		s.announceOnce(ctx, pcpT, pmpT, via)
	})
}

// sleepCtx waits d, or until ctx ends (false).
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// announceRounds runs round n times: the first gap at least first, each
// later gap at least twice the one before (ANN-05, PMP-13). It reads the
// clock with now and waits with wait (time.Now and sleepCtx; tests inject
// a clock with late wake-ups).
//
// The rule is about the gaps a client sees, and a client's datagram
// leaves anywhere inside its round (thousands of clients make a round
// last tens of ms). So every gap is measured on the rounds actually run,
// for the worst client: the next round starts no sooner than twice the
// longest previous gap (start of the round before the last to the end of
// the last) after the end of the last round. A late wake-up or a long
// round only makes the following gaps longer, never too short: the old
// fixed 250, 500, 1000 ms after each round broke the rule whenever a
// wake-up was late (gaps 262, 524, 970 ms on a loaded box).
func announceRounds(ctx context.Context, first time.Duration, n int, now func() time.Time, wait func(context.Context, time.Duration) bool, round func()) {
	var beforeStart, lastStart, lastEnd time.Time
	for i := 0; i < n; i++ {
		if i > 0 {
			gap := first
			if i > 1 {
				gap = 2 * lastEnd.Sub(beforeStart)
			}
			// A timer never fires early, but a test clock may: loop.
			for d := lastEnd.Add(gap).Sub(now()); d > 0; d = lastEnd.Add(gap).Sub(now()) {
				if !wait(ctx, d) {
					return
				}
			}
		}
		beforeStart, lastStart = lastStart, now()
		round()
		lastEnd = now()
	}
}

// announceOnce sends one round of unsolicited announcements from every
// serving socket, to pcpT and pmpT (announceTargets) and the orphans
// (orphanSocket; via is its cache, kept across rounds).
func (s *Server) announceOnce(ctx context.Context, pcpT, pmpT map[netip.AddrPort][]netip.AddrPort, via map[routeFrom]int) {
	s.mu.Lock()
	epoch := s.epoch.at(s.now())
	s.mu.Unlock()
	ann := pcp.AppendResponse(nil, &pcp.Response{Opcode: pcp.OpAnnounce, Result: pcp.Success, Epoch: epoch})
	var pmp []byte
	if s.cfg.ExternalIPv4.IsValid() && !s.cfg.DisableNATPMP {
		pmp = pcp.AppendPMPAddressResponse(nil, pcp.PMPSuccess, epoch, s.cfg.ExternalIPv4)
	}
	s.mu.Lock()
	orphans := slices.Clone(s.orphans)
	s.mu.Unlock()
	socks := s.lis.sockets()
	// Clients known only from orphan pinholes get it on the clients' port
	// (5350), from a serving address of the interface they are reached
	// through.
	var h *netlink.Handle
	for _, a := range orphans {
		c := s.orphanSocket(&h, via, socks, a)
		if c == nil {
			continue
		}
		to := netip.AddrPortFrom(a, pcp.ClientPort)
		if err := c.send(ann, to); err != nil {
			s.plog.Debug("announce", zap.Stringer("to", to), zap.Error(err))
		}
		if pmp != nil && a.Is4() {
			c.send(pmp, to)
		}
	}
	if h != nil {
		h.Close()
	}
	var rs []reply
	for _, c := range socks {
		send := func(b []byte, to netip.AddrPort) {
			if err := c.send(b, to); err != nil {
				s.plog.Debug("announce", zap.Stringer("to", to), zap.Error(err))
			}
		}
		// One sendmmsg per announceChunk clients: a round reaches every
		// known client, thousands of datagrams, and one sendto each was
		// CPU taken from the engine on a small host.
		rs = rs[:0]
		for _, to := range pcpT[c.local] {
			rs = append(rs, reply{b: ann, to: to})
		}
		if pmp != nil && c.local.Addr().Is4() {
			for _, to := range pmpT[c.local] {
				rs = append(rs, reply{b: pmp, to: to})
			}
		}
		for i := 0; i < len(rs); i += announceChunk {
			if i > 0 {
				// Paced: a restart with thousands of clients must not
				// take the CPU from the requests arriving meanwhile.
				select {
				case <-ctx.Done():
					return
				case <-time.After(announcePause):
				}
			}
			if err := c.sendBatch(rs[i:min(i+announceChunk, len(rs))]); err != nil {
				s.plog.Debug("announce", zap.Stringer("from", c.local), zap.Error(err))
			}
		}
		if !s.cfg.AnnounceMulticast {
			continue
		}
		if c.local.Addr().Is4() {
			send(ann, netip.AddrPortFrom(allHosts4, pcp.ClientPort))
			if pmp != nil {
				send(pmp, netip.AddrPortFrom(allHosts4, pcp.ClientPort))
			}
		} else {
			send(ann, netip.AddrPortFrom(allHosts6.WithZone(c.iface), pcp.ClientPort))
		}
	}
}

// orphanSocket is the socket an orphan client a is announced from: one
// of a's family, not link-local, on the interface the kernel routes a
// out of (RouteGet in the serving namespace, looked up once per start,
// cached in via; 0: through no interface, or the look-up failed), nil if
// none is served. Before (h/swap2) it was the first serving socket of
// a's family, whatever its interface: with two served interfaces, a
// client of the second was sent its ANNOUNCE out of the first, bound
// there (SO_BINDTOIFINDEX), where it never arrives (IPv4 takes the
// client for on-link there and asks ARP for it on the wrong link), and
// from an address that is not its server's (ANN-03, ANN-04: every
// serving path, from the address the client sends its requests to;
// TestE2EOrphanAnnouncedOnItsInterface). An orphan routed through no
// served interface is not announced: none of its servers is there. *h
// is the round's route handle, opened on first need.
func (s *Server) orphanSocket(h **netlink.Handle, via map[routeFrom]int, socks []*udpConn, a netip.Addr) *udpConn {
	index := s.routeIndex(h, via, netip.Addr{}, a)
	for _, c := range socks {
		if index != 0 && c.index == index && c.local.Addr().Is4() == a.Is4() && !c.local.Addr().IsLinkLocalUnicast() {
			return c
		}
	}
	return nil
}

// routeIndex is the index of the interface the kernel routes to out of
// (RouteGet in the serving namespace), 0 through none or if the look-up
// failed; cached in via, *h the handle, opened on first need. from, if
// valid, is the source the datagram will carry (a serving address): the
// look-up is the one the kernel makes for it, rules and routes that
// match by source included (ip rule from, IPv6 "from" routes); without
// it, a source rule routing the client elsewhere is not seen (review
// h/revu2).
func (s *Server) routeIndex(h **netlink.Handle, via map[routeFrom]int, from, to netip.Addr) int {
	k := routeFrom{from, to}
	index, ok := via[k]
	if ok {
		return index
	}
	if *h == nil {
		var err error
		if *h, err = routeHandle(s.lis.ns); err != nil {
			s.plog.Debug("route handle", zap.Error(err))
			via[k] = 0
			return 0
		}
	}
	var opts *netlink.RouteGetOptions
	if from.IsValid() {
		opts = &netlink.RouteGetOptions{SrcAddr: from.AsSlice()}
	}
	if rs, err := (*h).RouteGetWithOptions(to.AsSlice(), opts); err == nil && len(rs) > 0 {
		index = rs[0].LinkIndex
	} else if err != nil {
		s.plog.Debug("no route", zap.Stringer("from", from), zap.Stringer("to", to), zap.Error(err))
	}
	via[k] = index
	return index
}

// routeFrom is a route look-up's key: the source (invalid: any) and the
// destination.
type routeFrom struct{ from, to netip.Addr }
