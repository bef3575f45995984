package pinhole

import (
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// The request meter (PKT-08, issue 9): in standalone mode pcpd's table
// drops PCP and NAT-PMP datagrams from a source sending far above pcpd's
// own per-source limit, before they are queued in pcpd's socket (its rules
// are in the control_local chain, which the raw prerouting chain
// control_in hands the datagrams to pcpd's ports on a served address:
// notrack.go). pcpd's userspace limiter (policy.RateLimiter) stays the
// precise one; the meter only sheds a flood so that it does not sit in the
// socket queue ahead of other clients' requests and cost them recvmmsg
// slots. Its rate should be a multiple of pcpd's own, so that the kernel
// never drops what pcpd would have answered.
//
// A source is what pcpd's limiter counts: an IPv6 /64, an IPv4 address.
// The per-source state lives in two dynamic sets of bounded size whose
// elements time out once a source goes quiet. When a set is full, the
// kernel's dynset expression does not match for a source it cannot add
// (the rule's drop is not reached): new sources then go uncounted to the
// socket, where pcpd's own limiter, bounded too, sees them. The meter
// never drops a source it is not tracking.
//
// In attached mode pcpd adds no base chain to the admin's table; the
// equivalent rules for the admin's own input chain are, with a set of the
// same shape declared in that table:
//
//	set pcpd_meter6 { type ipv6_addr; size 65536; flags dynamic,timeout; timeout 10s; }
//	set pcpd_meter4 { type ipv4_addr; size 65536; flags dynamic,timeout; timeout 10s; }
//	udp dport 5351 iif "lo" limit rate over 200/second burst 400 packets drop
//	udp dport 5351 iif "lo" accept
//	udp dport 5351 update @pcpd_meter6 { ip6 saddr & ffff:ffff:ffff:ffff:: timeout 10s limit rate over 200/second burst 400 packets } drop
//	udp dport 5351 update @pcpd_meter4 { ip saddr timeout 10s limit rate over 200/second burst 400 packets } drop
//
// (nft lists pcpd's own rules the same way: meta nfproto is implied.) The
// two loopback rules give the host's own datagrams (any local user's) a
// bucket of their own, as pcpd's table does (notrack.go, loopbackRules):
// without them a local flood from the host's address fills the per-source
// element of the /64 the host shares with its LAN's clients.

// Meter configures the request meter. Rate 0 installs no meter rules.
type Meter struct {
	// Rate is datagrams a second per source above which the kernel drops;
	// Burst is how many a source may send at once first.
	Rate, Burst uint32
	// Ports are the UDP ports pcpd serves on (default 5351).
	Ports []uint16
	// Size bounds each meter set (default MeterSize); tests make it small.
	Size uint32
	// OwnerRate and OwnerBurst are the owner meter's (ownermeter.go): per
	// owner, all its sources together. Default OwnerRateFactor times Rate
	// and Burst; pcpd sets them to what its own per-owner bucket admits.
	OwnerRate, OwnerBurst uint32
	// UnownedRate and UnownedBurst are the shared bucket of every source
	// no owner holds (ownermeter.go, unownedChainRules): all of them together,
	// both families. Default OwnerRate and OwnerBurst: pcpd's own limiter
	// puts every unowned source in one owner's bucket (server/early.go).
	UnownedRate, UnownedBurst uint32
	// ReversePath is the owner chains' reverse-path check (ownermeter.go,
	// ownerRules); the zero value is ReversePathStrict.
	ReversePath ReversePath
	// Unowned are source prefixes no owner is charged for, whichever
	// owner's prefix holds them: the owner maps (ownermeter.go) leave them
	// out of every owner's range (cutSpans), so their datagrams miss the
	// map and go to the unowned bucket (unownedChainRules), the per-packet
	// lookup unchanged. pcpd gives the policy's translation prefixes
	// (policy.Policy.TranslationPrefixes: 64:ff9b::/96, 64:ff9b:1::/48,
	// ::/96 and --nat64-prefix), whose sources are IPv4 hosts reaching
	// pcpd through a translator, nobody's (issue 9): an owner whose prefix
	// encloses one (a WireGuard peer with ::/0, a client given
	// 64:ff9b::/64, an NSP inside a client's /48) is not charged for them.
	Unowned []netip.Prefix
}

// ReversePath says how an owner chain checks that a datagram from an
// owner's prefix came in where the host routes that prefix (RFC 3704),
// before charging the owner for it.
type ReversePath uint8

const (
	// ReversePathStrict (the default) drops a datagram unless the host
	// routes its source through the interface it arrived on, as
	// rp_filter=1: iif != <the owner's interfaces> fib saddr . iif oif 0
	// drop. It is what keeps datagrams spoofed from an owner's prefix on
	// the WAN or another LAN from draining that owner's bucket
	// (RELIABILITY.md known bug 4). Datagrams arriving on an interface
	// through which the host routes all of the owner's prefixes (every
	// next hop of a multipath route; Config.Routes, followed by
	// FollowRoutes) pass without a route lookup; the others are looked
	// up, and with an owned prefix routed over several paths IPv6 checks
	// only the path the kernel's hash picks (IPv4 checks every next hop).
	// Without Config.Routes every datagram is looked up.
	ReversePathStrict ReversePath = iota
	// ReversePathLoose drops a datagram only when the host has no route
	// back to its source at all, as rp_filter=2: iif != <the owner's
	// interfaces> fib saddr oif 0 drop (the same interfaces pass
	// unlooked: the host routes the source there). Multipath routes pass;
	// but the host routes every owned prefix (its pinholes need that), so
	// a spoofed owned source passes too: against spoofing it is little
	// more than ReversePathOff.
	ReversePathLoose
	// ReversePathOff checks nothing: the owner chain holds the limit
	// alone, and every datagram from an owner's prefix is charged to it.
	ReversePathOff
)

var reversePathNames = [...]string{ReversePathStrict: "strict", ReversePathLoose: "loose", ReversePathOff: "off"}

// String is the mode's name, as ParseReversePath takes it.
func (r ReversePath) String() string {
	if int(r) < len(reversePathNames) {
		return reversePathNames[r]
	}
	return fmt.Sprintf("ReversePath(%d)", r)
}

// ParseReversePath reads "strict", "loose" or "off".
func ParseReversePath(s string) (ReversePath, error) {
	for i, n := range reversePathNames {
		if s == n {
			return ReversePath(i), nil
		}
	}
	return 0, fmt.Errorf("pinhole: reverse-path mode %q: want strict, loose or off: %w", s, ErrInvalid)
}

const (
	// MeterSize bounds each meter set: at most this many sources are
	// tracked per family, whatever the number of sources sending.
	MeterSize = 65536
	// MeterTimeout is how long a quiet source's state is kept.
	MeterTimeout = 10 * time.Second
	// DefaultMeterPort is the PCP / NAT-PMP server port (RFC 6887 §19.1).
	DefaultMeterPort = 5351
)

// meterPrefix6 is the IPv6 source prefix length the meter counts by, the
// same as pcpd's userspace limiter default.
const meterPrefix6 = 64

func (m *Meter) fill() error {
	m.Unowned = slices.Clone(m.Unowned)
	for _, p := range m.Unowned {
		if !p.IsValid() || p.Addr().Zone() != "" {
			return fmt.Errorf("pinhole: unowned prefix %v: %w", p, ErrInvalid)
		}
	}
	if len(m.Ports) == 0 {
		m.Ports = []uint16{DefaultMeterPort}
	}
	m.Ports = slices.Clone(m.Ports)
	slices.Sort(m.Ports)
	m.Ports = slices.Compact(m.Ports)
	if m.Size == 0 {
		m.Size = MeterSize
	}
	if m.Burst == 0 {
		m.Burst = m.Rate
	}
	if m.OwnerRate == 0 {
		m.OwnerRate = OwnerRateFactor * m.Rate
	}
	if m.OwnerBurst == 0 {
		m.OwnerBurst = OwnerRateFactor * m.Burst
	}
	if m.UnownedRate == 0 {
		m.UnownedRate = m.OwnerRate
	}
	if m.UnownedBurst == 0 {
		m.UnownedBurst = m.OwnerBurst
	}
	return nil
}

// meterSets builds the two meter sets.
func meterSets(table *nftables.Table, prefix string, size uint32) (six, four *nftables.Set) {
	mk := func(name string, key nftables.SetDatatype, comment string) *nftables.Set {
		return &nftables.Set{Table: table, Name: prefix + name, KeyType: key, KeyByteOrder: binaryutil.BigEndian,
			Dynamic: true, HasTimeout: true, Timeout: MeterTimeout, Size: size, Comment: comment}
	}
	return mk("meter6", nftables.TypeIP6Addr, "pcpd: request rate per IPv6 /64"),
		mk("meter4", nftables.TypeIPAddr, "pcpd: request rate per IPv4 source")
}

// meterRules are the per-source meter's rules, one per family and served
// port, each matching a datagram to that port (in control_local: see
// notrack.go), when the layout has no owner meter (ownerLayout); with
// one, the same rules without the port match are control_meter's
// (perSourceRules).
func (b *Backend) meterRules() [][]expr.Any {
	if !b.metering() || b.ownerLayout() {
		return nil
	}
	var out [][]expr.Any
	for _, port := range b.cfg.Meter.Ports {
		out = append(out, b.perSourceRules(x(loadMeta(expr.MetaKeyL4PROTO, reg0), eq(reg0, unix.IPPROTO_UDP),
			loadTh(thDstOff, reg0), eq(reg0, byte(port>>8), byte(port))))...)
	}
	return out
}

// metering: the layout has the request meter (standalone, a rate set).
func (b *Backend) metering() bool { return b.cfg.Meter.Rate > 0 && !b.cfg.Attached }

// perSourceRules are the per-source meter's two rules, after match:
//
//	... update @meter6 { ip6 saddr & ffff:ffff:ffff:ffff:: timeout 10s limit rate over 200/second burst 400 packets } drop
//	... update @meter4 { ip saddr timeout 10s limit rate over 200/second burst 400 packets } drop
func (b *Backend) perSourceRules(match []expr.Any) [][]expr.Any {
	m := b.cfg.Meter
	limit := func() []expr.Any {
		return []expr.Any{&expr.Limit{Type: expr.LimitTypePkts, Rate: uint64(m.Rate), Over: true,
			Unit: expr.LimitTimeSecond, Burst: m.Burst}}
	}
	update := func(s *nftables.Set) expr.Any {
		return &expr.Dynset{SrcRegKey: reg0, SetName: s.Name, SetID: s.ID, Operation: unix.NFT_DYNSET_OP_UPDATE,
			Timeout: MeterTimeout, Exprs: limit()}
	}
	mask6 := make([]byte, 16)
	for i := range meterPrefix6 / 8 {
		mask6[i] = 0xff
	}
	return [][]expr.Any{
		rule(nfproto(unix.NFPROTO_IPV6), match, x(loadNet(ip6SrcOff, 16, reg0),
			&expr.Bitwise{SourceRegister: reg0, DestRegister: reg0, Len: 16, Mask: mask6, Xor: make([]byte, 16)},
			update(b.meter6), drop)),
		rule(nfproto(unix.NFPROTO_IPV4), match, x(loadNet(ip4SrcOff, 4, reg0), update(b.meter4), drop)),
	}
}
