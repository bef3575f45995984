package server

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/vishvananda/netns"
)

// ErrInvalidConfig marks a configuration mistake found by New.
var ErrInvalidConfig = errors.New("invalid configuration")

// Config is the engine's part of pcpd's configuration. Lifetime clamps,
// quotas, protocol and port rules and THIRD_PARTY belong to the policy
// (package policy); nftables table names to the pinhole backend.
type Config struct {
	// Interfaces to serve on (default wg0), each by its kernel name or
	// one of its alternative names (resolved to the kernel name at every
	// pass of the listener). Every address of each is served, unless
	// Listen narrows them.
	Interfaces []string
	// Listen, if set, lists the only addresses served (port 0 means 5351);
	// each is served on whichever of Interfaces holds it.
	Listen []netip.AddrPort
	// NetNS, if a handle > 0, is the network namespace whose interfaces are
	// served (tests). The zero value and netns.None() serve the process's
	// own namespace.
	NetNS netns.NsHandle

	// ExternalIPv4 is the public IPv4 address for IPv4 mappings (PCP with
	// IPv4 addresses, NAT-PMP). Invalid: IPv4 mappings are refused
	// (MAP-12, VER-02).
	ExternalIPv4 netip.Addr
	// IPv4Ports is the range external IPv4 ports are allocated from
	// (default 1024-65535). Ports outside it, where the host's own services
	// live, are never mapped.
	IPv4Ports PortRange
	// ReservedPorts are never handed out as external IPv4 ports (TCP and
	// UDP), in addition to what is always reserved: 5350/5351, the listen
	// port of each WireGuard interface served, and every port with a
	// listening socket on the host (checked at allocation time).
	ReservedPorts []uint16

	// StrictNonce selects RFC 6887's strict nonce checks (MAP-14, MAP-19,
	// PEER-06). The default (false) is PROTOCOL.md choice (c): a new nonce
	// from the mapping's own authenticated owner replaces the mapping, so a
	// rebooted client is not locked out until its old lease expires; other
	// owners never reach the mapping anyway (NOT_AUTHORIZED by ownership).
	StrictNonce bool

	// Opcode switches (SEC-04). The zero value of each Disable* serves.
	DisableMap    bool // MAP → NOT_AUTHORIZED (MAP-23)
	DisablePeer   bool // PEER → NOT_AUTHORIZED (PEER-08)
	DisableNATPMP bool // version 0 → UNSUPP_VERSION (VER-02)

	// KeepConnections leaves established connections alone when their
	// mapping is deleted, revoked or expires (default: they are ended,
	// PMP-12: inbound flows, and IPv4 outbound flows SNAT-ed to the
	// mapping's external port): no conntrack walk. Standalone, the
	// ruleset still cuts the inbound ones itself (pinhole/cutflows.go,
	// pinhole/natcut.go); their entries and the SNAT-ed flows stay,
	// but for the inbound flows of an external endpoint mapped again to
	// another internal endpoint, whose entries the server deletes before
	// that mapping's install (retarget.go: else they reached their old
	// target through the new mapping's element).
	KeepConnections bool

	// MaxFilters is the FILTER limit per mapping (FLT-06, default 8).
	MaxFilters int
	// DescriptionCap is how many octets of a DESCRIPTION are kept (OPT-09,
	// default 256; RFC 7220 asks for at least 128).
	DescriptionCap int

	// RateLimit and RateBurst bound requests per source address (PKT-08:
	// excess is dropped). Zero: 50 per second, burst 100.
	RateLimit float64
	RateBurst int
	// OwnerBurst is the burst of the per-owner bucket (early.go), all of
	// an owner's sources together; its rate is ownerRateFactor ×
	// RateLimit. Zero: ownerRateFactor × RateBurst. pcpd sets it to at
	// least the per-client lease quota (config), so that a site renewing
	// all of a client's leases at once is answered whole.
	OwnerBurst int
	// RateSources bounds the rate limiter's memory (default 65536 sources).
	RateSources int
	// RatePrefix6 counts IPv6 sources per prefix of this length (default
	// 64): a WireGuard peer may send from any address of its AllowedIPs
	// and must not mint a fresh bucket per address.
	RatePrefix6 int

	// AnnounceMulticast also sends the unsolicited ANNOUNCE (and NAT-PMP
	// address announcement) to the all-hosts multicast groups (ANN-04,
	// PMP-13). WireGuard carries no multicast (ANN-06), so it is off by
	// default; unicast to every known client is always done.
	AnnounceMulticast bool
	// AnnounceGap is the first gap between unsolicited announcements
	// (ANN-05; default and minimum 250 ms, doubling, 10 sends).
	AnnounceGap time.Duration

	// TamperInterval is how often the firewall's health is checked and a
	// tampered table restored (default 5 s). The check dumps nothing: its
	// cost does not grow with the number of pinholes.
	TamperInterval time.Duration
	// NoFirewallWatch turns off the firewall watch (fwwatch.go): by
	// default the kernel's nftables notifications tell pcpd at once of
	// someone else's change to its objects (repaired then, not at the
	// next TamperInterval check) and of pinholes of live leases deleted
	// by hand (put back then, not at the lease's renewal or the audit).
	NoFirewallWatch bool
	// AuditInterval is how often the kernel's pinholes are dumped and
	// compared with the leases (orphans removed, missing ones re-added);
	// also once after start. Default 1 hour. Above 200 000 leases, where
	// the kernel's dump takes minutes, nothing is dumped: every live
	// lease's pinholes are installed again, 256 per hold of the engine
	// lock and kernel transaction (missing ones back, never beyond their
	// leases; ≈ 3.4 s at 1 000 000, the engine waiting ≤ 20 ms), and
	// orphans end with their kernel timeouts (auditbig.go).
	AuditInterval time.Duration
	// HostPortsTTL is how long a scan of the host's ports and read of its
	// DNAT rules is trusted, and how often housekeeping makes them while
	// they are used (default 2 s: hostPortsTTL). For tests.
	HostPortsTTL time.Duration
	// TouchInterval is how often the store is told the daemon is alive
	// (store.Touch), so a clock that went backwards while pcpd was down is
	// noticed at the next start (EPO-04). Default 1 minute.
	TouchInterval time.Duration
	// SnapshotInterval is how often the store writes its last good copy
	// (store.Snapshot); one is also written at graceful shutdown and once
	// the leases are rewritten after a wall-clock step. Default 1 hour.
	SnapshotInterval time.Duration
	// MaxBatch bounds how many requests share one kernel transaction and
	// one fsync (default 256).
	MaxBatch int
	// QueueLen bounds the packets waiting for the engine (default 4096);
	// beyond it packets are dropped (PKT-08).
	QueueLen int

	// loopbackLab leaves a socket serving loopback without the host-own
	// filter (hostOwnFilter), as before h/local9: this package's tests
	// serve their clients, addresses on the namespace's lo, there.
	// Nothing outside the package can set it.
	loopbackLab bool
}

// PortRange is the closed range [First, Last].
type PortRange struct{ First, Last uint16 }

func (r PortRange) contains(p uint16) bool { return p >= r.First && p <= r.Last }

func (c *Config) setDefaults() error {
	if len(c.Interfaces) == 0 {
		c.Interfaces = []string{"wg0"}
	}
	if c.IPv4Ports == (PortRange{}) {
		c.IPv4Ports = PortRange{1024, 65535}
	}
	if c.MaxFilters == 0 {
		c.MaxFilters = 8
	}
	if c.DescriptionCap == 0 {
		c.DescriptionCap = 256
	}
	if c.RateLimit == 0 {
		c.RateLimit = 50
	}
	if c.RateBurst == 0 {
		c.RateBurst = 100
	}
	if c.OwnerBurst == 0 {
		c.OwnerBurst = ownerRateFactor * c.RateBurst
	}
	if c.RateSources == 0 {
		c.RateSources = 65536
	}
	if c.RatePrefix6 == 0 {
		c.RatePrefix6 = 64
	}
	if c.AnnounceGap == 0 {
		c.AnnounceGap = 250 * time.Millisecond
	}
	if c.TamperInterval == 0 {
		c.TamperInterval = 5 * time.Second
	}
	if c.AuditInterval == 0 {
		c.AuditInterval = time.Hour
	}
	if c.TouchInterval == 0 {
		c.TouchInterval = time.Minute
	}
	if c.SnapshotInterval == 0 {
		c.SnapshotInterval = time.Hour
	}
	if c.MaxBatch == 0 {
		c.MaxBatch = 256
	}
	if c.QueueLen == 0 {
		c.QueueLen = 4096
	}
	switch {
	case c.ExternalIPv4.IsValid() && !c.ExternalIPv4.Unmap().Is4():
		return fmt.Errorf("server: external IPv4 %s is not IPv4: %w", c.ExternalIPv4, ErrInvalidConfig)
	case c.IPv4Ports.First == 0 || c.IPv4Ports.First > c.IPv4Ports.Last:
		return fmt.Errorf("server: bad IPv4 port range %d-%d: %w", c.IPv4Ports.First, c.IPv4Ports.Last, ErrInvalidConfig)
	case c.MaxFilters < 1 || c.MaxFilters > 64:
		// ≤ 64 keeps one request's kernel change well inside one
		// transaction (pinhole.MaxBatch).
		return fmt.Errorf("server: filter limit %d: must be 1-64: %w", c.MaxFilters, ErrInvalidConfig)
	case c.DescriptionCap < 128 || c.DescriptionCap > 1016:
		return fmt.Errorf("server: description cap %d: must be 128-1016: %w", c.DescriptionCap, ErrInvalidConfig)
	case c.RateLimit < 0 || c.RateBurst < 1 || c.RateSources < 1 || c.RatePrefix6 < 1 || c.RatePrefix6 > 128:
		return fmt.Errorf("server: bad rate limit: %w", ErrInvalidConfig)
	case c.AnnounceGap < 250*time.Millisecond:
		return fmt.Errorf("server: announce gap %v below 250ms (RFC 6887 §14.1.3): %w", c.AnnounceGap, ErrInvalidConfig)
	case c.MaxBatch < 1 || c.QueueLen < 1 || c.TamperInterval < 0 || c.AuditInterval < 0 || c.HostPortsTTL < 0 || c.TouchInterval < 0 || c.SnapshotInterval < 0:
		return fmt.Errorf("server: bad batch, queue or tamper settings: %w", ErrInvalidConfig)
	}
	c.ExternalIPv4 = c.ExternalIPv4.Unmap()
	for _, a := range c.Listen {
		if !a.Addr().IsValid() {
			return fmt.Errorf("server: bad listen address %s: %w", a, ErrInvalidConfig)
		}
	}
	return nil
}
