package server

import (
	"bytes"
	"cmp"
	"errors"
	"net"
	"net/netip"
	"slices"
	"sync"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/store"
)

// flushConntrack ends the connections of mappings that ended: deleted by
// their client, revoked, expired, or moved to another external port (the guard lets established flows
// pass, so without this a deleted NAT-PMP mapping (PMP-12), a revoked
// address (LIFE-05) or an expired lease kept its open connections for as
// long as they lasted). Two kinds of flows are ended:
//   - inbound: those whose original destination is the mapping's external
//     endpoint (connections the client opened itself are left alone),
//     but not those a live lease there admits when the walk starts (a
//     PEER's, the same mapping made again: pruneLive, ctAdmits);
//   - for an IPv4 NAPT mapping, the outbound flows its SNAT companion
//     translated to the external endpoint (two-way NAPT, PMP-11): their
//     reply destination is the external endpoint and their original
//     source the mapped internal one. Unless another live lease (a PEER
//     of the same tuple) holds the endpoint: its flows leave from there.
//
// PEER mappings flush nothing. Expiry flushes too, in addition to the
// kernel ending the pinholes on time by itself (which holds with pcpd
// dead); the flows of leases that expired while pcpd was down are flushed
// at the next start (restoring.flushExpired).
//
// It only queues the flush (the tx calls it under s.mu); the conntrack
// flusher runs it, coalesced with the others queued meanwhile, so neither
// the engine nor an expiry waits for the walk. Replies of a batch that
// ended mappings wait for it (serveBatch, HandleBatch: waitConntrack), so
// a connection cannot carry data after its delete was acknowledged
// (PMP-12, found by the conformance suite).
func (s *Server) flushConntrack(ended []store.Lease) {
	if s.cfg.KeepConnections || len(ended) == 0 {
		return
	}
	var fs []ctFilter
	for i := range ended {
		fs = appendCtFilters(fs, &ended[i])
	}
	if fs = s.unheldNAT(fs); len(fs) > 0 {
		s.ct.add(fs)
	}
}

// unheldNAT drops from fs (in place) the SNAT filters of external
// endpoints a live lease holds (flushConntrack).
func (s *Server) unheldNAT(fs []ctFilter) []ctFilter {
	return slices.DeleteFunc(fs, func(f ctFilter) bool {
		if !f.nat {
			return false
		}
		_, held := s.tab.holder(endpoint{addr: f.t.addr, proto: f.t.proto, port: f.t.port})
		return held
	})
}

// pruneLive drops from fs (in place) the filters whose flows a live lease
// admits now (ctFlusher.prune): the SNAT-ed flows of an endpoint a lease
// holds (as unheldNAT), the inbound flows of an endpoint a MAP without
// FILTER holds (a client that made the same mapping again before the walk
// ran: its new connections go through it). An endpoint held only by a
// PEER or a FILTERed MAP is still flushed. s.mu is taken a chunk of
// filters at a time, so 1M of them at a start do not stall the engine.
func (s *Server) pruneLive(fs []ctFilter) []ctFilter {
	const step = 4096
	out := fs[:0]
	var buf []store.Lease
	for i := 0; i < len(fs); i += step {
		s.mu.Lock()
		for _, f := range fs[i:min(i+step, len(fs))] {
			var live bool
			if live, buf = s.admitsAll(f, buf); !live {
				out = append(out, f)
			}
		}
		s.mu.Unlock()
	}
	return out
}

// admitsAll reports whether a live lease admits every flow of f (under
// s.mu; buf is scratch, returned for reuse).
func (s *Server) admitsAll(f ctFilter, buf []store.Lease) (bool, []store.Lease) {
	e := endpoint{addr: f.t.addr, proto: f.t.proto, port: f.t.port}
	h, held := s.tab.holder(e)
	if !held || f.nat {
		return held, buf
	}
	buf = s.tab.onTupleInto(tuple{proto: f.t.proto, addr: h.addr, port: h.port}, buf)
	for i := range buf {
		l := &buf[i]
		if l.Kind != store.KindPeer && len(l.Filters) == 0 && endpointOf(l) == e {
			return true, buf
		}
	}
	return false, buf
}

// appendCtFilters appends the flush filters of l's connections
// (flushConntrack) to dst: none for a PEER or a lease without an external
// port, one for the inbound flows, and for an IPv4 NAPT lease one more
// for the outbound flows SNAT-ed to its external endpoint.
func appendCtFilters(dst []ctFilter, l *store.Lease) []ctFilter {
	if l.Kind == store.KindPeer || !l.ExternalAddr.IsValid() || l.ExternalPort == 0 {
		return dst
	}
	t := ctTarget{addr: l.ExternalAddr, proto: l.Protocol, port: l.ExternalPort}
	dst = append(dst, ctFilter{v4: l.ExternalAddr.Is4(), t: t})
	if l.ExternalAddr.Is4() && l.InternalAddr.Is4() && l.InternalPort != 0 {
		dst = append(dst, ctFilter{v4: true, t: t, nat: true, src4: l.InternalAddr.As4(), sport: l.InternalPort})
	}
	return dst
}

// ctFilter is one ended mapping's flows: those whose original destination
// is t or, with nat, those whose reply destination is t and original
// source src4:sport (SNAT-ed to t; IPv4 only, so 6 bytes in the padding
// beside the flags: 40 bytes a filter, as before the SNAT filters, where a
// netip.AddrPort made it 72). The generic walk's netlink filter is made
// from it when that walk runs (kernels before 5.8): made for every ended
// mapping up front, it cost ≈ 0.5 KB of heap each until the walk (maps
// and a net.IP), 1M of them at a start revoking 1 000 000 leases.
type ctFilter struct {
	v4    bool
	nat   bool
	sport uint16
	src4  [4]byte
	t     ctTarget
}

// source is the original source of a nat filter's flows.
func (f ctFilter) source() netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4(f.src4), f.sport)
}

// group is the dump f's flows come back in (ctDeleter.end).
func (f ctFilter) group() ctGroup {
	return ctGroup{v4: f.t.addr.Is4(), proto: f.t.proto, nat: f.nat}
}

// cmpCtFilter orders filters by group, then by what a flow is matched
// against (ctDeleter.end binary-searches a group's run).
func cmpCtFilter(a, b ctFilter) int {
	if a.t.addr.Is4() != b.t.addr.Is4() {
		if a.t.addr.Is4() {
			return -1
		}
		return 1
	}
	if c := cmp.Compare(a.t.proto, b.t.proto); c != 0 {
		return c
	}
	if a.nat != b.nat {
		if !a.nat {
			return -1
		}
		return 1
	}
	if c := a.t.addr.Compare(b.t.addr); c != 0 {
		return c
	}
	if c := cmp.Compare(a.t.port, b.t.port); c != 0 {
		return c
	}
	if c := bytes.Compare(a.src4[:], b.src4[:]); c != 0 {
		return c
	}
	return cmp.Compare(a.sport, b.sport)
}

// netlinkFilter is f as the generic walk's filter; nil if netlink refuses it.
func (f ctFilter) netlinkFilter() netlink.CustomConntrackFilter {
	if f.nat {
		return natFlowFilter{f}
	}
	nf := &netlink.ConntrackFilter{}
	if nf.AddProtocol(f.t.proto) != nil ||
		nf.AddIP(netlink.ConntrackOrigDstIP, net.IP(f.t.addr.AsSlice())) != nil ||
		nf.AddPort(netlink.ConntrackOrigDstPort, f.t.port) != nil {
		return nil
	}
	return nf
}

// natFlowFilter matches the flows of a SNAT filter (netlink's own filter
// has no reply ports).
type natFlowFilter struct{ f ctFilter }

func (n natFlowFilter) MatchConntrackFlow(fl *netlink.ConntrackFlow) bool {
	fw, rv := fl.Forward, fl.Reverse
	src, _ := netip.AddrFromSlice(fw.SrcIP)
	dst, _ := netip.AddrFromSlice(rv.DstIP)
	return fw.Protocol == n.f.t.proto &&
		dst.Unmap() == n.f.t.addr && rv.DstPort == n.f.t.port &&
		src.Unmap() == netip.AddrFrom4(n.f.src4) && fw.SrcPort == n.f.sport
}

// ctFlusher coalesces conntrack flushes. A flush walks (dumps) the whole
// conntrack table in user space whatever the number of mappings ended, so
// one per batch, each in its own goroutine, overlapped ~30 at a time under
// 10 % deletes and took 94 % of pcpd's CPU (BENCHMARKS.md). Now at most one
// walk is in flight; filters queued meanwhile go together in the next one.
// Sequence numbers tell a waiter when its filters were covered.
type ctFlusher struct {
	walk func([]ctFilter) // one walk deleting what matches any filter
	// prune drops, as the walk starts, the filters whose flows a live
	// lease admits again (nil: none dropped): the walk runs after the
	// walks before it, and the same mapping may have been made again
	// meanwhile (TestCtFlushSkipsRemade).
	prune   func([]ctFilter) []ctFilter
	mu      sync.Mutex
	pending []ctFilter
	queued  uint64 // filters sets queued so far
	done    uint64 // all sets up to this one are flushed
	running bool
	waiters []ctWaiter
}

type ctWaiter struct {
	seq uint64
	fn  func()
}

// add queues filters and starts a walk if none is in flight. fs is the
// flusher's from then on (the walk sorts and prunes it in place): with
// nothing pending it is kept as is, not copied (1M filters at a start
// dropping 1M expired leases, 40 MB).
func (c *ctFlusher) add(fs []ctFilter) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pending == nil {
		c.pending = fs
	} else {
		c.pending = append(c.pending, fs...)
	}
	c.queued++
	if !c.running {
		c.running = true
		go c.run()
	}
}

// seq is the sequence number of the last filters queued.
func (c *ctFlusher) seq() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.queued
}

// after calls fn (at once, or from the flusher) when every filter set up to
// seq has been flushed.
func (c *ctFlusher) after(seq uint64, fn func()) {
	c.mu.Lock()
	if c.done >= seq {
		c.mu.Unlock()
		fn()
		return
	}
	c.waiters = append(c.waiters, ctWaiter{seq: seq, fn: fn})
	c.mu.Unlock()
}

func (c *ctFlusher) run() {
	for {
		c.mu.Lock()
		fs, upTo := c.pending, c.queued
		c.pending = nil
		if len(fs) == 0 {
			c.running = false
			c.mu.Unlock()
			return
		}
		c.mu.Unlock()

		if c.prune != nil {
			fs = c.prune(fs)
		}
		if len(fs) > 0 {
			c.walk(fs)
		}

		c.mu.Lock()
		c.done = upTo
		var ready []func()
		kept := c.waiters[:0]
		for _, w := range c.waiters {
			if w.seq <= upTo {
				ready = append(ready, w.fn)
			} else {
				kept = append(kept, w)
			}
		}
		c.waiters = kept
		c.mu.Unlock()
		for _, fn := range ready {
			fn()
		}
	}
}

// walkConntrack deletes the flows matching any of fs. First with the
// kernel filtering (CTA_FILTER: one dump per family, protocol and
// direction, the kernel returns only the flows of that protocol to that
// IPv4 address, or of that port when there is one target, instead of
// every entry copied and parsed here); if the kernel refuses CTA_FILTER,
// with the generic walk.
func (s *Server) walkConntrack(fs []ctFilter) {
	fd := 0
	if nsSet(s.cfg.NetNS) {
		fd = int(s.cfg.NetNS)
	}
	admits := s.partlyHeld(fs)
	if d, err := dialConntrack(fd); err == nil {
		d.admits = admits
		// One dump per family, protocol and direction (each walks the
		// whole table), over its run of fs sorted, duplicates out: maps
		// of the keys took ≈ 400 MB at a start dropping 1 000 000
		// expired leases (BenchmarkStartExpired).
		slices.SortFunc(fs, cmpCtFilter)
		fs = slices.CompactFunc(fs, func(a, b ctFilter) bool { return cmpCtFilter(a, b) == 0 })
		n, ok := 0, true
		for i := 0; i < len(fs); {
			g := fs[i].group()
			j := i + 1
			for j < len(fs) && fs[j].group() == g {
				j++
			}
			k, err := d.end(g, fs[i:j])
			i = j
			n += k
			if err != nil {
				s.log.Debug("conntrack flush (kernel filter)", zap.Error(err))
				if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
					ok = false
					break
				}
			}
		}
		d.close()
		if ok {
			s.m.ctWalks.Inc()
			if n > 0 {
				s.log.Info("ended connections of removed mappings", zap.Int("flows", n))
			}
			return
		}
	}
	s.walkConntrackGeneric(fs, admits)
}

// ctAdmits are, for an endpoint an inbound filter ends the flows to,
// the pinholes of the live leases that hold it when the walk starts (a
// PEER, a FILTERed MAP: pruneLive dropped the filters of endpoints a MAP
// without FILTER holds): the flows they admit are theirs and stay
// (TestE2EMapDeleteKeepsPeerFlow).
type ctAdmits map[ctTarget][]pinhole.Pinhole

// admitted reports whether a live lease's pinhole at t admits flows from
// src.
func (a ctAdmits) admitted(t ctTarget, src netip.AddrPort) bool {
	for _, p := range a[t] {
		if (!p.RemotePrefix.IsValid() || p.RemotePrefix.Contains(src.Addr().Unmap())) &&
			(p.RemotePort == 0 || p.RemotePort == src.Port()) {
			return true
		}
	}
	return false
}

// partlyHeld is the ctAdmits of fs's inbound filters (nil if none is
// held), s.mu taken a chunk at a time as in pruneLive.
func (s *Server) partlyHeld(fs []ctFilter) ctAdmits {
	const step = 4096
	var a ctAdmits
	var buf []store.Lease
	for i := 0; i < len(fs); i += step {
		s.mu.Lock()
		for _, f := range fs[i:min(i+step, len(fs))] {
			e := endpoint{addr: f.t.addr, proto: f.t.proto, port: f.t.port}
			h, held := s.tab.holder(e)
			if f.nat || !held {
				continue
			}
			if _, done := a[f.t]; done {
				continue
			}
			buf = s.tab.onTupleInto(tuple{proto: f.t.proto, addr: h.addr, port: h.port}, buf)
			var ps []pinhole.Pinhole
			for j := range buf {
				if endpointOf(&buf[j]) == e {
					ps = appendPinholes(ps, &buf[j])
				}
			}
			if a == nil {
				a = ctAdmits{}
			}
			a[f.t] = ps
		}
		s.mu.Unlock()
	}
	return a
}

// keepAdmitted is a generic walk's inbound filter that spares the flows
// a live lease admits (ctAdmits).
type keepAdmitted struct {
	nf     netlink.CustomConntrackFilter
	t      ctTarget
	admits ctAdmits
}

func (k keepAdmitted) MatchConntrackFlow(fl *netlink.ConntrackFlow) bool {
	src, _ := netip.AddrFromSlice(fl.Forward.SrcIP)
	return k.nf.MatchConntrackFlow(fl) && !k.admits.admitted(k.t, netip.AddrPortFrom(src.Unmap(), fl.Forward.SrcPort))
}

// walkConntrackGeneric is the walk for kernels without CTA_FILTER: one
// dump of the whole table per address family that has filters.
func (s *Server) walkConntrackGeneric(fs []ctFilter, admits ctAdmits) {
	var h *netlink.Handle
	var err error
	if nsSet(s.cfg.NetNS) {
		h, err = netlink.NewHandleAt(s.cfg.NetNS)
	} else {
		h, err = netlink.NewHandle()
	}
	if err != nil {
		s.log.Debug("conntrack flush", zap.Error(err))
		return
	}
	defer h.Close()
	var n uint
	for _, fam := range []netlink.InetFamily{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		var filters []netlink.CustomConntrackFilter
		for _, f := range fs {
			if f.v4 == (fam == netlink.FAMILY_V4) {
				if nf := f.netlinkFilter(); nf != nil {
					if _, held := admits[f.t]; held && !f.nat {
						nf = keepAdmitted{nf: nf, t: f.t, admits: admits}
					}
					filters = append(filters, nf)
				}
			}
		}
		if len(filters) == 0 {
			continue
		}
		k, err := h.ConntrackDeleteFilters(netlink.ConntrackTable, fam, filters...)
		if err != nil {
			s.log.Debug("conntrack flush", zap.Error(err))
		}
		n += k
	}
	s.m.ctWalks.Inc()
	if n > 0 {
		s.log.Info("ended connections of removed mappings", zap.Uint("flows", n))
	}
}

// waitConntrack blocks until every flush queued so far has run.
func (s *Server) waitConntrack() {
	done := make(chan struct{})
	s.ct.after(s.ct.seq(), func() { close(done) })
	<-done
}
