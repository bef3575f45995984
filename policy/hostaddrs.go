package policy

import (
	"context"
	"maps"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// HostSet knows the addresses at which a packet reaches the host itself,
// which are never openable (DESIGN.md): a client must not open a pinhole or
// a NAPT mapping to the tunnel host. Its Contains is meant for
// Config.HostAddrs: lookups are one atomic load and a map read; the set is
// re-read by Refresh (Run: every few seconds). The zero value is an empty
// set, ready to use.
//
// Until a read succeeds, the set is empty and Read is false: a failed
// first read must not let a client open the host (Config.HostAddrsRead,
// Authorize refuses with HostUnread meanwhile). A later failure keeps the
// last good set. Log, if set before the first Refresh, is told of a
// failure while unread (once) and of the first read after it.
// TestAuthorizeRefusedUntilHostRead, server TestMapRefusedUntilHostRead.
//
// The host is reached not only at its unicast addresses but also at the
// broadcast addresses of its IPv4 subnets: a NAPT mapping DNAT-ed to
// 10.100.0.255 of the host's 10.100.0.1/24 is routed as a local broadcast
// and every host socket bound to the wildcard address on that port
// receives the internet's datagrams (TestNAPTToSubnetBroadcast). So the
// set also holds, for each of the host's addresses, those derived from its
// prefix (hostReached).
type HostSet struct {
	set atomic.Pointer[map[netip.Addr]struct{}]
	Log *zap.Logger
	// Addrs lists the host's addresses; nil: net.InterfaceAddrs. Set
	// before the first Refresh (tests inject failures).
	Addrs func() ([]net.Addr, error)

	mu     sync.Mutex // serialises Refresh's logging
	warned bool
	gen    atomic.Uint64 // Gen
}

// HostSetRefresh is how often Run re-reads the host's addresses.
const HostSetRefresh = 5 * time.Second

// Refresh re-reads the host's addresses: those of the network namespace of
// the calling thread. On error the last good set is kept.
func (h *HostSet) Refresh() error {
	read := h.Addrs
	if read == nil {
		read = net.InterfaceAddrs
	}
	addrs, err := read()
	h.mu.Lock()
	defer h.mu.Unlock()
	if err != nil {
		if !h.Read() && !h.warned && h.Log != nil {
			h.Log.Warn("cannot read the host's addresses; MAP and PEER requests are refused (NO_RESOURCES) until a read succeeds", zap.Error(err))
		}
		h.warned = true
		return err
	}
	ps := make([]netip.Prefix, 0, len(addrs))
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			ps = append(ps, p)
		}
	}
	m := hostReached(ps)
	if !h.Read() && h.warned && h.Log != nil {
		h.Log.Info("read the host's addresses; MAP and PEER requests are served again")
	}
	old := h.set.Load()
	h.set.Store(&m)
	if old == nil || !maps.Equal(*old, m) {
		h.gen.Add(1)
	}
	return nil
}

// Gen counts the reads that changed the set (the first good read
// included): 0 until a read succeeds (Config.HostAddrsGen). Safe for
// concurrent use.
func (h *HostSet) Gen() uint64 { return h.gen.Load() }

// Read reports whether a read of the host's addresses has succeeded
// (Config.HostAddrsRead). Safe for concurrent use.
func (h *HostSet) Read() bool { return h.set.Load() != nil }

// Contains reports whether a reaches the host. Safe for concurrent use.
func (h *HostSet) Contains(a netip.Addr) bool {
	m := h.set.Load()
	if m == nil {
		return false
	}
	_, ok := (*m)[a.Unmap().WithZone("")]
	return ok
}

// Run refreshes the set every HostSetRefresh until ctx is done.
func (h *HostSet) Run(ctx context.Context) error {
	t := time.NewTicker(HostSetRefresh)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			h.Refresh() // on error the last good view stays
		}
	}
}

// hostReached returns the addresses that reach a host holding the
// interface addresses ps (address and prefix length each):
//
//   - each address itself;
//   - for an IPv4 prefix shorter than /31, the subnet's broadcast address
//     (host part all ones) and its network address (all zeros: the old
//     BSD broadcast, which hosts should accept, RFC 1122 §3.3.6). A /31
//     (RFC 3021) has neither: its other address is the peer; a /32 only
//     the address itself;
//   - for an IPv6 prefix shorter than /127, its subnet-router anycast
//     address (interface identifier all zeros, RFC 4291 §2.6.1), which
//     Linux joins on a forwarding host. A /127 has none (RFC 6164 §5).
func hostReached(ps []netip.Prefix) map[netip.Addr]struct{} {
	m := make(map[netip.Addr]struct{}, 3*len(ps))
	for _, p := range ps {
		a, bits := p.Addr().WithZone(""), p.Bits()
		m[a.Unmap()] = struct{}{}
		switch {
		case bits < 0 || a.Is4In6():
		case a.Is4() && bits < 31:
			first := netip.PrefixFrom(a, bits).Masked().Addr()
			m[first] = struct{}{}
			m[lastOf(first, bits)] = struct{}{}
		case a.Is6() && bits < 127:
			m[netip.PrefixFrom(a, bits).Masked().Addr()] = struct{}{}
		}
	}
	return m
}

// lastOf returns the last address of the IPv4 prefix net/bits.
func lastOf(first netip.Addr, bits int) netip.Addr {
	b := first.As4()
	host := uint32(1)<<(32-bits) - 1
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}
