package main

import (
	"context"
	"net"
	"net/netip"
	"sync/atomic"
	"time"
)

// hostAddrs knows the host's own addresses, which are never openable
// (DESIGN.md): a client must not open a pinhole to the tunnel host itself.
// policy asks on every request, so lookups are one atomic load and a map
// read; the set is re-read every few seconds.
type hostAddrs struct {
	set atomic.Pointer[map[netip.Addr]struct{}]
}

const hostAddrsRefresh = 5 * time.Second

func newHostAddrs() *hostAddrs {
	h := &hostAddrs{}
	h.refresh()
	return h
}

func (h *hostAddrs) refresh() {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return // keep the last good view
	}
	m := make(map[netip.Addr]struct{}, len(addrs))
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			m[p.Addr().Unmap()] = struct{}{}
		}
	}
	h.set.Store(&m)
}

func (h *hostAddrs) contains(a netip.Addr) bool {
	m := h.set.Load()
	if m == nil {
		return false
	}
	_, ok := (*m)[a.Unmap().WithZone("")]
	return ok
}

func (h *hostAddrs) run(ctx context.Context) error {
	t := time.NewTicker(hostAddrsRefresh)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			h.refresh()
		}
	}
}
