package server

import (
	"errors"
	"net"
	"sync"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/store"
)

// flushConntrack ends the connections that came in through mappings a
// client deleted or the server revoked: the guard lets established flows
// pass, so without this a deleted NAT-PMP mapping (PMP-12) or a revoked
// address (LIFE-05) would keep its open connections. Only flows whose
// original destination is the mapping's external endpoint are touched:
// connections the client opened itself are left alone, and so are PEER
// mappings. Expiry does not flush: the kernel ends pinholes on time even
// with pcpd dead, and the same must hold with it alive.
//
// It only queues the flush (the tx calls it under s.mu); the conntrack
// flusher runs it. Replies of the batch wait for it (serveBatch,
// HandleBatch: waitConntrack), so a connection cannot carry data after its
// delete was acknowledged (PMP-12, found by the conformance suite).
func (s *Server) flushConntrack(ended []store.Lease) {
	if s.cfg.KeepConnections {
		return
	}
	var fs []ctFilter
	for i := range ended {
		if f, ok := ctFilterOf(&ended[i]); ok {
			fs = append(fs, f)
		}
	}
	if len(fs) > 0 {
		s.ct.add(fs)
	}
}

// ctFilterOf is the flush filter of l's connections (flushConntrack);
// false for a lease whose connections are not flushed.
func ctFilterOf(l *store.Lease) (ctFilter, bool) {
	if l.Kind == store.KindPeer || !l.ExternalAddr.IsValid() || l.ExternalPort == 0 {
		return ctFilter{}, false
	}
	return ctFilter{v4: l.ExternalAddr.Is4(), t: ctTarget{addr: l.ExternalAddr, proto: l.Protocol, port: l.ExternalPort}}, true
}

// ctFilter is one ended mapping's flows: those whose original destination
// is t. The generic walk's netlink filter is made from it when that walk
// runs (kernels before 5.8): made for every ended mapping up front, it
// cost ≈ 0.5 KB of heap each until the walk (maps and a net.IP), 1M of
// them at a start revoking 1 000 000 leases.
type ctFilter struct {
	v4 bool
	t  ctTarget
}

// netlinkFilter is f as the generic walk's filter; nil if netlink refuses it.
func (f ctFilter) netlinkFilter() *netlink.ConntrackFilter {
	nf := &netlink.ConntrackFilter{}
	if nf.AddProtocol(f.t.proto) != nil ||
		nf.AddIP(netlink.ConntrackOrigDstIP, net.IP(f.t.addr.AsSlice())) != nil ||
		nf.AddPort(netlink.ConntrackOrigDstPort, f.t.port) != nil {
		return nil
	}
	return nf
}

// ctFlusher coalesces conntrack flushes. A flush walks (dumps) the whole
// conntrack table in user space whatever the number of mappings ended, so
// one per batch, each in its own goroutine, overlapped ~30 at a time under
// 10 % deletes and took 94 % of pcpd's CPU (BENCHMARKS.md). Now at most one
// walk is in flight; filters queued meanwhile go together in the next one.
// Sequence numbers tell a waiter when its filters were covered.
type ctFlusher struct {
	walk    func([]ctFilter) // one walk deleting what matches any filter
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

// add queues filters and starts a walk if none is in flight.
func (c *ctFlusher) add(fs []ctFilter) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.pending = append(c.pending, fs...)
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

		c.walk(fs)

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
// kernel filtering (CTA_FILTER: one dump per family and protocol, the
// kernel returns only the flows of that protocol, or of that port when
// there is one target, instead of every entry copied and parsed here); if
// the kernel refuses CTA_FILTER, with the generic walk.
func (s *Server) walkConntrack(fs []ctFilter) {
	fd := 0
	if nsSet(s.cfg.NetNS) {
		fd = int(s.cfg.NetNS)
	}
	if d, err := dialConntrack(fd); err == nil {
		// One dump per family and protocol (each walks the whole table).
		type group struct {
			v4    bool
			proto uint8
		}
		groups := map[group][]ctTarget{}
		seen := map[ctTarget]bool{}
		for _, f := range fs {
			if !seen[f.t] {
				seen[f.t] = true
				g := group{f.t.addr.Is4(), f.t.proto}
				groups[g] = append(groups[g], f.t)
			}
		}
		n, ok := 0, true
		for _, ts := range groups {
			k, err := d.end(ts)
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
	s.walkConntrackGeneric(fs)
}

// walkConntrackGeneric is the walk for kernels without CTA_FILTER: one
// dump of the whole table per address family that has filters.
func (s *Server) walkConntrackGeneric(fs []ctFilter) {
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
