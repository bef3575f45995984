package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"time"
)

// Reason is the outcome of a policy decision. The engine maps reasons to
// PCP and NAT-PMP result codes in one place; this package only says why.
type Reason uint8

const (
	Allowed            Reason = iota // the request may proceed
	NoOwner                          // the source belongs to no owner (NOT_AUTHORIZED)
	NotOwned                         // the address to open belongs to another owner or none (NOT_AUTHORIZED, TP-03)
	NeverOpenable                    // the address is in a never-openable class (NOT_AUTHORIZED, TP-03)
	ThirdPartyDenied                 // THIRD_PARTY is switched off (UNSUPP_OPTION, TP-02 / OPT-08)
	ProtocolDenied                   // protocol not in the allowed list (UNSUPP_PROTOCOL, MAP-04)
	PortDenied                       // port outside the allowed or inside the denied ranges (NOT_AUTHORIZED)
	AllPortsDenied                   // port 0 (all ports) not allowed (UNSUPP_PROTOCOL, MAP-05)
	AllProtocolsDenied               // protocol 0 (all protocols) not allowed (UNSUPP_PROTOCOL, MAP-05)
	ClientQuota                      // per-client lease limit reached (USER_EX_QUOTA, MAP-15)
	GlobalQuota                      // global lease limit reached (NO_RESOURCES, MAP-15)
	HostUnread                       // the host's addresses not read yet (NO_RESOURCES): Config.HostAddrsRead
	PeersUnread                      // a THIRD_PARTY target while WireGuard's peers cannot be read fresh (NO_RESOURCES): WireGuard.Unsure
	HostSourceUnread                 // a THIRD_PARTY request, a delete too, while the host's addresses are unread: its source may be the host's (NO_RESOURCES)
	numReasons
)

var reasonNames = [numReasons]string{
	Allowed:            "allowed",
	NoOwner:            "no-owner",
	NotOwned:           "not-owned",
	NeverOpenable:      "never-openable",
	ThirdPartyDenied:   "third-party-denied",
	ProtocolDenied:     "protocol-denied",
	PortDenied:         "port-denied",
	AllPortsDenied:     "all-ports-denied",
	AllProtocolsDenied: "all-protocols-denied",
	ClientQuota:        "client-quota",
	GlobalQuota:        "global-quota",
	HostUnread:         "host-addresses-unread",
	PeersUnread:        "peers-unread",
	HostSourceUnread:   "host-source-unread",
}

func (r Reason) String() string {
	if r < numReasons {
		return reasonNames[r]
	}
	return fmt.Sprintf("Reason(%d)", uint8(r))
}

// ThirdPartyMode says whether the THIRD_PARTY option may be used.
type ThirdPartyMode uint8

const (
	// ThirdPartyOwned (the default) allows THIRD_PARTY only for addresses the
	// requester itself owns (PROTOCOL.md choice (b)): it adds no power, since
	// the owner could send from that address anyway (SEC-03).
	ThirdPartyOwned ThirdPartyMode = iota
	// ThirdPartyOff refuses THIRD_PARTY; the engine answers UNSUPP_OPTION (TP-02).
	ThirdPartyOff
)

func (m ThirdPartyMode) String() string {
	switch m {
	case ThirdPartyOwned:
		return "owned"
	case ThirdPartyOff:
		return "off"
	}
	return fmt.Sprintf("ThirdPartyMode(%d)", uint8(m))
}

// PortRange is the closed range [First, Last] of ports, First >= 1.
type PortRange struct{ First, Last uint16 }

func (r PortRange) String() string {
	if r.First == r.Last {
		return fmt.Sprint(r.First)
	}
	return fmt.Sprintf("%d-%d", r.First, r.Last)
}

// Request is what Authorize judges.
type Request struct {
	Source netip.Addr // packet source; an IPv4-mapped source is unmapped first
	// Iface is the kernel name of the interface the request arrived on.
	// The source's owner must hold it there when the ownership is bound
	// to interfaces (InterfaceLookup; WireGuard): "" (unknown) then
	// matches no owner, NoOwner. Static ownership ignores it.
	Iface string
	// Target is the address to open: the PCP Client IP (== Source after the
	// engine's ADDRESS_MISMATCH check) or the THIRD_PARTY address.
	Target     netip.Addr
	ThirdParty bool // Target came from a THIRD_PARTY option
	// Delete marks a delete (a MAP or NAT-PMP request of lifetime 0):
	// its THIRD_PARTY target need only be the requester's in Lookup, a
	// prefix held by a gone interface in its grace included. It opens
	// nothing, and ends only the requester's own owner's lease
	// (TestE2EThirdPartyDeleteWhileHeld).
	Delete   bool
	Protocol uint8 // IANA protocol number; 0 = all protocols
	// InternalPort is the port to open on Target; 0 = all ports.
	InternalPort uint16
	// ExternalPort is the external port the engine is about to assign, 0 if
	// not chosen yet (not checked). Do not pass a mere suggestion: a
	// suggestion never causes failure (MAP-09); filter candidates with
	// PortAllowed instead.
	ExternalPort uint16
}

// Defaults applied by New to zero Config fields.
const (
	DefaultMinLifetime        = 120 * time.Second // RFC 6887 §15 SHOULD, LIFE-01
	DefaultMaxLifetime        = 24 * time.Hour
	DefaultMaxLeasesPerClient = 256
	DefaultMaxLeases          = 65536
	// LongestMaxLifetime bounds MaxLifetime: every granted lifetime becomes
	// a kernel element timeout, and the firewall takes at most 365 days
	// (pinhole.maxTimeout, kept far below the kernel's jiffies limit). The
	// 32-bit PCP lifetime field would hold 136 years; a longer grant was
	// accepted here, then failed in the kernel (NO_RESOURCES). A client
	// asking for more is clamped to it (LIFE-01: the server MAY grant less).
	LongestMaxLifetime = 365 * 24 * time.Hour
)

// DefaultProtocols are allowed when Config.AllowedProtocols is empty: TCP and
// UDP (MAP-04).
var DefaultProtocols = []uint8{6, 17}

// Config holds the operator's rules. The zero value is the safe default.
type Config struct {
	MinLifetime, MaxLifetime time.Duration // zero: 120 s and 24 h
	// Lease limits; zero selects the default. State is always bounded
	// (SEC-04), so there is no "unlimited".
	MaxLeasesPerClient, MaxLeases int
	AllowedProtocols              []uint8 // empty: DefaultProtocols; 0 is not a protocol here (see AllowAllProtocols)
	// AllowPorts, if non-empty, lists the only ports that may be opened;
	// DenyPorts are refused even inside AllowPorts.
	AllowPorts, DenyPorts []PortRange
	// AllowAllPorts allows port 0 (all ports) mappings; default no
	// (MAP-05). Ineffective when AllowPorts or DenyPorts exclude any port:
	// such a mapping would open those too (all-ports-denied). pcpd's
	// configuration refuses that combination at start (config).
	AllowAllPorts     bool
	AllowAllProtocols bool // allow protocol 0 (all protocols) mappings; default no (MAP-05)
	ThirdParty        ThirdPartyMode
	// DenyDocumentation makes the documentation and benchmarking ranges
	// never openable. Off by default: tests and labs use 2001:db8::/32.
	DenyDocumentation bool
	// TranslationPrefixes are IPv6 prefixes the host or its network
	// translates to IPv4 (a network-specific NAT64 or SIIT prefix, RFC
	// 6052 §2.2): their addresses stand for IPv4 hosts, and are never
	// openable, as those of 64:ff9b::/96, 64:ff9b:1::/48 and ::/96 always
	// are. IPv6 only.
	TranslationPrefixes []netip.Prefix
	// HostAddrs reports whether an address is one of the host's own; such
	// addresses are never openable. Called on every request: it must be
	// fast and safe for concurrent use. Nil: no host addresses.
	HostAddrs func(netip.Addr) bool
	// HostAddrsRead reports whether HostAddrs knows the host's addresses
	// (HostSet.Read: a read has succeeded). Until it does, an empty set
	// would let a client open the host itself, so Authorize refuses what
	// it would otherwise allow with HostUnread (NO_RESOURCES, a short
	// error: the client retries); every THIRD_PARTY request, a delete
	// too, it refuses with HostSourceUnread (its source may be the
	// host's: hostSource). Called on every request allowed so far and
	// every THIRD_PARTY one: fast and safe for concurrent use. Nil:
	// always read.
	HostAddrsRead func() bool
	// HostAddrsGen changes whenever HostAddrs' answers may have
	// (HostSet.Gen): the server's sweep then checks every lease's
	// target again (Policy.NeverOpenable) and revokes those the host now
	// reaches. Nil: never changes.
	HostAddrsGen func() uint64
}

// Policy applies Config over an Ownership. It is immutable and safe for
// concurrent use.
type Policy struct {
	own       Ownership
	onIface   InterfaceLookup // own, when it is one (nil: own.Lookup, interfaces unknown)
	fast      tableSource     // own, when it exposes its table (no interface copies of Owner)
	fresher   freshener       // own, when its view may lag (WireGuard)
	minLife   time.Duration
	maxLife   time.Duration
	maxClient int
	maxAll    int
	proto     [256]bool
	allPorts  bool
	allProtos bool
	ports     [65536 / 64]uint64 // bit set: port allowed
	tp        ThirdPartyMode
	denyDoc   bool
	xlat      []netip.Prefix // Config.TranslationPrefixes, masked
	host      func(netip.Addr) bool
	hostRead  func() bool
	hostGen   func() uint64
}

// tableSource is implemented by this package's ownerships so that Authorize
// can compare owner indices in one table snapshot instead of copying Owners.
type tableSource interface {
	current() *table
	miss()
}

// New validates cfg, applies defaults and returns a Policy over own.
func New(cfg Config, own Ownership) (*Policy, error) {
	if own == nil {
		return nil, fmt.Errorf("policy: nil ownership: %w", ErrInvalidConfig)
	}
	p := &Policy{
		own:       own,
		minLife:   cfg.MinLifetime,
		maxLife:   cfg.MaxLifetime,
		maxClient: cfg.MaxLeasesPerClient,
		maxAll:    cfg.MaxLeases,
		allPorts:  cfg.AllowAllPorts,
		allProtos: cfg.AllowAllProtocols,
		tp:        cfg.ThirdParty,
		denyDoc:   cfg.DenyDocumentation,
		host:      cfg.HostAddrs,
		hostRead:  cfg.HostAddrsRead,
		hostGen:   cfg.HostAddrsGen,
	}
	for _, t := range cfg.TranslationPrefixes {
		if !t.IsValid() || !t.Addr().Is6() || t.Addr().Is4In6() || t.Addr().Zone() != "" {
			return nil, fmt.Errorf("policy: translation prefix %v: want an IPv6 prefix: %w", t, ErrInvalidConfig)
		}
		p.xlat = append(p.xlat, t.Masked())
	}
	if ts, ok := own.(tableSource); ok {
		p.fast = ts
	}
	if il, ok := own.(InterfaceLookup); ok {
		p.onIface = il
	}
	if f, ok := own.(freshener); ok {
		p.fresher = f
	}
	if p.minLife == 0 {
		p.minLife = DefaultMinLifetime
	}
	if p.maxLife == 0 {
		p.maxLife = DefaultMaxLifetime
	}
	switch {
	case p.minLife < 0 || p.maxLife < 0:
		return nil, fmt.Errorf("policy: negative lifetime bound: %w", ErrInvalidConfig)
	case p.minLife > p.maxLife:
		return nil, fmt.Errorf("policy: min lifetime %v exceeds max lifetime %v: %w", p.minLife, p.maxLife, ErrInvalidConfig)
	case p.maxLife > LongestMaxLifetime:
		return nil, fmt.Errorf("policy: max lifetime %v exceeds %v (365 days, the longest kernel element timeout): %w", p.maxLife, LongestMaxLifetime, ErrInvalidConfig)
	}
	if p.maxClient == 0 {
		p.maxClient = DefaultMaxLeasesPerClient
	}
	if p.maxAll == 0 {
		p.maxAll = DefaultMaxLeases
	}
	if p.maxClient < 0 || p.maxAll < 0 {
		return nil, fmt.Errorf("policy: negative lease limit: %w", ErrInvalidConfig)
	}
	if p.tp > ThirdPartyOff {
		return nil, fmt.Errorf("policy: unknown third-party mode %d: %w", p.tp, ErrInvalidConfig)
	}
	protos := cfg.AllowedProtocols
	if len(protos) == 0 {
		protos = DefaultProtocols
	}
	for _, n := range protos {
		if n == 0 {
			return nil, fmt.Errorf("policy: protocol 0 in allowed protocols (use all-protocols instead): %w", ErrInvalidConfig)
		}
		p.proto[n] = true
	}
	for _, r := range append(append([]PortRange(nil), cfg.AllowPorts...), cfg.DenyPorts...) {
		if r.First == 0 || r.First > r.Last {
			return nil, fmt.Errorf("policy: bad port range %d-%d: %w", r.First, r.Last, ErrInvalidConfig)
		}
	}
	setPorts := func(r PortRange, on bool) {
		for q := int(r.First); q <= int(r.Last); q++ {
			if on {
				p.ports[q/64] |= 1 << (q % 64)
			} else {
				p.ports[q/64] &^= 1 << (q % 64)
			}
		}
	}
	if len(cfg.AllowPorts) == 0 {
		setPorts(PortRange{1, 65535}, true)
	}
	for _, r := range cfg.AllowPorts {
		setPorts(r, true)
	}
	for _, r := range cfg.DenyPorts {
		setPorts(r, false)
	}
	// An all-ports mapping opens every port of its protocol: it is not
	// grantable whole when the port rules keep any port closed, which
	// MAP-05 answers UNSUPP_PROTOCOL (as for UDP, whose 5350/5351 are
	// never opened: MAP-10), so the client may fall back to the single
	// ports it needs. Granting it would open, in the kernel, the ports
	// --deny-ports and --allow-ports refuse alone (NOT_AUTHORIZED).
	p.allPorts = p.allPorts && p.ports[0]|1 == ^uint64(0) && !slices.ContainsFunc(p.ports[1:], func(w uint64) bool { return w != ^uint64(0) })
	return p, nil
}

// Ownership returns the ownership the policy consults.
func (p *Policy) Ownership() Ownership { return p.own }

// ThirdPartyMode returns the configured THIRD_PARTY mode.
func (p *Policy) ThirdPartyMode() ThirdPartyMode { return p.tp }

// PortAllowed reports whether port (≥ 1) may be opened under the port rules.
// The engine uses it to skip unusable suggested external ports (MAP-09).
func (p *Policy) PortAllowed(port uint16) bool {
	return p.ports[port/64]&(1<<(port%64)) != 0
}

// freshener is an ownership whose view may lag (WireGuard): Freshen
// re-reads it when older than its bound, Unsure says it could not.
type freshener interface {
	Freshen() bool
	FreshenAt(at time.Time) bool
	Stale() bool
	SwapPending() bool
	Unsure() bool
}

// Freshen makes the ownership's view fresh enough to judge a THIRD_PARTY
// target by, when it is one that lags (WireGuard: re-read when older
// than its fresh bound, one read for all callers, WireGuard.Freshen);
// it does nothing for others. It is called before Authorize of a
// THIRD_PARTY request that opens something, never by the engine nor the
// socket readers (the server's THIRD_PARTY queue calls FreshenAt): it may
// wait for a read (at most the ownership's fresh wait).
// When no fresh view could be had (the read failed, or still runs after
// the wait), Authorize refuses THIRD_PARTY targets with PeersUnread.
func (p *Policy) Freshen() {
	if p.fresher != nil {
		p.fresher.Freshen()
	}
}

// FreshenAt is Freshen for a request that arrived at at (time.Now's
// reading when it was received): any read begun within the fresh bound
// before at serves it (WireGuard.FreshenAt), one begun while the request
// waited in a queue included. The server's THIRD_PARTY queue calls it,
// not the socket readers.
func (p *Policy) FreshenAt(at time.Time) {
	if p.fresher != nil {
		p.fresher.FreshenAt(at)
	}
}

// Stale reports, without waiting, whether a request that opens or
// extends a pinhole (since h/fresh every one, THIRD_PARTY or not) judged
// now needs Freshen first (WireGuard.Stale): the socket readers then hand
// the request to the server's THIRD_PARTY queue rather than wait for the
// read themselves. Each call counts as such a request: while they come,
// the ownership keeps its view fresh itself (WireGuard.keepFresh). False
// for an ownership that does not lag.
func (p *Policy) Stale() bool { return p.fresher != nil && p.fresher.Stale() }

// SwapPending reports, without waiting, whether the ownership's view
// was read before its last device change (WireGuard.SwapPending: a
// served WireGuard interface swapped, back from another namespace, or
// not the one the listener first served) and so takes no request
// arriving there as anybody's until the next read: the server then has
// a delete wait for that read (FreshenAt) as Stale has a request that
// opens a pinhole. False for an ownership that does not lag.
func (p *Policy) SwapPending() bool { return p.fresher != nil && p.fresher.SwapPending() }

// Requester returns the owner a request from src that arrived on the
// interface whose kernel name is iface is taken as: Authorize's owner of
// r.Source (InterfaceLookup.LookupOn when the ownership has it, else
// Lookup). src is unmapped first. A source inside a translation prefix
// is nobody's (translated).
func (p *Policy) Requester(src netip.Addr, iface string) (Owner, bool) {
	src = src.Unmap()
	if p.translated(src) {
		return Owner{}, false
	}
	if p.onIface != nil {
		return p.onIface.LookupOn(src, iface)
	}
	return p.own.Lookup(src)
}

// Authorize decides whether r.Source, arriving on r.Iface, may open
// r.Target for r.Protocol and ports. It returns the requester's owner
// (zero if NoOwner) and the reason. Checks run in MAP-01 order:
// THIRD_PARTY switch, ownership of the source (on its interface:
// Requester), never-openable target, same owner (a THIRD_PARTY target
// on any interface there, the arrival one or another, but not one held
// only by a gone interface in its grace, WithGoneGrace, unless r.Delete),
// protocol, ports; last, a request all of these allow is refused
// (HostUnread) while the host's addresses have not been read
// (Config.HostAddrsRead): the never-openable check could not see the
// host's own. It does not allocate and takes no lock.
func (p *Policy) Authorize(r Request) (Owner, Reason) {
	if r.ThirdParty && p.tp == ThirdPartyOff {
		return Owner{}, ThirdPartyDenied
	}
	src := r.Source.Unmap()
	var o Owner
	if p.fast != nil {
		t := p.fast.current()
		si := noOwner
		if src.IsValid() && src.Zone() == "" {
			// translated, by hand: it is not inlined, and the common
			// source (global unicast, no --nat64-prefix) pays one octet
			// compare.
			if (src.As16()[0] == 0 || len(p.xlat) != 0) && p.translatedSearch(src) {
				return Owner{}, NoOwner // no re-read (miss) finds it an owner
			}
			si = t.findOn(src, r.Iface)
		}
		if si < 0 {
			p.fast.miss()
			return Owner{}, NoOwner
		}
		o = t.owners[si]
		if p.neverOpenable(r.Target) {
			return o, NeverOpenable
		}
		// The common case, Target == Source, needs no second lookup. A
		// THIRD_PARTY target must be the requester's on an interface
		// that is there (ownsOnSome), not merely in the table: a gone
		// interface's held prefixes count for no request but a delete of
		// the requester's own lease.
		if r.Target != src {
			if rs := p.hostSource(src); rs != Allowed {
				return Owner{}, rs
			}
		}
		if r.Target != src && (t.find(r.Target) != si || !r.Delete && !t.ownsOnSome(r.Target, si, r.Iface)) {
			p.fast.miss()
			return o, NotOwned
		}
	} else {
		var ok bool
		if o, ok = p.Requester(src, r.Iface); !ok {
			return Owner{}, NoOwner
		}
		if p.neverOpenable(r.Target) {
			return o, NeverOpenable
		}
		if r.Target != src {
			if rs := p.hostSource(src); rs != Allowed {
				return Owner{}, rs
			}
		}
		// An ownership that is not this package's knows no held
		// interface, and LookupOn cannot say on which other interface
		// the target is its owner's: Lookup.
		if to, ok := p.own.Lookup(r.Target); !ok || to.ID != o.ID {
			return o, NotOwned
		}
	}
	if r.Target != src && !r.Delete && p.fresher != nil && p.fresher.Unsure() {
		// A THIRD_PARTY target judged by a view that may lag by more
		// than the fresh bound (a failed or hung read: WireGuard.Unsure)
		// could lie in a prefix carved out for another peer since:
		// refused, as a short error the client retries (review h/revtp).
		return o, PeersUnread
	}
	return o, p.readHost(p.rules(&r))
}

// hostSource reports whether src, a THIRD_PARTY requester's source, is
// one of the host's own addresses (Config.HostAddrs): such a request
// comes from the host itself (its own addresses reach pcpd only over
// loopback: the served-source rules and the serving sockets' filter drop
// them from elsewhere), which any local user may send, and an owner's
// prefix holding the host's address (a static client given the whole LAN
// /64) made every local user that owner: user nobody's THIRD_PARTY MAP of
// the client's address from the host's served address opened it
// (TestLocalUserHostAddressInOwnerPrefix, h/hunt3). The host's own
// address is never openable, so only a THIRD_PARTY target needs asking:
// Target == Source is refused by neverOpenable already.
//
// It answers NoOwner for a host address, HostSourceUnread while the
// host's addresses have not been read (Config.HostAddrsRead: the set is
// empty, and any source may be the host's), else Allowed. Before (review
// of h/hunt3), an unread set let a host address through as its owner's,
// and the server's leniency for deletes (HostUnread: a delete opens
// nothing) then let any local user delete the owner's leases by
// THIRD_PARTY (TestThirdPartyDeleteFromHostUntilHostRead): unlike
// HostUnread, HostSourceUnread is about who asks, and refuses deletes too.
func (p *Policy) hostSource(src netip.Addr) Reason {
	switch {
	case p.host != nil && p.host(src):
		return NoOwner
	case p.hostRead != nil && !p.hostRead():
		return HostSourceUnread
	}
	return Allowed
}

// readHost is r, or HostUnread when r allows and the host's addresses
// have not been read yet: a first read that failed left HostAddrs empty,
// and a MAP to the host's own address, or its subnet's broadcast, would
// have been granted until a later read succeeded (fail closed).
func (p *Policy) readHost(r Reason) Reason {
	if r == Allowed && p.hostRead != nil && !p.hostRead() {
		return HostUnread
	}
	return r
}

// Rules judges r as Authorize does once ownership is settled: the
// THIRD_PARTY switch, a never-openable target, protocol and ports, in
// Authorize's order, and neither r.Source nor r.Iface. It is for what
// outlives a request, whose arrival interface is not known (a restored
// lease): its ownership is the ownership sweep's (Lookup). It never
// answers HostUnread: a restored lease was checked against the host's
// addresses when granted, and revoking every restored lease because the
// host's addresses could not be read at start would be worse than
// keeping them (a host address is then checked from its next read on:
// renewals are refused, and the server's sweep revokes the lease after
// the read, HostGen).
func (p *Policy) Rules(r Request) Reason {
	if r.ThirdParty && p.tp == ThirdPartyOff {
		return ThirdPartyDenied
	}
	if p.neverOpenable(r.Target) {
		return NeverOpenable
	}
	return p.rules(&r)
}

// rules is Authorize's last steps: protocol and ports.
func (p *Policy) rules(r *Request) Reason {
	switch {
	case r.Protocol == 0:
		if !p.allProtos {
			return AllProtocolsDenied
		}
	case !p.proto[r.Protocol]:
		return ProtocolDenied
	}
	if r.InternalPort == 0 {
		if !p.allPorts {
			return AllPortsDenied
		}
	} else if !p.PortAllowed(r.InternalPort) {
		return PortDenied
	}
	if r.ExternalPort != 0 && !p.PortAllowed(r.ExternalPort) {
		return PortDenied
	}
	return Allowed
}

// CheckQuota decides whether a client holding clientLeases, on a server
// holding totalLeases, may create one more lease. Renewals must not be
// checked (MAP-15: limits apply to new mappings only). The per-client limit
// is checked first: it is the more specific cause (HDR-07).
func (p *Policy) CheckQuota(clientLeases, totalLeases int) Reason {
	if clientLeases >= p.maxClient {
		return ClientQuota
	}
	if totalLeases >= p.maxAll {
		return GlobalQuota
	}
	return Allowed
}

// ClampLifetime clamps a requested lifetime into [min, max] (LIFE-01,
// choice (e)). Zero (a delete) stays zero; negative values are treated as 0.
func (p *Policy) ClampLifetime(d time.Duration) time.Duration {
	switch {
	case d <= 0:
		return 0
	case d < p.minLife:
		return p.minLife
	case d > p.maxLife:
		return p.maxLife
	}
	return d
}

// MinLifetime and MaxLifetime return the effective clamp bounds.
func (p *Policy) MinLifetime() time.Duration { return p.minLife }
func (p *Policy) MaxLifetime() time.Duration { return p.maxLife }

// MaxLeasesPerClient returns the effective per-client lease limit (MAP-15).
func (p *Policy) MaxLeasesPerClient() int { return p.maxClient }

// NeverOpenable reports whether no one may open a, whatever the
// ownership says: its class (a translation prefix's included,
// Config.TranslationPrefixes), or the host reaches it (Config.HostAddrs,
// as now read). The server's sweep revokes a lease whose target became one
// (the host gained the address after the lease was granted).
func (p *Policy) NeverOpenable(a netip.Addr) bool { return p.neverOpenable(a) }

// HostGen is Config.HostAddrsGen's value (0 if nil): when it changes,
// NeverOpenable may answer otherwise for a lease's target.
func (p *Policy) HostGen() uint64 {
	if p.hostGen == nil {
		return 0
	}
	return p.hostGen()
}

// translated reports whether a lies in a translation prefix, a fixed one
// or Config.TranslationPrefixes: it stands for an IPv4 host on the far
// side of a translator. As a target it is never openable; as a source it
// is nobody's (Authorize, Requester), as an IPv4-mapped source is
// dropped: the holder of the prefix (a client given 64:ff9b::/96, the
// WireGuard peer that is the NAT64 gateway) is not the IPv4 host, and
// taken as the holder's, a request from 64:ff9b::c633:6402 opened and
// deleted the holder's mappings by THIRD_PARTY (review h/revp64,
// TestAuthorizeTranslatedSource, TestTranslatedSourceIsNobodys).
func (p *Policy) translated(a netip.Addr) bool {
	return (a.As16()[0] == 0 || len(p.xlat) != 0) && p.translatedSearch(a)
}

// TranslationPrefixes returns every translation prefix the policy holds
// (translated): the fixed ones (64:ff9b::/96, 64:ff9b:1::/48, ::/96),
// then Config.TranslationPrefixes, masked; a new slice. A source inside
// one is nobody's, so the kernel's owner meter is told to charge it to
// the unowned bucket whatever owner's prefix encloses it
// (pinhole.Meter.Unowned; issue 9, review h/revp64 finding 3).
func (p *Policy) TranslationPrefixes() []netip.Prefix {
	return append(slices.Clone(translation), p.xlat...)
}

func (p *Policy) translatedSearch(a netip.Addr) bool {
	return isTranslated(a) || inPrefixes(a, p.xlat)
}

// neverOpenable reports whether a is in a class no one may open, whatever
// the ownership says.
func (p *Policy) neverOpenable(a netip.Addr) bool {
	if neverOpenable(a) {
		return true
	}
	if p.denyDoc && isDocumentation(a) {
		return true
	}
	if len(p.xlat) != 0 && inPrefixes(a, p.xlat) {
		return true
	}
	return p.host != nil && p.host(a)
}
