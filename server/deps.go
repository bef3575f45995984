package server

import (
	"context"
	"net/netip"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// Firewall is what the engine needs from the nftables backend
// (*pinhole.Backend). Apply is one kernel transaction: all of ops or none.
type Firewall interface {
	// Setup creates (or re-creates) the backend's tables, chains and sets.
	Setup() error
	// SetProtected sets the prefixes whose inbound traffic the backend
	// guards (the owned prefixes and the holes, policy.Holes).
	SetProtected(prefixes []netip.Prefix) error
	Apply(ops []pinhole.Op) error
	List() ([]pinhole.Entry, error)
	// Healthy reports whether the backend's objects are intact.
	Healthy() error
}

// ContextLister is a Firewall whose List can be given up when ctx ends
// (pinhole's ListContext: ctx's error, never a part of the dump). The
// audit's dump takes seconds at 100 000 mappings; with it, Serve's
// return (SIGTERM, systemctl stop) does not wait it out (h/auditend).
type ContextLister interface {
	ListContext(ctx context.Context) ([]pinhole.Entry, error)
}

// OwnerMeter is an optional extra of a Firewall (*pinhole.Backend has it):
// its kernel request meter counts per owner, so it needs every owner's
// prefixes, and the prefixes owned by nobody inside them (policy.Holes),
// given again whenever they change (pinhole/ownermeter.go).
//
// Its failures leave the rest alone: Setup returns an error wrapping
// pinhole.ErrOwnerMeter when all but the owner meter is in place, and
// Healthy one wrapping it when only the owner meter is damaged;
// RepairOwners writes the owner meter again. MeterDrops is what its rules
// dropped, per rule, for /metrics.
type OwnerMeter interface {
	SetOwners(owners []pinhole.Owner, holes []netip.Prefix) error
	RepairOwners() error
	MeterDrops() pinhole.MeterDrops
}

// ProtectedRepairer is an optional extra of a Firewall (*pinhole.Backend
// has it): a failure to write the protected sets (SetProtected, Setup) or
// damage Healthy finds in them alone comes wrapping pinhole.ErrProtected,
// and RepairProtected writes them again from the last SetProtected,
// without a re-install of every lease: they hold no pinhole.
type ProtectedRepairer interface {
	RepairProtected() error
}

// ServedSetter is an optional extra of a Firewall (*pinhole.Backend has
// it): its raw chains meter pcpd's requests and keep them out of
// conntrack only on the addresses pcpd serves (pinhole/notrack.go), so it
// needs them, and the interfaces their sockets are bound to (a datagram
// arriving elsewhere reaches no socket and is not metered), given again
// whenever the listener's sockets change. A
// failed call is retried at the listener's next pass.
type ServedSetter interface {
	SetServed(addrs []netip.Addr, ifaces []string) error
}

// RouteFollower is an optional extra of an OwnerMeter (*pinhole.Backend
// has it): FollowRoutes brings the owner meter's reverse-path check up to
// date with the host's routes of the owned prefixes. checkFirewall calls
// it before every Healthy, which bounds its lag to TamperInterval.
type RouteFollower interface {
	FollowRoutes() error
}

// FlowedChecker is an optional extra of a Firewall (*pinhole.Backend has
// it): FlowedMissNamed asks the kernel once whether its answer to a
// lookup of a missing flowed6 element names the element (Linux 5.19's
// b53c116642502 on). A kernel that does not makes every such lookup fail,
// every IPv6 address is taken as flowed and every IPv6 delete walks
// conntrack: safe, and told once (Server.checkFlowedMisses). An error:
// no flowed6 here, or no answer.
type FlowedChecker interface {
	FlowedMissNamed() (bool, error)
}

// RouteLookups is an optional extra of an OwnerMeter (*pinhole.Backend
// has it): RouteLookupOwners are the owners each of whose requests costs
// the kernel a route lookup (their prefixes are not routed as one through
// one interface), as of the last SetOwners or FollowRoutes. It must be
// cheap (read at each /metrics scrape).
type RouteLookups interface {
	RouteLookupOwners() []pinhole.Owner
}

// RouteChanger is an optional extra of a RouteFollower (*pinhole.Backend
// has it, when its routes are watched): RouteChanges receives after the
// host's links, addresses, routes or policy rules changed (nil: never),
// and the server then follows them without waiting for its next check.
type RouteChanger interface {
	RouteChanges() <-chan struct{}
}

// FlowCutter is an optional extra of a Firewall (*pinhole.Backend has
// it): CutsFlows reports whether the ruleset itself ends the established
// flows a pinhole admitted once its element is gone (standalone: IPv6
// pinholes, pinhole/cutflows.go; the DNAT-ed flows of IPv4 NAPT mappings
// and IPv6 redirects, pinhole/natcut.go, not a NAPT mapping's SNAT-ed
// ones: snatFlows). Then a delete's
// reply need not wait for the conntrack walk (PMP-12), which still runs.
// It must be cheap (asked for every ended mapping).
type FlowCutter interface {
	CutsFlows(p pinhole.Pinhole) bool
}

// FlowRecorder is an optional extra of a FlowCutter (*pinhole.Backend
// has it: pinhole/flowed.go): RecordsFlows says whether the ruleset
// records the addresses p's admitted flows went to, and FlowedAddrs
// reads that record (ok false: untrusted, walk everything; asked: the
// addresses to be asked, looked up together). The
// conntrack flusher leaves out the filters of such mappings whose
// address no flow went to (skipUnflowed). ForgetFlowed deletes
// addresses from the record (false: none deleted), Reflowed adds them
// back (pruneFlowed).
type FlowRecorder interface {
	RecordsFlows(p pinhole.Pinhole) bool
	FlowedAddrs(asked ...netip.Addr) (flowed func(netip.Addr) bool, ok bool)
	ForgetFlowed(addrs []netip.Addr) bool
	Reflowed(addrs []netip.Addr)
}

// FlowRegainer is an optional extra of a FlowRecorder (*pinhole.Backend
// has it: pinhole/flowedlife.go): RegainFlowed rebuilds the record from
// conntrack and trusts it again, when untrusted or (rebuild) anyway;
// trusted says whether it is on return, pinhole.ErrRegainNotNow that
// nothing was done (regainFlowed); FlowedTrusted says whether
// FlowedAddrs would trust it now (cheap).
type FlowRegainer interface {
	RegainFlowed(rebuild bool) (trusted bool, err error)
	FlowedTrusted() bool
}

// FlowVerifier is an optional extra of a FlowRecorder (*pinhole.Backend
// has it): VerifyFlowed reads conntrack for flows let in through no guard
// now, if the record owes that read, rather than at the next walk
// (FlowedAddrs). Serve calls it before serving.
type FlowVerifier interface {
	VerifyFlowed()
}

// NATLister is an optional extra of a FlowCutter (*pinhole.Backend has
// it): NATEndpoints calls fn with the external endpoint of each NAT-ed
// conntrack flow (a DNAT-ed one's original destination, a SNAT-ed one's
// reply destination). The server prunes natPrior with it
// (pruneNATPrior).
type NATLister interface {
	NATEndpoints(fn func(proto uint8, ext netip.AddrPort)) error
}

// NATLabeller is an optional extra of a FlowCutter (*pinhole.Backend has
// it: pinhole/natcut.go): NATLabel is the conntrack label bit the
// firewall's DNAT rules set on every flow they translate, and whether
// they set one (false: CutsFlows is false for the DNAT kinds for good).
// A start with KeepConnections records the former targets of DNAT-ed
// flows carrying it only (seedNATPrior): an admin's own DNAT-ed flows
// are not pcpd's to end.
type NATLabeller interface {
	NATLabel() (bit int, ok bool)
}

// ForeignChangeWatcher is an optional extra of a FirewallWatcher
// (*pinhole.Backend has it): fn is called when its watch is told someone
// else's change of a table, chain, rule or set not pcpd's (a DNAT rule of
// the host's may have come or gone); nil unsets it.
type ForeignChangeWatcher interface {
	OnForeignChange(fn func())
}

// ForeignDNATReader is an optional extra of a Firewall (*pinhole.Backend
// has it): ForeignDNAT reads the ports that the host's own DNAT and
// redirect rules, outside pcpd's chains, translate on the external IPv4
// address ext; first..last is the port range, for the rules that take
// all of it (pinhole/foreign.go). hostPorts reserves the ports.
type ForeignDNATReader interface {
	ForeignDNAT(ext netip.Addr, first, last uint16) (*pinhole.ForeignDNAT, error)
}

// CutArmer is an optional extra of a FlowCutter (*pinhole.Backend has
// it): a Setup that made the re-checked sets anew while labelled flows
// lived (an admin's "flush ruleset", a crash and a reload before the
// start) lays the ruleset's cut out disarmed, so that the flows of leases
// not yet re-installed are not dropped (pinhole/arm.go); Arm arms it. The
// server calls it once its restore at a start, or its re-install after a
// repair, has put every lease's pinholes back.
type CutArmer interface {
	Arm() error
}

// SetupPreparer is an optional extra of a Firewall (*pinhole.Backend has
// it): PrepareSetup does the reads of the next Setup that need no lock
// (conntrack, for labelled flows: pinhole/arm.go) now. The repair calls
// it right before taking s.mu for Setup and the re-install, so the engine
// does not wait for a dump of conntrack (h/left9); a write of the layout
// between (SetProtected, SetServed, SetOwners, a route's change) voids
// its answers, and that Setup reads nothing either (h/repair1m: before,
// it read them again with s.mu held, 1.6-1.8 s at 1 000 000 entries).
type SetupPreparer interface {
	PrepareSetup()
	// VerifySetup reads conntrack again, over the layout Setup wrote,
	// where Setup took PrepareSetup's "no flow let in unlabelled" (its
	// read is older than the layout by the wait for s.mu, while the
	// damaged layout let flows in: review h/revleft9); CutsFlows is false
	// for the kind until then. True when CutsFlows became true. Called
	// without s.mu.
	VerifySetup() bool
}

// FirewallWatcher is an optional extra of a Firewall (*pinhole.Backend
// has it): Watch reads the kernel's nftables notifications in the
// firewall's namespace until ctx ends and calls fn, in order, with
// someone else's changes to its objects (pinhole.WatchEvent): damage to
// check and repair, pinholes whose elements were deleted, notifications
// lost. The server runs it beside watchFirewall unless
// Config.NoFirewallWatch (fwwatch.go).
type FirewallWatcher interface {
	Watch(ctx context.Context, fn func(pinhole.WatchEvent)) error
}

// JoinedWatcher is a FirewallWatcher that tells when its watch listens
// (pinhole's WatchJoined: joined is called once its socket has joined the
// notifications' group): the start's audit dumps only after it.
type JoinedWatcher interface {
	WatchJoined(ctx context.Context, fn func(pinhole.WatchEvent), joined func()) error
}

// LeaseStore is the durable lease store (*store.Store). Commit is one
// transaction and one fsync.
type LeaseStore interface {
	Commit(put []store.Lease, del []store.Key) error
	// CommitQuar is Commit with MAP-22 quarantine changes (q may be nil)
	// in the same transaction: a freed port's quarantine is durable with
	// the change that freed it (store/quarantine.go).
	CommitQuar(put []store.Lease, del []store.Key, q *store.QuarChange) error
	ResetEpoch(origin time.Time) error
}

// Toucher and Snapshotter are optional extras of a LeaseStore
// (*store.Store has both): the engine calls Touch every TouchInterval
// (EPO-04 clock-doubt detection) and Snapshot every SnapshotInterval and at
// graceful shutdown (the last good copy a damaged file is restored from).
type (
	Toucher     interface{ Touch(now time.Time) error }
	Snapshotter interface{ Snapshot() error }
)

// Policy decides who may open what (*policy.Policy).
type Policy interface {
	Authorize(policy.Request) (policy.Owner, policy.Reason)
	// Requester is the owner a request from src arriving on iface
	// (kernel name) is taken as, as Authorize takes it.
	Requester(src netip.Addr, iface string) (policy.Owner, bool)
	// Rules is Authorize without ownership (for restored leases).
	Rules(policy.Request) policy.Reason
	// NeverOpenable: no one may open the address (the host's own, as
	// now read, among them); the sweep revokes leases on it.
	NeverOpenable(netip.Addr) bool
	// HostGen changes when NeverOpenable may have (the host's addresses
	// read anew): the next sweep pass checks every lease against it.
	HostGen() uint64
	CheckQuota(clientLeases, totalLeases int) policy.Reason
	ClampLifetime(time.Duration) time.Duration
	MaxLeasesPerClient() int // bounds a client's quarantined ports too (MAP-22, quarantine.go)
	PortAllowed(port uint16) bool
	ThirdPartyMode() policy.ThirdPartyMode
	Ownership() policy.Ownership
}

// Deps are the engine's collaborators, built by the caller (cmd/pcpd, or a
// test with a namespace-bound firewall and a temporary store).
type Deps struct {
	Firewall Firewall
	Store    LeaseStore
	// State is what store.Open found: the leases and epoch to resume.
	State store.State
	// Census, if set, is the count of State's leases store.Open took as
	// it checked them (store.WithCensus): a restore reading them through
	// State.Stream is sized from it instead of reading them twice.
	Census *Census
	Policy Policy
	// Changes, if set, delivers ownership losses ((*policy.WireGuard).Changes):
	// the engine drains it and revokes at once the leases no longer owned,
	// instead of at its next periodic sweep (LIFE-05).
	Changes <-chan policy.Change
	// OwnershipSource names where ownership comes from, for Status
	// ("wireguard:wg0", "static").
	OwnershipSource string
	// Registerer, if set, gets the engine's metrics (see also
	// Server.Collectors).
	Registerer prometheus.Registerer
	// Now is the wall clock (default time.Now); tests move it.
	Now func() time.Time
	// Mono is a monotonic clock: time since some fixed moment, never
	// stepped. The engine runs on Now's reading at its start plus Mono's
	// elapsed time since, and follows a step of Now (server/clock.go).
	// Default: the runtime's monotonic clock when Now is nil too; with Now
	// set and Mono nil, Now is used as it is (tests whose fake clock moves
	// wall and monotonic time together), and no step is noticed.
	Mono func() time.Duration
	// Boot, if set, keeps the running clock's boot anchor in the state
	// directory (*bootclock.Keeper): a wall-clock step made while pcpd was
	// down, or after its last clock check, is then seen at the next start
	// in the same boot (clock.go). Used only with the running clock.
	Boot BootAnchor
}

// BootAnchor anchors the running clock to the machine's boot
// (internal/bootclock): Save records the running clock's reading (run)
// against CLOCK_BOOTTIME with the stored epoch origin (if it cannot, it
// removes the old anchor, or says bootclock.ErrStale); Step is the wall
// clock's step since, for a stored state with epoch origin origin, or an
// error saying why there is none to measure (another boot, no anchor, a
// damaged one, one of another state).
type BootAnchor interface {
	Step(origin time.Time) (time.Duration, error)
	Save(run func() time.Time, origin time.Time) error
}
