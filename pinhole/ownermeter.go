package pinhole

import (
	"errors"
	"fmt"
	"hash/fnv"
	"net/netip"
	"reflect"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// The owner meter (PKT-08, SEC-04, issue 9): the request meter of meter.go
// counted per owner as well as per source.
//
// The per-source meter keys IPv6 by /64, so a client that owns a large
// prefix (a WireGuard peer with a /40 in AllowedIPs) and sends every
// datagram from a fresh /64 is never over its rate; once the meter set is
// full (MeterSize sources) its new /64s are not even tracked, and the
// whole flood reaches pcpd's socket, where pcpd's per-owner bucket sheds
// it (server/early.go) only after it has cost a recvmmsg slot and sat in
// the socket queue ahead of other clients' requests. So the kernel also
// counts per owner: two interval verdict maps from the owners' prefixes
// to a chain per owner, whose rules are a reverse-path check and the
// limit (ownerRules):
//
//	map owners6 { type ipv6_addr : verdict; flags interval;
//		elements = { 2001:db8:100::/40 : jump owner_1e2a3b4c, ... } }
//	map owners4 { type ipv4_addr : verdict; flags interval; ... }
//	chain owner_1e2a3b4c {
//		iif != "lan0" fib saddr . iif oif 0 counter drop
//		limit rate over 400/second burst 800 packets counter drop
//		goto control_meter
//	}
//	chain control_local {
//		... (the served-source drops, the host's loopback bucket: notrack.go)
//		ip6 saddr vmap @owners6
//		ip saddr vmap @owners4
//		goto unowned
//	}
//
// (ownerMeterRules). A limit expression keeps its state in its rule, so
// each owner's chain is its bucket, for all of its sources and both
// families. A source in no owner's prefix misses the map, which ends the
// rule, and goes on to the one bucket of every unowned source
// (unownedChainRules); a datagram under its owner's rate goes on from the
// owner's chain; both end in control_meter, the per-source rules and
// notrack. Because the owner rules come first, a flood shed per owner
// never reaches (and never fills) the per-source sets.
//
// Why not a dynamic set keyed by an owner id from the map (a lookup into
// a register, then "update @ownermeter { <register> limit ... }"): the
// kernel takes it, but nft cannot print a map lookup as a dynset key
// (nftables 1.0.6 aborts in netlink_parse_concat_key listing the chain),
// and a meter that breaks "nft list ruleset" is not acceptable; setting
// the packet mark from the map to key the dynset would clobber a mark the
// host's other rules (policy routing, if the rule runs at prerouting)
// may use.
//
// The maps hold the prefixes pcpd's policy knows (WireGuard AllowedIPs or
// static clients), as SetOwners gives them, flattened to disjoint ranges
// by longest match (a peer's /64 inside another's /48 is that peer's).
// The holes SetOwners is given (prefixes owned by nobody: WireGuard
// AllowedIPs that overlap across interfaces) take part in the longest
// match but get no element, so a hole inside an owner's prefix is not
// that owner's here either, as in the policy (RELIABILITY.md known bug 4:
// a peer on wg1 whose /48 lies in a wg0 peer's /32 drained that peer's
// bucket). The prefixes of Meter.Unowned (pcpd: the translation
// prefixes, whose sources are IPv4 hosts through a NAT64 or SIIT
// translator, nobody's in the policy) are cut out of every owner's range
// after the longest match (ownerMapSpans), more specific owners' too: an
// IPv4 host reaching pcpd through the translator was charged to the
// holder of an enclosing prefix (a WireGuard peer with ::/0, an NSP
// inside a client's /48) and could use up its kernel budget (review
// h/revp64, finding 3). Their size and the number of owner chains are bounded by the
// configuration, never by traffic. An owner's chain is named after a hash
// of its OwnerID (collisions moved on in ID order), so it, and its
// bucket, survive other owners coming and going; SetOwners adds the
// chains of new owners and deletes those of owners gone, in the same
// transaction as the maps' new contents.
//
// The rate is per owner: Meter.OwnerRate. pcpd sets it to what its own
// per-owner bucket admits (policy.OwnerRateFactor times its per-source
// limit: 400 a second, burst 800, by default), with no margin. The
// per-source meter's 4 × margin costs little (a flooding source gets 300
// datagrams of burst and 150/s more into the socket than pcpd answers);
// the owner share's did not: what the kernel let through beyond pcpd's
// bucket pcpd only read and dropped, and the former 4 × (1600/s, burst
// 3200, more than the ≈ 2 500 small datagrams pcpd's 2 MiB socket buffer
// holds) let one flooding owner overflow that buffer on a one-core
// server, other clients' requests with it (RELIABILITY.md known bug 5).
// Unlike pcpd's bucket, which binds only while another owner wants the
// engine, the kernel's always binds: one owner alone is held to OwnerRate
// datagrams a second, above what a client's mappings need (pcpd's quota
// is 256 per client by default; --kernel-owner-rate-limit raises it).

// OwnerRateFactor: unless Meter.OwnerRate says otherwise, an owner's
// kernel rate and burst are this many times the per-source ones: with
// pcpd's default per-source meter (4 times its own per-source limit) that
// is pcpd's per-owner bucket (8 times its per-source one).
const OwnerRateFactor = 2

// ownerChainPrefix starts the name of every owner chain.
const ownerChainPrefix = "owner_"

// Owner is one owner's prefixes, as SetOwners takes them.
type Owner struct {
	// ID identifies the owner (policy.OwnerID); only its hash reaches the
	// kernel, in its chain's name.
	ID       string
	Prefixes []netip.Prefix
}

// ownerMaps builds the owner meter's two verdict maps.
func ownerMaps(table *nftables.Table, prefix string) (six, four *nftables.Set) {
	mk := func(name string, key nftables.SetDatatype, comment string) *nftables.Set {
		return &nftables.Set{Table: table, Name: prefix + name, KeyType: key, KeyByteOrder: binaryutil.BigEndian,
			IsMap: true, Interval: true, DataType: nftables.TypeVerdict, Comment: comment}
	}
	return mk("owners6", nftables.TypeIP6Addr, "pcpd: IPv6 prefix to owner meter chain"),
		mk("owners4", nftables.TypeIPAddr, "pcpd: IPv4 prefix to owner meter chain")
}

// ownerMeterRules are the owner meter's rules in control_local, after the
// served-source drops and the host's loopback bucket (notrack.go:
// loopbackRules, which accepts what came over loopback, so no owner is
// charged for a local user's datagrams), when the layout has the owner meter
// (ownerLayout):
//
//	ip6 saddr vmap @owners6
//	ip saddr vmap @owners4
//	goto unowned
//
// They need no port match: control_in hands control_local only datagrams
// to a served port. One lookup a datagram decides where it is charged.
// Its owner's chain ends "goto control_meter", and control_meter ends
// "accept", so a datagram its owner's bucket passes never comes back here
// (the map's verdict is a jump: without the accept, the end of
// control_meter would return to the rule after the map's, goto unowned,
// and charge it to the unowned bucket too: TestOwnerMeterHoleBug4); a
// source no owner holds misses the map, which ends the rule, and falls
// through to the shared bucket of every unowned source (unownedChain),
// which ends "goto control_meter" too. The per-source rules
// (perSourceRules) and notrack are control_meter's: both paths meet them
// after the owner or unowned limit, so a flood shed there never reaches
// (and never fills) the per-source sets.
//
// Until 2026-12-03 (h/errrows2) the owner chains returned here, and the
// unowned rule was a second lookup of the same map, inverted ("ip6 saddr
// != @owners6 jump unowned"), which every request paid, owned or not;
// that lookup also needs Linux 6.5 (a map looked up as a set), so before
// it there was no unowned bucket at all (probeMapAsSet, since removed).
// This layout needs nothing newer than the owner maps themselves.
func (b *Backend) ownerMeterRules() [][]expr.Any {
	vmap := func(s *nftables.Set) expr.Any {
		return &expr.Lookup{SourceRegister: reg0, DestRegister: unix.NFT_REG_VERDICT, IsDestRegSet: true, SetName: s.Name, SetID: s.ID}
	}
	return [][]expr.Any{
		rule(nfproto(unix.NFPROTO_IPV6), x(loadNet(ip6SrcOff, 16, reg0), vmap(b.owners6))),
		rule(nfproto(unix.NFPROTO_IPV4), x(loadNet(ip4SrcOff, 4, reg0), vmap(b.owners4))),
		x(goTo(unownedChain)),
	}
}

// unownedChain is the shared bucket of every source no owner holds: one
// chain, so one limit for both families and every served port.
const unownedChain = "unowned"

// controlMeterChain holds the per-source meter's rules, notrack, and
// accept, where the owner chains and unownedChain go once their limit
// passed a datagram (ownerMeterRules).
const controlMeterChain = "control_meter"

// unownedChainRules are unownedChain's rules (review S4): the shared
// limit of the sources no owner holds (in no owner's prefix, or in a
// hole), then on to the per-source rules:
//
//	chain unowned {
//		limit rate over 400/second burst 800 packets counter drop
//		goto control_meter
//	}
//
// Before S4, such a source met the per-source rules alone, so a flood
// from many unowned /64s (or, once the meter sets were full, from any
// number of them) reached pcpd's socket at full speed, where pcpd's own
// limiter put them all in one bucket (server/early.go, the zero OwnerKey)
// only after each had cost a recvmmsg slot. Now the kernel holds them,
// together, to Meter.UnownedRate, which pcpd sets to its own bucket's
// rate. Every request from them is refused (NoOwner) or an ANNOUNCE, so
// the bucket costs no client a mapping. An owner's datagrams never get
// here: they hit the map and go on from the owner's chain.
//
// The owner maps are the truth of who is unowned, so while they miss an
// owner's ranges (a table made anew until SetOwners' first write, a map
// write failing, and the moment between two of a large map's
// transactions, ownerMapTxn) that owner's sources are charged here, as
// nobody's, rather than metered per source only.
func (b *Backend) unownedChainRules() [][]expr.Any {
	m := b.cfg.Meter
	return [][]expr.Any{
		x(&expr.Limit{Type: expr.LimitTypePkts, Rate: uint64(m.UnownedRate), Over: true,
			Unit: expr.LimitTimeSecond, Burst: m.UnownedBurst}, &expr.Counter{}, drop),
		x(goTo(controlMeterChain)),
	}
}

// ownerLayout: the layout has the owner meter, unownedChain and
// controlMeterChain (standalone, with the per-source and owner meters on).
func (b *Backend) ownerLayout() bool { return b.metering() && b.ownerMetering() }

// ownerRules are an owner chain's rules: the reverse-path check (unless
// Meter.ReversePath is off), then the limit, then on to the per-source
// rules (controlMeterChain; ownerMeterRules). ifs are the interfaces
// through which the host routes every prefix of the owner (Config.Routes;
// ownerInterfaces, FollowRoutes), in index order. Their counters are what
// the owner's datagrams cost it in drops ("nft list chain inet pcpd
// owner_..."): spoofed ones, then those over its rate; MeterDrops adds
// them up per kind. Both are kept across SetOwners, and Setup's repair
// rewrites the rules and zeroes them.
//
//	iif != "lan0" fib saddr . iif oif 0 counter drop	(strict, the default)
//	iif != "lan0" fib saddr oif 0 counter drop		(loose)
//	limit rate over 400/second burst 800 packets counter drop
//	goto control_meter
//
// fib saddr . iif oif is the interface the host routes the source address
// through, if that is the one the datagram arrived on, else 0: strict
// reverse path (RFC 3704 §2.2, rp_filter=1), which the kernel's own
// rp_filter would check only later, in routing (and not at all for IPv6),
// after this raw prerouting chain has run. Without it, datagrams spoofed
// from an owner's prefix on another interface (the WAN, another LAN) would
// drain the owner's bucket and hold its real requests to nothing. They
// are dropped rather than passed on to the per-source meter: they cannot
// be a request pcpd answers (its sockets are bound to the serving
// interfaces, and the host routes the owner's prefix, which its pinholes
// and DNAT need, through the interface its requests come in on), and
// counted per source they would drain the victim's /64 bucket instead.
// WireGuard interfaces already check sources against the peers'
// AllowedIPs; the check matters for spoofing from elsewhere.
//
// The "iif != ..." comparisons come first so that a datagram arriving on
// one of ifs, where the owner's own requests and floods arrive, ends the
// rule without a route lookup: on Linux 6.18 each IPv6 fib lookup
// allocated a route (ip6_create_rt_rcu) freed through RCU, and in the
// pinned flood bed the lookups and their freeing took a quarter of the
// server's CPU (RELIABILITY.md, runs U and V). That changes no verdict
// strict would give on a host whose routes ifs reflect: a source of the
// owner's arriving on an interface that routes all of its prefixes is
// what strict passes. A datagram arriving anywhere else meets the lookup
// as before, so a spoofed source from the WAN or another LAN is still
// dropped and counted here, and a route moved to a new interface passes
// the owner's requests there before FollowRoutes catches up. What the
// comparisons pass that the lookup might not: on a stale ifs, the
// interface a route has just left (until FollowRoutes, pcpd: 250 ms
// after a change with NetlinkRoutes' watch, up to 1 s under churn; at
// most TamperInterval, 5 s, without); the host's own addresses inside
// the owner's
// prefix (NetlinkRoutes does not see them; those pcpd serves are dropped
// before, servedSourceRules), from the owner's interface
// (NetlinkRoutes gives no interfaces for a prefix with a route carved out
// of it onto another interface, on a host with policy rules of its own,
// or while its lookups fail: routes.go); and,
// deliberately, every next hop of a multipath route, where the IPv6 fib
// lookup checks only the one its hash picks (review S1: with a route over
// the LAN and the WAN it passed 94–116 of 200 sources; with ifs, 200).
// An owner whose prefixes are routed through different interfaces gets
// the intersection, often none: every datagram of its meets the lookup.
//
// Loose (fib saddr oif 0, RFC 3704 §2.3, rp_filter=2) drops only sources
// the host has no route back for; it takes the same comparisons (a
// source arriving where the host routes it has a route back), so it costs
// the same. Since the host routes every owned prefix it catches almost no
// spoofing; it stays for hosts whose policy routing makes the strict
// lookup fail where requests do arrive. Off has no rule at all.
func (b *Backend) ownerRules(ifs []int) [][]expr.Any {
	m := b.cfg.Meter
	var rules [][]expr.Any
	if m.ReversePath != ReversePathOff {
		var r []expr.Any
		if len(ifs) > 0 {
			// The owner's own interfaces pass without a lookup.
			r = append(r, loadMeta(expr.MetaKeyIIF, reg0))
			for _, i := range ifs {
				r = append(r, &expr.Cmp{Op: expr.CmpOpNeq, Register: reg0, Data: binaryutil.NativeEndian.PutUint32(uint32(i))})
			}
		}
		r = append(r, &expr.Fib{Register: reg0, FlagSADDR: true, FlagIIF: m.ReversePath == ReversePathStrict, ResultOIF: true},
			eq(reg0, 0, 0, 0, 0), &expr.Counter{}, drop)
		rules = append(rules, r)
	}
	rules = append(rules, x(&expr.Limit{Type: expr.LimitTypePkts, Rate: uint64(m.OwnerRate), Over: true,
		Unit: expr.LimitTimeSecond, Burst: m.OwnerBurst}, &expr.Counter{}, drop))
	if b.ownerLayout() {
		// ownerMeterRules: never back to control_local. (Without the
		// per-source meter nothing goes to the owner chains.)
		rules = append(rules, x(goTo(controlMeterChain)))
	}
	return rules
}

// ownerMetering: SetOwners has something to do.
func (b *Backend) ownerMetering() bool { return b.owners6 != nil && b.cfg.Meter.OwnerRate > 0 }

// isOwnerChain: name is an owner chain's. Ownership accepts them whatever
// this Backend's settings (a pcpd run before may have made them).
func (b *Backend) isOwnerChain(name string) bool {
	return !b.cfg.Attached && strings.HasPrefix(name, ownerChainPrefix)
}

// SetOwners replaces the owner meter's prefixes (standalone; attached, a
// no-op). holes are prefixes owned by nobody (policy.Holes: WireGuard
// AllowedIPs that overlap across interfaces): they take part in the
// longest match like an owner's, so that the owner whose prefix encloses
// one is not charged for its sources, but get no element, so their
// sources are metered per source only, as a source nobody owns is.
// Setup re-applies the last ones. Without a meter (Rate 0) it empties the
// maps and removes the owner chains a run with one left.
//
// Once they are valid, the owners given are what the kernel should hold,
// even if writing them fails part way: Healthy then compares the kernel
// with them and reports ErrOwnerMeter, and RepairOwners and Setup write
// them. Before, a failed SetOwners kept the last owners written, and after
// a failed first one there were none: Healthy checked nothing (the meter
// absent or half written passed), RepairOwners did nothing, and the
// server's test double, which reports the meter off after any failed
// write, disagreed (TestFailedSetOwnersAgrees).
func (b *Backend) SetOwners(owners []Owner, holes []netip.Prefix) (err error) {
	if b.owners6 == nil {
		return nil
	}
	owners, holes = slices.Clone(owners), slices.Clone(holes)
	// The routes are asked before the lock is taken (two lookups per
	// prefix): serving goes on meanwhile. A failed lookup leaves that
	// owner to the route lookup per datagram (ownerRules), as before. The
	// ask is numbered, so that a FollowRoutes asking after it and done
	// first keeps its newer answer (adoptOwnerIfs).
	seq := b.routeSeq.Add(1)
	ifs, _ := b.ownerInterfaces(owners)
	b.mu.Lock()
	defer b.mu.Unlock()
	defer b.dropUnsent(&err)
	if !b.ownerMetering() {
		owners, holes = nil, nil
	}
	if _, _, err := ownedSpans(owners, holes); err != nil {
		return err // invalid: not adopted, or every repair would fail on it
	}
	b.gen++
	b.adoptOwnerIfs(owners, ifs, seq)
	b.owners, b.holes, b.hasOwners = owners, holes, true
	b.noteLookedUp()
	return b.writeOwners(owners, holes, false)
}

// RepairOwners writes the owner meter again from the last SetOwners:
// owner chains missing or not holding ownerRules are rewritten (intact
// ones keep their buckets), the maps refilled, chains of no owner
// deleted. It touches nothing else, so it is the retry after Setup or
// Healthy reported ErrOwnerMeter, without re-installing pinholes.
func (b *Backend) RepairOwners() (err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	defer b.dropUnsent(&err)
	b.gen++
	if !b.hasOwners || !b.ownerMetering() {
		return nil
	}
	if err := b.writeOwners(b.owners, b.holes, false); err != nil {
		return fmt.Errorf("pinhole: repair of the owner meter: %w: %w", ErrOwnerMeter, err)
	}
	return nil
}

// MeterDrops are the datagrams the owner chains dropped, by rule, since
// this Backend first saw each chain.
type MeterDrops struct {
	// ReversePath: dropped by the reverse-path rule (Meter.ReversePath):
	// sources in an owner's prefix that arrived where the host does not
	// route that prefix (spoofed, or a multipath route, in strict mode).
	ReversePath uint64
	// OwnerRate: dropped by the owner's limit (Meter.OwnerRate).
	OwnerRate uint64
	// UnownedRate: dropped by the shared limit of the sources no owner
	// holds (Meter.UnownedRate, unownedChain; read by Healthy only).
	UnownedRate uint64
	// Loopback: dropped by the host's loopback bucket (loopbackRules:
	// what the host's own processes, any local user's, send to a served
	// address, over Meter.Rate together; read by Healthy and before
	// Setup rewrites control_local). With the meter on, owners or not.
	Loopback uint64
}

// MeterDrops returns the owner chains' drop counters, added up per rule
// (each chain's counters are per owner: "nft list chain inet pcpd
// owner_..."). It asks the kernel nothing: the counters are read where the
// Backend reads the owner chains anyway, by Healthy (pcpd: every 5 s),
// SetOwners, and before Setup rewrites or SetOwners deletes a chain, so
// the figures lag by up to one Healthy. A chain's counters from before
// this Backend first read it (a previous pcpd's) are not included; drops
// between a chain's last read and its loss to tampering are lost.
func (b *Backend) MeterDrops() MeterDrops {
	return MeterDrops{ReversePath: b.drops[0].Load(), OwnerRate: b.drops[1].Load(), UnownedRate: b.drops[2].Load(),
		Loopback: b.loopDrops.Load()}
}

// foldOwnerCounters adds what owner chain name's counters (its listed
// rules) grew by since its last read to b.drops. A chain not seen before
// sets the base; a counter below the last read was zeroed by a rewrite
// nobody reported, and counts from 0.
func (b *Backend) foldOwnerCounters(name string, rules []*nftables.Rule) {
	var now [3]uint64
	for _, r := range rules {
		kind, n := -1, uint64(0)
		for _, e := range r.Exprs {
			switch e := e.(type) {
			case *expr.Fib:
				kind = 0
			case *expr.Limit:
				kind = 1
				if name == unownedChain {
					kind = 2
				}
			case *expr.Counter:
				n += e.Packets
			}
		}
		if kind >= 0 {
			now[kind] += n
		}
	}
	last, seen := b.ownerCounts[name]
	if b.ownerCounts == nil {
		b.ownerCounts = map[string][3]uint64{}
	}
	b.ownerCounts[name] = now
	if !seen {
		return
	}
	for k := range now {
		d := now[k]
		if d >= last[k] {
			d -= last[k]
		}
		b.drops[k].Add(d)
	}
}

// readOwnerCounters folds owner chain name's counters in before it is
// rewritten or deleted. Best effort: a failed read loses at most what the
// chain dropped since its last read.
func (b *Backend) readOwnerCounters(name string) {
	if _, seen := b.ownerCounts[name]; !seen {
		return
	}
	if rules, err := b.readConn().GetRules(b.table, &nftables.Chain{Table: b.table, Name: name}); err == nil {
		b.foldOwnerCounters(name, rules)
	}
}

// OwnerRange is one prefix of the owner maps and the owner chain it jumps
// to (OwnerChains names each owner's).
type OwnerRange struct {
	Prefix netip.Prefix
	Chain  string
}

// Owners returns the owner maps' contents, IPv6 then IPv4, each in address
// order: the ranges the kernel holds, as prefixes, with their chains.
func (b *Backend) Owners() ([]OwnerRange, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.owners6 == nil {
		return nil, nil
	}
	var out []OwnerRange
	for _, s := range []*nftables.Set{b.owners6, b.owners4} {
		rs, err := b.readIntervals(s)
		if err != nil {
			return nil, err
		}
		for _, r := range rs {
			chain := verdictChain(r.val)
			for _, p := range rangePrefixes(r.first, r.last) {
				out = append(out, OwnerRange{Prefix: p, Chain: chain})
			}
		}
	}
	return out, nil
}

// verdictChain reads the chain name out of a verdict element's data (the
// attributes inside NFTA_DATA_VERDICT: code, then chain).
func verdictChain(b []byte) string {
	for len(b) >= 4 {
		n, typ := int(binaryutil.NativeEndian.Uint16(b[:2])), binaryutil.NativeEndian.Uint16(b[2:4])&^unix.NLA_F_NESTED
		if n < 4 || n > len(b) {
			return ""
		}
		if typ == unix.NFTA_VERDICT_CHAIN {
			return strings.TrimRight(string(b[4:n]), "\x00")
		}
		b = b[min((n+3)&^3, len(b)):]
	}
	return ""
}

// OwnerChains returns each owner's chain name (by Owner.ID), as SetOwners
// names them: a hash of the ID, collisions moved on in ID order.
func OwnerChains(owners []Owner) map[string]string {
	ids := make([]string, 0, len(owners))
	for _, o := range owners {
		ids = append(ids, o.ID)
	}
	slices.Sort(ids)
	ids = slices.Compact(ids)
	out := make(map[string]string, len(ids))
	used := make(map[uint32]bool, len(ids))
	for _, id := range ids {
		h := fnv.New32a()
		h.Write([]byte(id))
		v := h.Sum32()
		for used[v] {
			v++
		}
		used[v] = true
		out[id] = fmt.Sprintf("%s%08x", ownerChainPrefix, v)
	}
	return out
}

// ownerChainBatch bounds the owner chains written in one transaction. The
// nftables library asks the kernel to echo every rule it adds, and the
// kernel queues each echo and ack on the netlink socket before the library
// reads any: past about 75 owner chains of one rule (50 of two) in one
// transaction the socket's receive buffer overflowed and Flush failed with
// ENOBUFS, so pcpd could not install the owner meter for more peers, nor
// repair it (BenchmarkHealthyOwners builds 1000).
const ownerChainBatch = 16

// ownerMapTxn bounds the map elements of one transaction: a transaction is
// one sendmsg, which the netlink socket's send buffer (208 KiB by default)
// bounds, and an owner map element takes about 90 bytes. With more, the
// maps fill over several transactions; for that moment some owners'
// ranges are missing (their sources metered per source only, as
// nobody's), never charged to another owner.
const ownerMapTxn = 1024

// writeOwners replaces both owner maps' contents and the owner chains:
// first the chains of new owners (and, with rewrite, Setup's repair, or
// when their rules are not this pcpd's, existing ones) are written, in
// transactions of ownerChainBatch chains, before any map element jumps to
// them; then one transaction per map (several past ownerMapTxn elements)
// replaces the maps' contents, and last the chains of owners gone are
// deleted, ownerChainBatch per transaction. An existing owner's chain keeps its rules, and
// so its bucket, unless rewritten. A failure part way leaves chains no
// map refers to, which the next call deletes.
func (b *Backend) writeOwners(owners []Owner, holes []netip.Prefix, rewrite bool) error {
	v6, v4, err := ownerMapSpans(owners, holes, b.cfg.Meter.Unowned)
	if err != nil {
		return err
	}
	chains := OwnerChains(owners)
	present, err := b.presentChains()
	if err != nil {
		return err
	}
	if rewrite {
		b.listed = nil // learnt again from the chains written now
	}
	names := make([]string, 0, len(chains))
	for _, name := range chains {
		names = append(names, name)
	}
	slices.Sort(names)
	// Which to write, read before anything is queued.
	write := names[:0:0]
	type replacement struct {
		name   string
		handle uint64
	}
	var replace []replacement
	for _, name := range names {
		if present[name] && rewrite {
			b.readOwnerCounters(name) // its counters are about to be zeroed
		}
		if present[name] && !rewrite {
			// Kept, with its bucket, if its rules are this pcpd's (an
			// older pcpd's chain had the limit alone).
			ok, err := b.ownerChainIntact(name, b.ownerIfs[name])
			if err != nil {
				return err
			}
			if ok {
				continue
			}
			// Only the reverse-path rule differs (its interfaces: a route
			// moved, or a lookup failed, since the last FollowRoutes):
			// replaced in place as FollowRoutes does, so the limit rule,
			// and the owner's bucket, stay (review of 2026-12-03).
			if h, err := b.reversePathHandle(name, b.ownerIfs[name]); err != nil {
				return err
			} else if h != 0 {
				replace = append(replace, replacement{name, h})
				continue
			}
		}
		write = append(write, name)
	}
	for i, r := range replace {
		chain := &nftables.Chain{Table: b.table, Name: r.name}
		b.conn.ReplaceRule(&nftables.Rule{Table: b.table, Chain: chain, Handle: r.handle, Exprs: b.ownerRules(b.ownerIfs[r.name])[0]})
		if (i+1)%ownerChainBatch == 0 || i == len(replace)-1 {
			if err := b.flush(); err != nil {
				return fmt.Errorf("pinhole: replace owner chains' reverse-path rules: %w", classify(err))
			}
		}
	}
	written := make([]string, 0, len(replace)+len(write))
	for _, r := range replace {
		c := b.ownerCounts[r.name]
		c[0] = 0 // the replaced rule counts from 0
		if b.ownerCounts == nil {
			b.ownerCounts = map[string][3]uint64{}
		}
		b.ownerCounts[r.name] = c
		written = append(written, r.name)
	}
	// Chains written count their drops from 0 once their transaction is
	// committed (MeterDrops).
	var pending []string
	committed := func() {
		for _, name := range pending {
			if b.ownerCounts == nil {
				b.ownerCounts = map[string][3]uint64{}
			}
			b.ownerCounts[name] = [3]uint64{}
		}
		pending = pending[:0]
	}
	for i, name := range write {
		c := &nftables.Chain{Table: b.table, Name: name}
		b.conn.AddChain(c)
		b.conn.FlushChain(c)
		for _, r := range b.ownerRules(b.ownerIfs[name]) {
			b.conn.AddRule(&nftables.Rule{Table: b.table, Chain: c, Exprs: r})
		}
		pending = append(pending, name)
		if (i+1)%ownerChainBatch == 0 || i == len(write)-1 {
			// (The last batch is committed here too, so that its chains
			// can be read back before the maps are written.)
			if err := b.flush(); err != nil {
				return fmt.Errorf("pinhole: write owner chains: %w", classify(err))
			}
			committed()
		}
	}
	b.learnListed(append(written, write...))
	for _, x := range []struct {
		s     *nftables.Set
		spans []ownedSpan
	}{{b.owners6, v6}, {b.owners4, v4}} {
		// Each map ends its own transaction, so a cut at ownerMapTxn (even)
		// never separates an interval's start from its end: an IPv6 map of
		// odd length (a range open at the top) cannot shift the IPv4 cuts.
		b.conn.FlushSet(x.s)
		queued := 0
		for elems := ownerElements(x.spans); len(elems) > 0; {
			n := min(len(elems), ownerMapTxn-queued)
			if err := b.queueAddElements(x.s, elems[:n]); err != nil {
				return fmt.Errorf("pinhole: set %s: %w", x.s.Name, err)
			}
			elems, queued = elems[n:], queued+n
			if queued == ownerMapTxn {
				if err := b.flush(); err != nil {
					return fmt.Errorf("pinhole: set owner prefixes: %w", classify(err))
				}
				committed()
				queued = 0
			}
		}
		if err := b.flush(); err != nil {
			return fmt.Errorf("pinhole: set owner prefixes: %w", classify(err))
		}
		committed()
	}
	// Gone owners' chains go last, when no map element jumps to them any
	// more, and ownerChainBatch at a time: every delete is acked, and one
	// transaction deleting hundreds (a WireGuard interface with its peers
	// gone) overflowed the socket with ENOBUFS after the kernel had
	// committed it, so SetOwners reported a failure, kept the old owners,
	// and Healthy and Setup then disagreed with the kernel every 5 s.
	keep := make(map[string]bool, len(chains))
	for _, name := range chains {
		keep[name] = true
	}
	var gone []string
	for name := range present {
		if b.isOwnerChain(name) && !keep[name] {
			gone = append(gone, name)
		}
	}
	slices.Sort(gone)
	for _, name := range gone {
		b.readOwnerCounters(name) // before its counters go with it
	}
	for i, name := range gone {
		c := &nftables.Chain{Table: b.table, Name: name}
		b.conn.FlushChain(c)
		b.conn.DelChain(c)
		if (i+1)%ownerChainBatch == 0 || i == len(gone)-1 {
			if err := b.flush(); err != nil {
				return fmt.Errorf("pinhole: delete owner chains: %w", classify(err))
			}
			for _, name := range gone[i-i%ownerChainBatch : i+1] {
				delete(b.ownerCounts, name)
			}
		}
	}
	return nil
}

// ownerMapSpans are the ranges the owner maps hold for owners and holes
// (SetOwners), one family each, disjoint and in address order: the
// longest match of flattenOwned, less the Meter.Unowned prefixes
// (cutSpans). A hole's range (no chain) is kept; ownerElements gives it no
// element. Unlike a hole, an unowned prefix is nobody's whatever lies
// inside it: an owner's prefix more specific than it is cut too (the
// policy's translated sources are nobody's, however long the owner's
// prefix: policy.Requester).
func ownerMapSpans(owners []Owner, holes, unowned []netip.Prefix) (v6, v4 []ownedSpan, err error) {
	v6, v4, err = ownedSpans(owners, holes)
	if err != nil {
		return nil, nil, err
	}
	c6, c4, err := ownedSpans(nil, unowned)
	if err != nil {
		return nil, nil, err
	}
	return cutSpans(flattenOwned(v6), c6), cutSpans(flattenOwned(v4), c4), nil
}

// cutSpans is spans (disjoint, in address order: flattenOwned's) less
// every address of cuts (any ranges of the same family, in any order,
// overlapping or not): each span's parts outside every cut, with its
// chain, in address order. A span inside a cut is gone; a cut inside a
// span splits it in two.
func cutSpans(spans, cuts []ownedSpan) []ownedSpan {
	if len(cuts) == 0 {
		return spans
	}
	// The cuts, sorted and merged where they overlap: disjoint, in order.
	cuts = slices.Clone(cuts)
	slices.SortFunc(cuts, func(a, b ownedSpan) int { return a.first.Compare(b.first) })
	merged := cuts[:1]
	for _, c := range cuts[1:] {
		if m := &merged[len(merged)-1]; c.first.Compare(m.last) <= 0 {
			if c.last.Compare(m.last) > 0 {
				m.last = c.last
			}
			continue
		}
		merged = append(merged, c)
	}
	var out []ownedSpan
	i := 0 // the first cut not wholly before the span
	for _, s := range spans {
		for i < len(merged) && merged[i].last.Compare(s.first) < 0 {
			i++
		}
		first, left := s.first, true // first: the span's next address not yet emitted or cut
		for _, c := range merged[i:] {
			if c.first.Compare(s.last) > 0 {
				break
			}
			if c.first.Compare(first) > 0 {
				out = append(out, ownedSpan{first, c.first.Prev(), s.chain})
			}
			if c.last.Compare(s.last) >= 0 {
				left = false // the cut runs to the span's end (or past it)
				break
			}
			first = c.last.Next()
		}
		if left {
			out = append(out, ownedSpan{first, s.last, s.chain})
		}
	}
	return out
}

// ownedSpans turns the owners' prefixes and the holes into the spans of
// each family that flattenOwned takes; a hole's span has no chain. Holes
// come last, so a hole equal to an owner's prefix (which the policy never
// hands over) wins: charging nobody is the safe side.
func ownedSpans(owners []Owner, holes []netip.Prefix) (v6, v4 []ownedSpan, err error) {
	chains := OwnerChains(owners)
	add := func(id string, p netip.Prefix, chain string) error {
		if !p.IsValid() {
			return fmt.Errorf("pinhole: owner %q prefix %v: %w", id, p, ErrInvalid)
		}
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		p = p.Masked()
		first, last := prefixRange(p)
		s := ownedSpan{first: first, last: last, chain: chain}
		if p.Addr().Is4() {
			v4 = append(v4, s)
		} else {
			v6 = append(v6, s)
		}
		return nil
	}
	for _, o := range owners {
		for _, p := range o.Prefixes {
			if err := add(o.ID, p, chains[o.ID]); err != nil {
				return nil, nil, err
			}
		}
	}
	for _, p := range holes {
		if err := add("(hole)", p, ""); err != nil {
			return nil, nil, err
		}
	}
	return v6, v4, nil
}

// checkOwnerChains is Healthy's part for the owner meter: every owner
// chain SetOwners made is there with exactly its rules (compared, not
// counted: an owner chain is where a rule of the admin's, or of an
// intruder's, would exempt one client from the meter or charge another),
// and the owner maps hold exactly the ranges SetOwners gave them. The maps
// are as large as the configured prefixes, never the traffic, so dumping
// them is cheap (two netlink dumps of ~2 elements per prefix).
//
// Every error it returns wraps ErrUnhealthy and ErrOwnerMeter: Healthy
// runs it last, so the caller knows that only the owner meter needs
// repair (RepairOwners).
func (w *healthWant) checkOwnerChains(v kview, present map[string]bool, read map[string][]*nftables.Rule) (err error) {
	if !w.meter {
		return nil
	}
	defer func() {
		if err != nil {
			if !errors.Is(err, ErrUnhealthy) {
				err = fmt.Errorf("%w: %w", err, ErrUnhealthy)
			}
			if errors.Is(err, ErrMissing) {
				return // a map gone under this read: Setup, not RepairOwners
			}
			err = fmt.Errorf("%w (%w)", err, ErrOwnerMeter)
		}
	}()
	for _, name := range OwnerChains(w.owners) {
		if !present[name] {
			return fmt.Errorf("pinhole: chain %s missing: %w", name, ErrUnhealthy)
		}
		ok, rules, err := v.ownerChainIntact(name, w.ownerRules[name])
		read[name] = rules
		if err != nil {
			return fmt.Errorf("pinhole: %w: %w", ErrUnhealthy, err)
		}
		if !ok {
			return fmt.Errorf("pinhole: chain %s does not hold the owner meter's rules: %w", name, ErrUnhealthy)
		}
	}
	v6, v4, err := ownerMapSpans(w.owners, w.holes, w.unowned)
	if err != nil {
		return err
	}
	for _, x := range []struct {
		s     *nftables.Set
		spans []ownedSpan
	}{{&w.owners6, v6}, {&w.owners4, v4}} {
		var want []ownedSpan
		for _, sp := range x.spans {
			if sp.chain != "" {
				want = append(want, sp)
			}
		}
		got, err := v.readIntervals(x.s)
		if err != nil {
			return fmt.Errorf("%w: %w", ErrUnhealthy, err)
		}
		if !slices.EqualFunc(got, want, func(g intervalRange, w ownedSpan) bool {
			return g.first == w.first && g.last == w.last && verdictChain(g.val) == w.chain
		}) {
			return fmt.Errorf("pinhole: map %s does not hold the owners' ranges (%d held, %d given): %w", x.s.Name, len(got), len(want), ErrUnhealthy)
		}
	}
	return nil
}

// ownerChainIntact reports whether owner chain name holds exactly
// ownerRules(ifs) (their counters aside), and folds its counters in.
// Caller holds b.mu.
func (b *Backend) ownerChainIntact(name string, ifs []int) (bool, error) {
	ok, rules, err := b.view().ownerChainIntact(name, b.wantOwnerRules(ifs))
	if err == nil {
		b.foldOwnerCounters(name, rules)
	}
	return ok, err
}

// reversePathHandle is the handle of owner chain name's reverse-path rule
// when the chain holds ownerRules(ifs) but for that rule's interfaces (its
// first rule has a fib expression, the others are as wanted); 0 if not.
// Caller holds b.mu.
func (b *Backend) reversePathHandle(name string, ifs []int) (uint64, error) {
	want := b.wantOwnerRules(ifs)
	rules, err := b.view().getRules(name)
	if err != nil {
		return 0, fmt.Errorf("rules of %s: %w", name, classify(err))
	}
	return reversePathRule(rules, want), nil
}

// reversePathRule is the handle of rules' reverse-path rule when they are
// want but for that rule (their first has a fib expression, the others
// are as wanted: they do not depend on the interfaces); 0 if not.
func reversePathRule(rules []*nftables.Rule, want [][]expr.Any) uint64 {
	if len(want) < 2 || len(rules) != len(want) ||
		!slices.ContainsFunc(rules[0].Exprs, func(e expr.Any) bool { _, ok := e.(*expr.Fib); return ok }) {
		return 0
	}
	for i := 1; i < len(rules); i++ {
		if !ruleIs(rules[i], want[i]) {
			return 0
		}
	}
	return rules[0].Handle
}

// ownerChainIntact reports whether owner chain name holds exactly want
// (their counters aside), with the rules it read.
func (v kview) ownerChainIntact(name string, want [][]expr.Any) (bool, []*nftables.Rule, error) {
	rules, err := v.getRules(name)
	if err != nil {
		return false, nil, fmt.Errorf("rules of %s: %w", name, classify(err))
	}
	if len(rules) != len(want) {
		return false, rules, nil
	}
	for i, r := range rules {
		if !ruleIs(r, want[i]) {
			return false, rules, nil
		}
	}
	return true, rules, nil
}

// ruleIs: r holds exactly want's expressions (as listed: wantOwnerRules),
// counters' figures aside.
func ruleIs(r *nftables.Rule, want []expr.Any) bool {
	if len(r.Exprs) != len(want) {
		return false
	}
	for j, e := range r.Exprs {
		if _, ok := e.(*expr.Counter); ok {
			e = &expr.Counter{} // its figures change with traffic
		}
		if !reflect.DeepEqual(e, want[j]) {
			return false
		}
	}
	return true
}

// listedForm is how the Backend expects the kernel and the nftables
// library to list an expression it wrote (asListed); a variable so that a
// test can stand for a kernel or library version that lists differently.
var listedForm = asListed

// wantOwnerRules is what an owner chain with interfaces ifs should list
// (counters zeroed): the rules as the kernel listed them right after this
// Backend wrote such a chain (learnListed), else ownerRules(ifs) as
// listedForm expects them listed. Healthy and SetOwners compare owner
// chains with it. Caller holds b.mu; the slices it returns are never
// changed.
func (b *Backend) wantOwnerRules(ifs []int) [][]expr.Any {
	if l, ok := b.listed[ifsKey(ifs)]; ok {
		return l
	}
	rules := b.ownerRules(ifs)
	for _, r := range rules {
		for j := range r {
			r[j] = listedForm(r[j])
		}
	}
	return rules
}

// ifsKey keys listed by an owner chain's interfaces.
func ifsKey(ifs []int) string { return fmt.Sprint(ifs) }

// learnListed reads back each owner chain of names, just written with
// its ownerIfs, whose interfaces' listing is not known yet (one GetRules
// per set of interfaces, so a handful per write), and keeps its rules as
// the form Healthy compares with (wantOwnerRules). Healthy compared owner
// chains with what the Backend predicted the kernel would list (asListed:
// registers renumbered); a kernel or nftables library that numbers the
// registers otherwise made every intact chain a mismatch, so every check
// repaired the owner meter, and rewrote each chain whole, resetting every
// owner's bucket, every 5 s (review S2). A listing is learnt only if it is
// what this Backend wrote but for the register numbers (listedAsWritten):
// every value (limit rate and burst, verdict, compared data, meta key, fib
// flags) equal. A chain rewritten by hand between the write and the read
// with the same kinds of expressions (a limit's drop made accept) was
// learnt before, and then passed Healthy while every intact chain failed
// it (review4 F4, TestLearnWindowTamper); now it is not learnt, and the
// prediction stands. Setup's repair forgets what was learnt and learns
// again. Caller holds b.mu.
func (b *Backend) learnListed(names []string) {
	for _, name := range names {
		ifs := b.ownerIfs[name]
		key := ifsKey(ifs)
		if _, ok := b.listed[key]; ok {
			continue
		}
		rules, err := b.view().getRules(name)
		if err != nil {
			continue // the prediction stands; Healthy reads again
		}
		b.foldOwnerCounters(name, rules)
		out, ok := listedAsWritten(rules, b.ownerRules(ifs))
		if !ok {
			continue
		}
		if b.listed == nil {
			b.listed = map[string][][]expr.Any{}
		}
		b.listed[key] = out
	}
}

// listedAsWritten returns rules' expressions (counters zeroed) if they are
// wrote's but for register numbers, renumbered consistently within each
// rule (one register written is one listed, and two are two: a compare
// made to read another register than the load wrote is a change); every
// other field equal. Else false.
func listedAsWritten(rules []*nftables.Rule, wrote [][]expr.Any) ([][]expr.Any, bool) {
	if len(rules) != len(wrote) {
		return nil, false
	}
	out := make([][]expr.Any, len(rules))
	for i, r := range rules {
		if len(r.Exprs) != len(wrote[i]) {
			return nil, false
		}
		fwd, back := map[uint32]uint32{}, map[uint32]uint32{}
		for j, e := range r.Exprs {
			if reflect.TypeOf(e) != reflect.TypeOf(wrote[i][j]) {
				return nil, false
			}
			if _, ok := e.(*expr.Counter); ok {
				out[i] = append(out[i], &expr.Counter{})
				continue
			}
			le, lregs := withRegisters(e)
			we, wregs := withRegisters(wrote[i][j])
			if len(lregs) != len(wregs) {
				return nil, false
			}
			for k := range lregs {
				w, l := *wregs[k], *lregs[k]
				if m, ok := fwd[w]; ok && m != l {
					return nil, false
				}
				if m, ok := back[l]; ok && m != w {
					return nil, false
				}
				fwd[w], back[l] = l, w
				*lregs[k] = w
			}
			if !reflect.DeepEqual(le, we) {
				return nil, false
			}
			out[i] = append(out[i], e)
		}
	}
	return out, true
}

// withRegisters is a copy of e and its register fields (for the kinds
// pinhole writes), so that they can be compared, or renumbered, apart from
// its values.
func withRegisters(e expr.Any) (expr.Any, []*uint32) {
	switch v := e.(type) {
	case *expr.Meta:
		c := *v
		return &c, []*uint32{&c.Register}
	case *expr.Fib:
		c := *v
		return &c, []*uint32{&c.Register}
	case *expr.Cmp:
		c := *v
		return &c, []*uint32{&c.Register}
	case *expr.Payload:
		c := *v
		return &c, []*uint32{&c.SourceRegister, &c.DestRegister}
	case *expr.Lookup:
		c := *v
		return &c, []*uint32{&c.SourceRegister, &c.DestRegister}
	case *expr.Bitwise:
		c := *v
		return &c, []*uint32{&c.SourceRegister, &c.DestRegister}
	case *expr.Immediate:
		c := *v
		return &c, []*uint32{&c.Register}
	case *expr.Ct:
		c := *v
		return &c, []*uint32{&c.Register}
	case *expr.Range:
		c := *v
		return &c, []*uint32{&c.Register}
	case *expr.NAT:
		c := *v
		return &c, []*uint32{&c.RegAddrMin, &c.RegAddrMax, &c.RegProtoMin, &c.RegProtoMax}
	case *expr.Dynset:
		c := *v
		return &c, []*uint32{&c.SrcRegKey, &c.SrcRegData}
	}
	return e, nil
}

// asListed is e (of the kinds pinhole writes) as the kernel lists it: a
// 32-bit register that starts a 128-bit one under the old number
// (NFT_REG32_00 is listed as NFT_REG_1).
func asListed(e expr.Any) expr.Any {
	c, regs := withRegisters(e)
	for _, r := range regs {
		if *r >= unix.NFT_REG32_00 && (*r-unix.NFT_REG32_00)%4 == 0 {
			*r = unix.NFT_REG_1 + (*r-unix.NFT_REG32_00)/4
		}
	}
	if n, ok := c.(*expr.NAT); ok {
		// The kernel takes a range's missing end as its start
		// (nft_nat_init), and lists both.
		if n.RegAddrMax == 0 {
			n.RegAddrMax = n.RegAddrMin
		}
		if n.RegProtoMax == 0 {
			n.RegProtoMax = n.RegProtoMin
		}
	}
	return c
}

// ownedSpan is an address range and the owner chain it maps to; "" is a
// hole (owned by nobody), which gets no element.
type ownedSpan struct {
	first, last netip.Addr
	chain       string
}

// flattenOwned turns prefixes (one family; nested or disjoint, as prefixes
// are) into disjoint ranges in address order, each address going to the
// owner of the longest prefix holding it, with adjacent ranges of the same
// owner merged. Equal prefixes of two owners (which the policy refuses)
// go to the later one.
func flattenOwned(spans []ownedSpan) []ownedSpan {
	// Outer before inner: by first address, then the wider range first.
	slices.SortStableFunc(spans, func(a, b ownedSpan) int {
		if c := a.first.Compare(b.first); c != 0 {
			return c
		}
		return b.last.Compare(a.last)
	})
	var out []ownedSpan
	emit := func(first, last netip.Addr, chain string) {
		if first.Compare(last) > 0 {
			return
		}
		if n := len(out); n > 0 && out[n-1].chain == chain && out[n-1].last.Next() == first {
			out[n-1].last = last
			return
		}
		out = append(out, ownedSpan{first, last, chain})
	}
	var (
		stack []ownedSpan
		cur   netip.Addr // first address not yet emitted; invalid: past the end
	)
	// pop closes the innermost open range: what is left of it up to its
	// end is its owner's.
	pop := func() {
		top := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if cur.IsValid() {
			emit(cur, top.last, top.chain)
			if cur.Compare(top.last) <= 0 {
				cur = top.last.Next()
			}
		}
	}
	for _, s := range spans {
		for len(stack) > 0 && stack[len(stack)-1].last.Compare(s.first) < 0 {
			pop()
		}
		if len(stack) > 0 && cur.IsValid() && cur.Compare(s.first) < 0 {
			// The enclosing range owns what lies before the inner one.
			emit(cur, s.first.Prev(), stack[len(stack)-1].chain)
		}
		cur = s.first
		stack = append(stack, s)
	}
	for len(stack) > 0 {
		pop()
	}
	return out
}

// ownerElements encodes disjoint ranges for an interval map: a start
// element jumping to the owner's chain, an end element one past the last address
// (none at the end of the address space). Adjacent ranges of different
// owners share a key, as an end and as a start. A hole's range has no
// element: the map misses there, as outside every owner's prefix.
func ownerElements(spans []ownedSpan) []nftables.SetElement {
	var elems []nftables.SetElement
	for _, s := range spans {
		if s.chain == "" {
			continue
		}
		elems = append(elems, nftables.SetElement{Key: s.first.AsSlice(),
			VerdictData: &expr.Verdict{Kind: expr.VerdictJump, Chain: s.chain}})
		if end := s.last.Next(); end.IsValid() {
			elems = append(elems, nftables.SetElement{Key: end.AsSlice(), IntervalEnd: true})
		}
	}
	return elems
}

// ownerChainsWithoutOnward are the owner chains present in a table that
// has no controlMeterChain yet, when this Backend's layout has it: a table
// laid out before the one-lookup owner meter (h/errrows2), whose owner
// chains end with their limit and return to control_local. Setup's
// transaction makes control_local end "goto unowned", so until the owner
// meter's write (SetOwners, after Setup) rewrote them an owned datagram
// its owner's bucket passed fell through to the unowned bucket and was
// charged to both (review9 U1, TestUpgradeOwnerChainsReturnR9). Caller
// holds b.mu.
func (b *Backend) ownerChainsWithoutOnward() ([]string, error) {
	if !b.ownerLayout() {
		return nil, nil
	}
	ok, err := b.tableExists()
	if err != nil || !ok {
		return nil, err
	}
	present, err := b.presentChains()
	if err != nil {
		return nil, fmt.Errorf("pinhole: owner chains: %w", err)
	}
	if present[controlMeterChain] {
		return nil, nil // their goto is there, or Healthy's to find missing
	}
	var out []string
	for name := range present {
		if !b.isOwnerChain(name) {
			continue
		}
		// Only a chain that ends with its limit: one flushed by a run
		// without the meter (queueStaleControlRemoval) would pass its
		// owner's datagrams on unlimited, where returning charges them
		// to the unowned bucket until the owner meter's write.
		rules, err := b.view().getRules(name)
		if err != nil {
			return nil, fmt.Errorf("pinhole: rules of %s: %w", name, classify(err))
		}
		if n := len(rules); n > 0 && slices.ContainsFunc(rules[n-1].Exprs, func(e expr.Any) bool { _, ok := e.(*expr.Limit); return ok }) {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out, nil
}

// writeOwnerChainsOnward appends "goto control_meter" to each of names
// (ownerChainsWithoutOnward), right after Setup's transaction made
// control_meter, in transactions of ownerChainBatch chains (one would
// overflow the netlink socket with many owners). An owner chain so
// completed is what ownerRules writes when its interfaces are unchanged,
// so the owner meter's write keeps it and its bucket. Caller holds b.mu.
func (b *Backend) writeOwnerChainsOnward(names []string) error {
	for i, name := range names {
		b.conn.AddRule(&nftables.Rule{Table: b.table, Chain: &nftables.Chain{Table: b.table, Name: name},
			Exprs: x(goTo(controlMeterChain))})
		if (i+1)%ownerChainBatch == 0 || i == len(names)-1 {
			if err := b.flush(); err != nil {
				return fmt.Errorf("owner chains on to %s: %w: %w", controlMeterChain, ErrOwnerMeter, classify(err))
			}
		}
	}
	return nil
}
