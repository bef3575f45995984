package pinhole

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Routes tells the owner meter's reverse-path check which interfaces the
// host routes an owned prefix through (ownerRules: datagrams arriving on
// them skip the route lookup): Config.Routes, which pcpd sets to
// NetlinkRoutes().
type Routes interface {
	// Interfaces returns the indexes of the interfaces through which the
	// host routes every address of p: every next hop of the route that
	// holds all of p, none when no single unicast route does (no route,
	// a reject route, or a more specific route near either end of p).
	// An error is a failed lookup, not a missing route.
	Interfaces(p netip.Prefix) ([]int, error)
}

// NetlinkRoutes answers Routes with route lookups in the calling
// process's network namespace (that of the calling thread when it is
// called), watched. Each prefix costs two lookups
// (RTM_GETROUTE with RTM_F_FIB_MATCH, which returns the matched route
// whole, every next hop of a multipath route included, where a plain
// lookup returns the one next hop its hash picks): of the first and the
// last address of p (past the host's own, routeFrom), which must find the
// same route holding all of p; a more specific route strictly inside p
// must lead through the same interfaces (from the route dump, below). The
// host's own addresses inside p are not seen: they count as routed where
// the rest of p is (a datagram from them arriving
// there passes unlooked, as with the check off). The lookups follow
// the host's policy rules as a lookup of the host's own would, without an
// input interface.
//
// It keeps a socket of its own for all its lookups (one per
// lookup, as netlink's package functions do, would cost a socket's
// creation per lookup: FollowRoutes makes 4 000 a round at 1 000 owners,
// ≈ 45 ms of CPU with the kept socket, BenchmarkFollowRoutes), and opens
// one per lookup only if that socket cannot be had.
//
// It answers "none" (every datagram looked up, as the fib rule alone)
// whenever the lookups cannot stand for the kernel's own check (review of
// 2026-12-03, branch h/review3): the kernel's reverse-path lookup runs
// from the datagram's destination and arrival interface, so with policy
// rules beyond the three default ones (source-based routing of the served
// addresses, "to" rules into other tables, a VRF's l3mdev rule) a lookup
// without them may name the wrong interface; and a route strictly inside
// p through another interface (a /64 of the owner's /48 carved out to
// another LAN) is not seen by the two lookups at p's ends. Both are read
// from a dump of the rules and of the routes, kept for dumpTTL.
//
// It also watches the namespace's links, addresses, routes and policy
// rules (RouteWatcher): FollowRoutes then skips its lookups while nothing
// changed, and pcpd follows a change at once rather than at its next
// check. If the watch's socket cannot be had, Generation says it cannot
// tell and every FollowRoutes asks. It took a netlink.Handle before, and
// with one given watched nothing, as it cannot tell a handle's namespace:
// an embedder's (or a test's) pcpd then asked every round and followed a
// change only at its next check (review of 2026-12-03). A namespace other
// than the caller's is NetlinkRoutesAt's.
func NetlinkRoutes() WatchedRoutes {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		h = &netlink.Handle{} // what netlink's package functions use
	}
	n := &netlinkRoutes{h: h, ownH: err == nil}
	if sock, err := nl.Subscribe(unix.NETLINK_ROUTE, watchGroups...); err == nil {
		n.watch = startWatch(sock)
	}
	return n
}

// WatchedRoutes are Routes whose namespace is watched (NetlinkRoutes,
// NetlinkRoutesAt). Close releases their sockets.
type WatchedRoutes interface {
	Routes
	RouteWatcher
	Close() error
}

// NetlinkRoutesAt is NetlinkRoutes for network namespace ns, watched.
// Close releases its sockets. Its handle has a route socket only:
// netlink.NewHandleAt without families opens every family it supports, a
// NETLINK_NETFILTER socket among them, whose close waits for the
// namespace's nftables commit lock and an RCU grace period
// (BENCHMARKS.md items 41, 42).
func NetlinkRoutesAt(ns netns.NsHandle) (WatchedRoutes, error) {
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("pinhole: route lookups: %w", err)
	}
	sock, err := nl.SubscribeAt(ns, netns.None(), unix.NETLINK_ROUTE, watchGroups...)
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("pinhole: route watch: %w", err)
	}
	return &netlinkRoutes{h: h, ownH: true, watch: startWatch(sock)}, nil
}

// RouteWatcher is an optional extra of a Routes (NetlinkRoutes has it):
// it tells when what Interfaces answers may have changed.
type RouteWatcher interface {
	// Generation changes whenever the host's links, addresses, routes or
	// policy rules may have changed; ok is false when it cannot tell (no
	// watch, or the watch broke), and every FollowRoutes asks again.
	Generation() (gen uint64, ok bool)
	// Changes receives (coalesced) after each such change.
	Changes() <-chan struct{}
}

// watchGroups are the rtnetlink groups whose messages may change what
// NetlinkRoutes answers: links (an interface gone, or a new one, perhaps
// under a reused index), addresses (the local table's host routes),
// routes and policy rules of both families.
var watchGroups = []uint{unix.RTNLGRP_LINK, unix.RTNLGRP_IPV4_IFADDR, unix.RTNLGRP_IPV6_IFADDR,
	unix.RTNLGRP_IPV4_ROUTE, unix.RTNLGRP_IPV6_ROUTE, unix.RTNLGRP_IPV4_RULE, unix.RTNLGRP_IPV6_RULE}

// routeWatch counts the notifications of one subscribed socket.
type routeWatch struct {
	sock    *nl.NetlinkSocket
	gen     atomic.Uint64
	live    atomic.Bool
	changed chan struct{}
}

func startWatch(sock *nl.NetlinkSocket) *routeWatch {
	w := &routeWatch{sock: sock, changed: make(chan struct{}, 1)}
	w.live.Store(true)
	go w.run()
	return w
}

// run counts every notification, and every failed receive too: ENOBUFS
// means notifications were lost, so anything may have changed. Any other
// error (the socket closed) ends the watch, and Generation then reports
// that it cannot tell.
func (w *routeWatch) run() {
	for {
		msgs, _, err := w.sock.Receive()
		if err == nil && len(msgs) == 0 {
			continue
		}
		if err != nil && !errors.Is(err, unix.ENOBUFS) && !errors.Is(err, unix.EINTR) {
			w.live.Store(false)
		}
		w.gen.Add(1)
		select {
		case w.changed <- struct{}{}:
		default:
		}
		if !w.live.Load() {
			return
		}
	}
}

// Generation reports the watch's count of changes (RouteWatcher).
func (n *netlinkRoutes) Generation() (uint64, bool) {
	if n.watch == nil || !n.watch.live.Load() {
		return 0, false
	}
	return n.watch.gen.Load(), true
}

// Changes receives after changes (RouteWatcher); nil without a watch.
func (n *netlinkRoutes) Changes() <-chan struct{} {
	if n.watch == nil {
		return nil
	}
	return n.watch.changed
}

// Close releases the lookups' and the watch's sockets.
func (n *netlinkRoutes) Close() error {
	if n.watch != nil {
		n.watch.sock.Close()
	}
	if n.ownH {
		n.h.Close()
	}
	return nil
}

// dumpTTL is how long NetlinkRoutes uses one dump of the policy rules and
// routes: a FollowRoutes round asks every owner's prefixes within it.
const dumpTTL = time.Second

type netlinkRoutes struct {
	h     *netlink.Handle
	ownH  bool        // h is this netlinkRoutes' own (Close closes it)
	watch *routeWatch // nil: none

	mu      sync.Mutex
	at      time.Time
	dumpGen uint64             // the watch's generation when the dump was taken
	dumps   uint64             // dumps taken (tests: one per round under churn)
	custom  [2]bool            // per family (0 IPv4, 1 IPv6): policy rules beyond the defaults
	routes  [2][]netlink.Route // per family: every table's routes but local's
}

// family indexes netlinkRoutes' per-family state.
func family(p netip.Prefix) (idx, af int) {
	if p.Addr().Is4() {
		return 0, unix.AF_INET
	}
	return 1, unix.AF_INET6
}

// dump returns, for p's family, whether the host has policy rules beyond
// the defaults and its routes outside the local table, from a dump at
// most dumpTTL old and, watched, taken since the last change (round
// false) or at or after the watch's generation asOf (round true: a
// FollowRoutes round, which read asOf before asking; interfacesAsOf).
// Before, every call of a round compared with the generation of now, so
// on a host whose routes keep changing (a router with a full BGP table)
// each asked prefix re-dumped every table: 100 owners, 10 000 routes, a
// route moved every 2 ms, 2.9 s a round against 15 ms unwatched (review4
// F2, TestFollowRoutesUnderChurn). A change during the round is in the
// dump or moves the generation past the one the round records, so the
// next round asks again.
func (n *netlinkRoutes) dump(p netip.Prefix, asOf uint64, round bool) (bool, []netlink.Route, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	gen, watched := n.Generation()
	stale := watched && gen != n.dumpGen
	if round {
		stale = watched && n.dumpGen < asOf
	}
	if n.at.IsZero() || time.Since(n.at) > dumpTTL || stale {
		for i, af := range []int{unix.AF_INET, unix.AF_INET6} {
			rules, err := n.h.RuleList(af)
			if err != nil {
				return false, nil, fmt.Errorf("pinhole: policy rules: %w", err)
			}
			n.custom[i] = slices.ContainsFunc(rules, func(r netlink.Rule) bool { return !defaultRule(r) })
			routes, err := n.h.RouteListFiltered(af, &netlink.Route{Table: unix.RT_TABLE_UNSPEC}, netlink.RT_FILTER_TABLE)
			if err != nil {
				return false, nil, fmt.Errorf("pinhole: routes: %w", err)
			}
			n.routes[i] = slices.DeleteFunc(routes, func(r netlink.Route) bool { return r.Table == unix.RT_TABLE_LOCAL })
		}
		n.at, n.dumpGen = time.Now(), gen
		n.dumps++
	}
	i, _ := family(p)
	return n.custom[i], n.routes[i], nil
}

// defaultRule: r is one of the policy rules every namespace starts with
// (0: lookup local, 32766: lookup main, 32767: lookup default), with no
// selector.
func defaultRule(r netlink.Rule) bool {
	switch {
	case r.Priority == 0 && r.Table == unix.RT_TABLE_LOCAL,
		r.Priority == 32766 && r.Table == unix.RT_TABLE_MAIN,
		r.Priority == 32767 && r.Table == unix.RT_TABLE_DEFAULT:
	default:
		return false
	}
	return r.Src == nil && r.Dst == nil && r.IifName == "" && r.OifName == "" && r.Mark == 0 && r.Mask == nil &&
		!r.Invert && r.Tos == 0 && r.IPProto == 0 && r.Dport == nil && r.Sport == nil && r.UIDRange == nil
}

// routeIfs are r's interfaces: every next hop's.
func routeIfs(r *netlink.Route) []int {
	var ifs []int
	for _, nh := range r.MultiPath {
		ifs = append(ifs, nh.LinkIndex)
	}
	if len(r.MultiPath) == 0 {
		ifs = append(ifs, r.LinkIndex)
	}
	ifs = slices.DeleteFunc(ifs, func(i int) bool { return i <= 0 })
	slices.Sort(ifs)
	return slices.Compact(ifs)
}

func (n *netlinkRoutes) Interfaces(p netip.Prefix) ([]int, error) {
	return n.interfaces(p, 0, false)
}

// interfacesAsOf is Interfaces from a dump taken at or after the watch's
// generation asOf (dump): one dump per FollowRoutes round however much
// the host's routes churn meanwhile.
func (n *netlinkRoutes) interfacesAsOf(p netip.Prefix, asOf uint64) ([]int, error) {
	return n.interfaces(p, asOf, true)
}

func (n *netlinkRoutes) interfaces(p netip.Prefix, asOf uint64, round bool) ([]int, error) {
	p = p.Masked()
	custom, routes, err := n.dump(p, asOf, round)
	if custom || err != nil {
		return nil, err
	}
	lo, hi := prefixRange(p)
	first, err := n.routeFrom(lo, p, netip.Addr.Next)
	if first == nil || err != nil {
		return nil, err
	}
	last, err := n.routeFrom(hi, p, netip.Addr.Prev)
	if last == nil || err != nil {
		return nil, err
	}
	dst := routeDst(first, p)
	if !dst.IsValid() || dst.Bits() > p.Bits() || routeDst(last, p) != dst || first.Type != unix.RTN_UNICAST {
		return nil, nil
	}
	ifs := routeIfs(first)
	for i := range routes {
		// A route strictly inside p (the lookups at p's ends do not see
		// it) must lead through these interfaces too, or p has none.
		in := routeDst(&routes[i], p)
		if !in.IsValid() || in.Bits() <= p.Bits() || !p.Contains(in.Addr()) {
			continue
		}
		if routes[i].Type != unix.RTN_UNICAST || !isSubset(routeIfs(&routes[i]), ifs) {
			return nil, nil
		}
	}
	return ifs, nil
}

// isSubset: every element of a is in b.
func isSubset(a, b []int) bool {
	return !slices.ContainsFunc(a, func(i int) bool { return !slices.Contains(b, i) })
}

// localProbes bounds the addresses routeFrom tries past the host's own.
const localProbes = 8

// routeFrom is the route of a, or of the first address from a on (step)
// inside p that is not the host's own: a prefix on one of the host's links
// holds host routes of the local table (its addresses, IPv6's
// subnet-router anycast address, IPv4's network and broadcast addresses),
// which say nothing of where the prefix is routed. Nil: no route, or only
// the host's own addresses within localProbes.
func (n *netlinkRoutes) routeFrom(a netip.Addr, p netip.Prefix, step func(netip.Addr) netip.Addr) (*netlink.Route, error) {
	for range localProbes {
		r, err := n.route(a)
		if r == nil || err != nil {
			return nil, err
		}
		switch r.Type {
		case unix.RTN_LOCAL, unix.RTN_BROADCAST, unix.RTN_ANYCAST:
			// (IPv4 reports these in table main with fibmatch.)
		default:
			if r.Table != unix.RT_TABLE_LOCAL {
				return r, nil
			}
		}
		if a = step(a); !a.IsValid() || !p.Contains(a) {
			break
		}
	}
	return nil, nil
}

// route is the route the host matches a, whole (nil: none).
func (n *netlinkRoutes) route(a netip.Addr) (*netlink.Route, error) {
	rs, err := n.h.RouteGetWithOptions(a.AsSlice(), &netlink.RouteGetOptions{FIBMatch: true})
	switch {
	case errors.Is(err, unix.ENETUNREACH), errors.Is(err, unix.EHOSTUNREACH), errors.Is(err, unix.ESRCH),
		errors.Is(err, unix.EACCES), errors.Is(err, unix.EINVAL):
		// No route, or a reject route (unreachable, prohibit): no
		// interface routes it.
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("pinhole: route of %v: %w", a, err)
	case len(rs) != 1:
		return nil, nil
	}
	return &rs[0], nil
}

// routeDst is r's destination prefix (a default route has none listed).
func routeDst(r *netlink.Route, p netip.Prefix) netip.Prefix {
	if r.Dst == nil {
		if p.Addr().Is4() {
			return netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		}
		return netip.PrefixFrom(netip.IPv6Unspecified(), 0)
	}
	a, ok := netip.AddrFromSlice(r.Dst.IP)
	ones, _ := r.Dst.Mask.Size()
	if !ok {
		return netip.Prefix{}
	}
	if p.Addr().Is4() {
		a = a.Unmap()
	}
	return netip.PrefixFrom(a, ones).Masked()
}

// ownerInterfaces is, per owner chain, the interfaces through which the
// host routes every prefix of the owner (Config.Routes): the intersection
// over its prefixes, none when they are routed apart (the chain then looks
// every datagram's route up, as without them). An owner whose lookup
// failed has none, so its datagrams are all looked up (err says why);
// with the check off, nothing is asked. It takes no lock: Config.Routes is fixed.
func (b *Backend) ownerInterfaces(owners []Owner) (map[string][]int, error) {
	if b.cfg.Meter.ReversePath == ReversePathOff || b.cfg.Routes == nil || len(owners) == 0 {
		return nil, nil
	}
	ask := b.cfg.Routes.Interfaces
	if r, ok := b.cfg.Routes.(interface {
		RouteWatcher
		interfacesAsOf(netip.Prefix, uint64) ([]int, error)
	}); ok {
		if gen, watched := r.Generation(); watched {
			// One dump for the whole round (netlinkRoutes.dump).
			ask = func(p netip.Prefix) ([]int, error) { return r.interfacesAsOf(p, gen) }
		}
	}
	chains := OwnerChains(owners)
	out := make(map[string][]int, len(chains))
	failed := map[string]bool{}
	seen := map[string]bool{}
	var errs []error
	for _, o := range owners {
		name := chains[o.ID]
		for _, p := range o.Prefixes {
			if p.Addr().Is4In6() && p.Bits() >= 96 {
				p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
			}
			if !p.IsValid() || failed[name] {
				continue
			}
			ifs, err := ask(p)
			if err != nil {
				failed[name] = true
				errs = append(errs, fmt.Errorf("owner %q: %w", o.ID, err))
				continue
			}
			if !seen[name] {
				seen[name], out[name] = true, ifs
				continue
			}
			out[name] = slices.DeleteFunc(out[name], func(i int) bool { return !slices.Contains(ifs, i) })
		}
	}
	for name := range failed {
		// No interfaces: every datagram of the owner looked up, as the
		// fib rule alone, until a lookup succeeds (review of 2026-12-03:
		// keeping the last interfaces let a route that moved away pass
		// unlooked for as long as the lookups failed).
		out[name] = nil
	}
	for name := range out {
		if len(out[name]) == 0 {
			out[name] = nil
		}
	}
	return out, errors.Join(errs...)
}

// FollowRoutes asks the routes of the owners' prefixes again and rewrites
// the reverse-path rule of every owner chain whose interfaces changed (a
// route moved to another interface, a next hop added or gone, an
// interface re-created with a new index), in place: the chain's limit
// rule, and so its bucket, stays. pcpd calls it before each Healthy
// (server: every TamperInterval, 5 s), and, when Config.Routes watches the
// host (RouteWatcher: NetlinkRoutes()), 250 ms after a change it reports
// (RouteChanges), at most once a second, which bounds how long the check lags a route change;
// until then, a datagram arriving on an interface the owner's prefix moved
// to meets the route lookup (the fib expression), which passes it, and one
// arriving on the interface the prefix left still passes unlooked. The
// lookups run without the lock; with a watch, a round skips them when
// nothing changed since the last round that asked for every owner and
// this Backend wrote nothing since (a minute at most). An answer replaces
// only an older one (routeSeq: SetOwners asks too). An owner whose lookup
// failed gets no interfaces (the error says which).
func (b *Backend) FollowRoutes() (err error) {
	b.mu.Lock()
	if !b.hasOwners || !b.ownerMetering() || b.cfg.Meter.ReversePath == ReversePathOff || b.cfg.Routes == nil {
		b.mu.Unlock()
		return nil
	}
	rw, _ := b.cfg.Routes.(RouteWatcher)
	var rgen uint64
	watched := false
	if rw != nil {
		rgen, watched = rw.Generation()
	}
	if watched && b.followed.ok && b.followed.routes == rgen && b.followed.gen == b.gen && time.Since(b.followed.at) < followMaxSkip {
		// Nothing the answers depend on changed since the last round,
		// nor did this Backend write: the same lookups would give the
		// same answers (at 1 000 owners ≈ 49 ms a round).
		b.mu.Unlock()
		return nil
	}
	owners := b.owners
	b.mu.Unlock()
	seq := b.routeSeq.Add(1)
	ifs, lerr := b.ownerInterfaces(owners)
	b.mu.Lock()
	defer b.mu.Unlock()
	defer b.dropUnsent(&err)
	defer b.noteLookedUp() // whatever was written, before the unlock
	// Remembered when the round asked every owner of now and wrote every
	// answer: a later round with the same generations may skip.
	done, werr := false, error(nil)
	defer func() {
		b.followed.ok = done && watched && lerr == nil && werr == nil
		b.followed.routes, b.followed.gen, b.followed.at = rgen, b.gen, time.Now()
	}()
	asked, cur := chainPrefixes(owners), chainPrefixes(b.owners)
	done = maps.EqualFunc(asked, cur, slices.Equal)
	var changed []string
	for name, now := range ifs {
		if pfx, ok := cur[name]; !ok || !slices.Equal(pfx, asked[name]) || b.ownerIfsSeq[name] > seq {
			// The owner's prefixes changed meanwhile (SetOwners asked for
			// the new ones), or a SetOwners that asked after this call
			// did has written a newer answer: this one is older.
			continue
		}
		if !slices.Equal(now, b.ownerIfs[name]) {
			changed = append(changed, name)
		} else {
			b.setOwnerIfs(name, now, seq)
		}
	}
	slices.Sort(changed)
	if len(changed) == 0 {
		return lerr
	}
	b.gen++ // a Healthy reading meanwhile reads again
	var pending, replaced []string
	committed := func() {
		replaced = append(replaced, pending...)
		for _, name := range pending {
			b.setOwnerIfs(name, ifs[name], seq)
			c := b.ownerCounts[name]
			c[0] = 0 // the replaced rule counts from 0
			b.ownerCounts[name] = c
		}
		pending = pending[:0]
	}
	for _, name := range changed {
		chain := &nftables.Chain{Table: b.table, Name: name}
		rules, err := b.view().getRules(name)
		if err != nil {
			werr = err
			return errors.Join(lerr, fmt.Errorf("pinhole: rules of %s: %w", name, classify(err)))
		}
		b.foldOwnerCounters(name, rules)
		// Replaced in place only when the chain holds this pcpd's rules
		// but for the reverse-path rule's interfaces (reversePathRule):
		// the chain is read back and learnt once written (learnListed),
		// so a limit rule changed by hand (another rate, accept for
		// drop) was learnt as the listing Healthy compares with, and
		// passed every check after (review4 F1).
		handle := reversePathRule(rules, b.wantOwnerRules(b.ownerIfs[name]))
		if handle == 0 {
			// Not this pcpd's rules (damaged, or gone): Healthy reports
			// it, and RepairOwners writes the chain whole, with these.
			b.setOwnerIfs(name, ifs[name], seq)
			continue
		}
		b.conn.ReplaceRule(&nftables.Rule{Table: b.table, Chain: chain, Handle: handle, Exprs: b.ownerRules(ifs[name])[0]})
		pending = append(pending, name)
		if len(pending) == ownerChainBatch {
			if err := b.flush(); err != nil {
				werr = err
				return errors.Join(lerr, fmt.Errorf("pinhole: follow routes: %w", classify(err)))
			}
			committed()
		}
	}
	if len(pending) > 0 {
		if err := b.flush(); err != nil {
			werr = err
			return errors.Join(lerr, fmt.Errorf("pinhole: follow routes: %w", classify(err)))
		}
		committed()
	}
	b.learnListed(replaced)
	return lerr
}

// setOwnerIfs records ifs, answered by the route ask numbered seq, as
// owner chain name's interfaces. Caller holds b.mu.
func (b *Backend) setOwnerIfs(name string, ifs []int, seq uint64) {
	if b.ownerIfs == nil {
		b.ownerIfs, b.ownerIfsSeq = map[string][]int{}, map[string]uint64{}
	}
	b.ownerIfs[name], b.ownerIfsSeq[name] = ifs, seq
}

// adoptOwnerIfs replaces ownerIfs for SetOwners' owners: each chain gets
// the interfaces of SetOwners' own route ask (ifs, numbered seq), unless
// it holds a newer answer for the same prefixes: SetOwners and
// FollowRoutes both ask the routes before they take b.mu, so a
// FollowRoutes that asked later could finish first, and its answer, the
// newer one, was overwritten by SetOwners' older one until the next
// FollowRoutes, up to 5 s later (review of 2026-12-03). Caller holds b.mu;
// b.owners is still the previous owners.
func (b *Backend) adoptOwnerIfs(owners []Owner, ifs map[string][]int, seq uint64) {
	prev, next := chainPrefixes(b.owners), chainPrefixes(owners)
	newIfs, newSeq := make(map[string][]int, len(next)), make(map[string]uint64, len(next))
	for name, pfx := range next {
		if s := b.ownerIfsSeq[name]; s > seq {
			if old, ok := prev[name]; ok && slices.Equal(old, pfx) {
				newIfs[name], newSeq[name] = b.ownerIfs[name], s
				continue
			}
		}
		newIfs[name], newSeq[name] = ifs[name], seq
	}
	b.ownerIfs, b.ownerIfsSeq = newIfs, newSeq
}

// RouteLookupOwners returns the owners (ID order) whose owner chain's
// reverse-path rule passes no interface unlooked: their prefixes are not
// routed as one through one set of interfaces (no route, a reject route,
// a more specific route elsewhere, policy rules: Routes.Interfaces), or
// their lookup failed, so the kernel looks up the route (the fib
// expression) of every request from them. On the bench's load that lookup
// and its RCU frees were 3.3 % of all CPU samples (BENCHMARKS.md item 28),
// unseen until then: pcpd reports these owners (a gauge, and a log line
// when one enters the state) so that the operator can route the owner's
// prefix through its interface. It is as of the last SetOwners or
// FollowRoutes, and empty with the check off or without Config.Routes
// (every request is looked up then, as configured). It takes no lock.
func (b *Backend) RouteLookupOwners() []Owner {
	if p := b.lookedUp.Load(); p != nil {
		return *p
	}
	return nil
}

// noteLookedUp records RouteLookupOwners from b.owners and b.ownerIfs.
// Caller holds b.mu.
func (b *Backend) noteLookedUp() {
	var out []Owner
	if b.cfg.Meter.ReversePath != ReversePathOff && b.cfg.Routes != nil && b.ownerMetering() {
		chains := OwnerChains(b.owners)
		byID := map[string]int{}
		for _, o := range b.owners {
			if len(o.Prefixes) == 0 || len(b.ownerIfs[chains[o.ID]]) > 0 {
				continue
			}
			if i, ok := byID[o.ID]; ok {
				out[i].Prefixes = append(out[i].Prefixes, o.Prefixes...)
				continue
			}
			byID[o.ID] = len(out)
			out = append(out, Owner{ID: o.ID, Prefixes: slices.Clone(o.Prefixes)})
		}
		slices.SortFunc(out, func(a, c Owner) int { return strings.Compare(a.ID, c.ID) })
	}
	b.lookedUp.Store(&out)
}

// chainPrefixes is, per owner chain, the prefixes of its owner, as given:
// what its route ask was for.
func chainPrefixes(owners []Owner) map[string][]netip.Prefix {
	chains := OwnerChains(owners)
	out := make(map[string][]netip.Prefix, len(chains))
	for _, o := range owners {
		out[chains[o.ID]] = append(out[chains[o.ID]], o.Prefixes...)
	}
	return out
}

// followMaxSkip bounds how long FollowRoutes skips its lookups on an
// unchanged watch generation: a notification the watch never saw (none is
// known to be lost without ENOBUFS) is followed within it.
const followMaxSkip = time.Minute

// RouteChanges receives after a change of the host's links, addresses,
// routes or policy rules when Config.Routes watches them (RouteWatcher;
// NetlinkRoutes() does), nil otherwise: the caller then runs
// FollowRoutes, so that the reverse-path rule follows within moments,
// not at the next check (an interface gone and its index reused by a
// device moved into the namespace passed the owner's check unlooked until
// then, up to 5 s: review of 2026-12-03).
func (b *Backend) RouteChanges() <-chan struct{} {
	if rw, ok := b.cfg.Routes.(RouteWatcher); ok {
		return rw.Changes()
	}
	return nil
}
