package policy

import (
	"context"
	"maps"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"go.uber.org/zap"
)

// HostSet knows the addresses at which a packet reaches the host itself,
// which are never openable (DESIGN.md): a client must not open a pinhole or
// a NAPT mapping to the tunnel host. Its Contains is meant for
// Config.HostAddrs: lookups are one atomic load and a map read; the set is
// re-read by Refresh (Run: at each change of the host's addresses, and
// every HostSetRefresh). The zero value is an empty set, ready to use.
//
// Until a read succeeds, the set is empty and Read is false: a failed
// first read must not let a client open the host (Config.HostAddrsRead,
// Authorize refuses with HostUnread meanwhile, and every THIRD_PARTY
// request, deletes too, with HostSourceUnread). A later failure keeps the
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

	// Every is how often Run re-reads the addresses whatever the
	// address notifications say (0: HostSetRefresh). Set before Run;
	// tests set it long, to see that a notification alone is followed.
	Every time.Duration

	mu     sync.Mutex // serialises Refresh's logging
	warned bool
	gen    atomic.Uint64 // Gen

	// subscribe starts Run's subscription to the address notifications
	// (nil: netlink's, in the calling thread's namespace); policy tests
	// fake it.
	subscribe func(ch chan<- netlink.AddrUpdate, done <-chan struct{}, onErr func(error)) error
}

// HostSetRefresh is how often Run re-reads the host's addresses whatever
// the notifications say: the safety net for those lost.
const HostSetRefresh = 5 * time.Second

const (
	// hostResubscribe is the least time between two of Run's address
	// subscriptions: one that keeps failing at once must not spin.
	hostResubscribe = time.Second
	// hostQueued is how many address notifications wait for Run.
	hostQueued = 64
)

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

// Run follows the host's addresses until ctx is done: those of the
// network namespace of the calling thread, as Refresh. It reads them at
// each address notification (RTM_NEWADDR, RTM_DELADDR), the notifications
// queued together read once, so a MAP of an address the host has just
// taken is refused at once (not in the next periodic read), and every
// Every (HostSetRefresh) whatever they say. netlink's subscription ends
// at its first receive error, an overrun (ENOBUFS: notifications lost)
// included: Run then reads at once and subscribes again (at most once a
// second). If it cannot subscribe (logged once) it reads periodically
// only, and tries again at each periodic read. TestHostSetFollowsNotifications,
// server TestMapRefusedOnceHostTakesAddress.
func (h *HostSet) Run(ctx context.Context) error {
	every := h.Every
	if every <= 0 {
		every = HostSetRefresh
	}
	sub := h.subscribe
	if sub == nil {
		sub = func(ch chan<- netlink.AddrUpdate, done <-chan struct{}, onErr func(error)) error {
			return netlink.AddrSubscribeWithOptions(ch, done, netlink.AddrSubscribeOptions{ErrorCallback: onErr})
		}
	}
	t := time.NewTicker(every)
	defer t.Stop()
	var (
		ch     chan netlink.AddrUpdate // nil: not subscribed
		done   chan struct{}           // closed: the subscription's socket closes
		since  time.Time               // of the last subscription
		retry  <-chan time.Time        // subscribe again when it fires
		failed bool                    // the last subscription failed (logged)
	)
	// follow subscribes, then reads: a change before the subscription
	// is in that read, one after it is notified.
	follow := func() bool {
		retry, since = nil, time.Now()
		c, d := make(chan netlink.AddrUpdate, hostQueued), make(chan struct{})
		onErr := func(err error) {
			select {
			case <-d: // Run closed it
			default:
				if h.Log != nil {
					h.Log.Debug("host address notifications", zap.Error(err))
				}
			}
		}
		if err := sub(c, d, onErr); err != nil {
			close(d)
			if !failed && h.Log != nil {
				h.Log.Warn("cannot follow the host's address changes; re-reading them periodically only", zap.Duration("every", every), zap.Error(err))
			}
			failed = true
			return false
		}
		if failed && h.Log != nil {
			h.Log.Info("following the host's address changes again")
		}
		failed = false
		ch, done = c, d
		h.Refresh()
		return true
	}
	// ended: the subscription is over (its channel closed), or Run is.
	ended := func() {
		close(done) // closes the socket, and ends the library's goroutine
		for range ch {
		}
		ch = nil
	}
	defer func() {
		if ch != nil {
			ended()
		}
	}()
	if !follow() {
		h.Refresh() // on error the last good view stays
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			if ch == nil && retry == nil && follow() {
				continue
			}
			h.Refresh()
		case <-retry:
			if !follow() {
				h.Refresh()
			}
		case _, ok := <-ch:
			// What is queued is one read.
			for more := ok; more; {
				select {
				case _, more = <-ch:
					ok = more
				default:
					more = false
				}
			}
			h.Refresh()
			if !ok {
				// An overrun or another receive error: the read above
				// makes good what was lost.
				ended()
				if wait := hostResubscribe - time.Since(since); wait > 0 {
					retry = time.After(wait)
				} else {
					follow()
				}
			}
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
