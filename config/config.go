// Package config turns pcpd serve's command-line flags and TOML config file
// into one typed, validated Config.
//
// Every flag has a file key of the same name and meaning ("--max-lifetime
// 2h" is "max-lifetime = \"2h\""); a flag given on the command line replaces
// the file's value. Validation reports every mistake at once, one line each,
// before the daemon touches anything: an operator fixing a config file should
// not have to restart pcpd once per typo.
package config

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"go.uber.org/zap/zapcore"
)

// Defaults, shared by flag help, the example config and validation.
const (
	DefaultInterface          = "wg0"
	DefaultNftTable           = "pcpd"
	DefaultNftChain           = "pcpd"
	DefaultStateDir           = "/var/lib/pcpd"
	DefaultSocket             = "/run/pcpd/pcpd.sock"
	DefaultMinLifetime        = 2 * time.Minute
	DefaultMaxLifetime        = 24 * time.Hour
	DefaultMaxLeasesPerClient = 256
	DefaultMaxLeases          = 65536
	DefaultRateLimit          = 50
	DefaultRateBurst          = 100
	DefaultPort               = 5351
	DefaultIPv4PortRange      = "1024-65535"
	// DefaultTouchInterval and DefaultSnapshotInterval are
	// server.Config's own defaults.
	DefaultTouchInterval    = time.Minute
	DefaultSnapshotInterval = time.Hour
)

// Memory limit (--memory-limit). The automatic limit budgets the most the
// daemon should need with max-leases leases: a base for the runtime, the
// sockets, rate limiter and WireGuard state, and per lease the lease table
// (≈ 180 bytes at 1 000 000) with room for the garbage between collections.
const (
	MemoryLimitAuto     = "auto"
	MemoryLimitBase     = 64 << 20
	MemoryLimitPerLease = 256
)

// KernelRateFactor: unless --kernel-rate-limit says otherwise, the kernel's
// request meter allows this many times --rate-limit and --rate-burst, so it
// never drops what pcpd would answer.
const KernelRateFactor = 4

// QuotaBurstCap bounds how far --max-leases-per-client raises the
// per-client bursts (OwnerRateBurst, KernelOwnerRateBurst): a burst lets
// that many of one client's datagrams into pcpd's socket back to back, and
// pcpd's 2 MiB receive buffer holds about 2 500 small ones (RELIABILITY.md
// known bug 5). A site renewing a larger quota at once loses the excess
// to the meters and recovers it by retransmission (RFC 6887 §8.1.1).
const QuotaBurstCap = 2048

// Third-party modes (--third-party).
const (
	// ThirdPartyOff answers every THIRD_PARTY option UNSUPP_OPTION
	// (RFC 6887 §13.1: a server with THIRD_PARTY disabled MUST).
	ThirdPartyOff = "off"
	// ThirdPartyOwned (the default) accepts THIRD_PARTY for addresses inside
	// the requester's own prefixes only (PROTOCOL.md choice (b)): the owner
	// could send from them anyway, so it adds no power (SEC-03).
	ThirdPartyOwned = "owned"
)

// Reverse-path modes of the kernel's owner meter (--kernel-reverse-path,
// pinhole.ReversePath).
const (
	// ReversePathStrict (the default): a request from a client's prefix
	// must arrive on an interface the host routes that prefix through
	// (any next hop's, for a multipath route).
	ReversePathStrict = "strict"
	// ReversePathLoose: the host must have some route back to the source.
	ReversePathLoose = "loose"
	// ReversePathOff: no check.
	ReversePathOff = "off"
)

// Ownership sources, as reported by Config.OwnershipSource.
const (
	OwnershipWireGuard = "wireguard"
	OwnershipStatic    = "static"
)

// ErrInvalid is wrapped by every validation error.
var ErrInvalid = errors.New("invalid configuration")

// Config is pcpd serve's validated configuration. Addresses, prefixes and
// durations are typed; prefixes are masked.
type Config struct {
	// File is the config file that was read, or "".
	File string

	Interfaces []string         // serving interfaces, at least one
	Listen     []netip.AddrPort // explicit listen addresses; empty = every address of Interfaces
	// Clients is static ownership (client name → prefixes). Empty means
	// ownership comes from WireGuard on Interfaces.
	Clients      map[string][]netip.Prefix
	ExternalIPv4 netip.Addr // invalid (zero) when unset: IPv4 mappings refused
	// NAT64Prefixes are the operator's IPv6-to-IPv4 translation prefixes
	// (policy.Config.TranslationPrefixes), masked, IPv6, each of an RFC
	// 6052 length.
	NAT64Prefixes []netip.Prefix

	NftTable  string // table (family inet) pcpd manages in standalone mode
	NftAttach string // attached mode: the admin's existing inet table; "" = standalone
	NftChain  string // attached mode: pcpd's chain (and object name prefix) in NftAttach
	// NftNotrack: standalone, pcpd's own control datagrams are marked
	// untracked (pinhole/notrack.go). Default true.
	NftNotrack bool
	StateDir   string
	Socket     string

	MinLifetime, MaxLifetime      time.Duration
	MaxLeasesPerClient, MaxLeases int
	// MemoryLimit is the Go runtime's soft memory limit in bytes
	// (runtime/debug.SetMemoryLimit); 0 means none. See MemoryLimitAuto.
	MemoryLimit int64
	// RateLimit and RateBurst: requests a second per source (IPv6 /64 or
	// IPv4 address) and the burst allowed above it (PKT-08).
	RateLimit, RateBurst int
	// OwnerRateBurst is the burst of pcpd's own per-client bucket
	// (server.Config.OwnerBurst): policy.OwnerRateFactor times RateBurst,
	// and never below MaxLeasesPerClient (up to QuotaBurstCap), so that
	// a site renewing a client's whole quota at once is answered whole
	// (the bucket binds when the queue fills, as such a burst makes it).
	OwnerRateBurst int
	// KernelRateLimit and KernelRateBurst: the kernel's request meter per
	// source (standalone mode; pinhole.Meter), dropping a flood before it
	// queues in pcpd's socket. KernelRateLimit 0 is off. By default
	// KernelRateFactor times RateLimit; KernelRateBurst is always
	// KernelRateFactor times RateBurst.
	KernelRateLimit, KernelRateBurst int
	// KernelOwnerRateLimit and KernelOwnerRateBurst: the kernel's meter per
	// client (owner), all its sources together (pinhole.Meter.OwnerRate).
	// By default what pcpd's own per-owner bucket admits,
	// policy.OwnerRateFactor times RateLimit and RateBurst (at least the
	// per-source meter's); 0 when the kernel meter is off. A set rate has
	// twice its rate as burst. The burst is never below
	// MaxLeasesPerClient, up to QuotaBurstCap (a client's whole quota
	// renewed at once).
	KernelOwnerRateLimit, KernelOwnerRateBurst int
	// KernelUnownedRateLimit and KernelUnownedRateBurst: the kernel's
	// meter for every source no client owns, all together, as one client
	// (pinhole.Meter.UnownedRate; review S4). By default what pcpd's own
	// bucket for them admits (one client's: policy.OwnerRateFactor times
	// RateLimit, burst OwnerRateBurst, at least the per-source meter's),
	// whatever KernelOwnerRateLimit says; a set rate has twice its rate as
	// burst. 0 when the kernel meter is off.
	KernelUnownedRateLimit, KernelUnownedRateBurst int
	// KernelReversePath is the kernel owner meter's reverse-path check:
	// ReversePathStrict, ReversePathLoose or ReversePathOff.
	KernelReversePath         string
	IPv4PortLow, IPv4PortHigh uint16
	// AllowPorts, if set, are the only internal ports that may be opened;
	// DenyPorts never are. Each entry is a closed range [0] to [1].
	AllowPorts, DenyPorts [][2]uint16
	AllowAllPorts         bool // port 0 (all ports) mappings
	// ReservedPorts are never allocated as external IPv4 ports, in
	// addition to the host's listening ports; sorted, without repeats.
	ReservedPorts []uint16

	// WireGuardGoneGrace: how long a served WireGuard interface that
	// disappeared keeps its last peers owning their AllowedIPs for the
	// ownership sweep (policy.WithGoneGrace); 0: none.
	WireGuardGoneGrace time.Duration

	// WireGuardFresh: how old a read of the WireGuard peers a request
	// that opens or extends a pinhole may be judged by
	// (policy.WithFreshBound; THIRD_PARTY targets only before h/fresh);
	// 0: a read begun after the request.
	WireGuardFresh time.Duration

	// TouchInterval: how often the store records that the daemon is
	// alive (EPO-04 clock-doubt detection at the next start).
	// SnapshotInterval: how often the state's backup copy is written.
	TouchInterval, SnapshotInterval time.Duration

	// FirewallCheckInterval: how often the firewall's health is checked
	// and tampering undone (server.Config.TamperInterval).
	FirewallCheckInterval time.Duration
	// FirewallWatch: follow the kernel's nftables notifications
	// (server.Config.NoFirewallWatch false).
	FirewallWatch bool

	Metrics  string // host:port for Prometheus /metrics; "" = off
	LogLevel zapcore.Level

	StrictNonce   bool   // RFC nonce checks (MAP-14, MAP-19, PEER-06) instead of choice (c)
	ThirdParty    string // ThirdPartyOff or ThirdPartyOwned
	DisableMap    bool
	DisablePeer   bool
	DisableNATPMP bool
}

// OwnershipSource says where ownership comes from: static clients when any
// are configured, else WireGuard.
func (c *Config) OwnershipSource() string {
	if len(c.Clients) > 0 {
		return OwnershipStatic
	}
	return OwnershipWireGuard
}

// Attached reports whether pcpd attaches to an existing nftables table.
func (c *Config) Attached() bool { return c.NftAttach != "" }

// Table is the nftables table pcpd's objects live in.
func (c *Config) Table() string {
	if c.Attached() {
		return c.NftAttach
	}
	return c.NftTable
}

// Errors is every mistake found in a configuration, in a stable order.
type Errors []error

func (e Errors) Error() string {
	if len(e) == 1 {
		return e[0].Error()
	}
	return fmt.Sprintf("%v (and %d more)", e[0], len(e)-1)
}

// Unwrap lets errors.Is see ErrInvalid through an Errors value.
func (e Errors) Unwrap() []error { return e }
