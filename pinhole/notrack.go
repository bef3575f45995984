package pinhole

import (
	"bytes"
	"fmt"
	"net/netip"
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// pcpd's own control traffic is kept out of conntrack (standalone mode).
//
// The guard's ct expressions (rules.go) make the kernel track every packet
// of the namespace, pcpd's requests and answers included: each datagram
// to pcpd's port from a new source address and port would create a
// conntrack entry (and every answer look one up). Nothing needs them:
// pcpd's requests are single datagrams answered by a single datagram, and
// no rule of pcpd's matches on them by state. They are also the one kind
// of traffic anyone who can reach pcpd's port controls in volume: spoofed
// requests from a million sources would each leave an entry for 30 s (the
// UDP unreplied timeout) and can fill nf_conntrack_max, after which the
// kernel drops new flows of every client, forwarded ones included.
//
// So raw-priority base chains, which run before conntrack (priority -200)
// looks at a packet, mark them untracked. The input side shares its chain
// with the request meter (meter.go): one base chain picks out the
// datagrams to pcpd's port on an address pcpd serves and hands them to a
// regular chain that meters them, then marks them untracked:
//
//	set served6 { type ipv6_addr; }   (the addresses pcpd listens on: SetServed)
//	set served4 { type ipv4_addr; }
//	set serving_ifs { type ifname; }  (their sockets' interfaces, and "lo": SetServed)
//	chain control_in {
//		type filter hook prerouting priority raw; policy accept;
//		udp dport 5351 ip6 daddr @served6 iifname @serving_ifs goto control_local
//		udp dport 5351 ip daddr @served4 iifname @serving_ifs goto control_local
//	}
//	chain control_local {
//		ip6 saddr @served6 ip6 saddr != fe80::/10 iif != "lo" counter drop	(servedSourceRules)
//		ip6 saddr @served6 iif != "lo" fib saddr . iif type local counter drop
//		ip saddr @served4 iif != "lo" counter drop
//		iif "lo" limit rate over 200/second burst 400 packets counter drop	(loopbackRules)
//		iif "lo" notrack accept
//		udp dport 5351 update @meter6 { ip6 saddr & ffff:ffff:ffff:ffff:: ... } drop
//		udp dport 5351 update @meter4 { ip saddr ... } drop
//		notrack
//	}
//	chain notrack_out {
//		type filter hook output priority raw; policy accept;
//		udp sport 5351 notrack
//	}
//
// (With the owner meter, pcpd's default, control_local ends with the owner
// maps and "goto unowned", and the per-source rules, without the port
// match, and notrack are in control_meter, where the owner chains and
// unowned go: ownerMeterRules.)
//
// Every base chain a packet passes costs a hook call and a walk of its
// rules; before, the meter had an input chain of its own (and the fib
// match its own raw chain), which cost about 0.4 µs more per request and
// answer (BenchmarkControlDatagram, BENCHMARKS.md "What changed" 16).
// The meter now also drops a flood before conntrack and routing see it.
// Setup removes the former chains ("input", "notrack_in") of a table an
// older pcpd made.
//
// Which datagrams: until 2026-12-03 the rule was "udp dport 5351 fib
// daddr type local", a route lookup per datagram to port 5351; during a
// flood it was 6.7 % of the server's CPU (nft_fib6_eval_type,
// RELIABILITY.md "The flood bound"). A lookup in a hash set of a few
// addresses costs a fraction of it (BENCHMARKS.md "What changed" 22). The
// sets hold what the server's listener serves (SetServed: every address
// it has a socket on), updated when that changes, which the listener
// follows through netlink (a deleted interface stops being served within
// a millisecond: reliability's TestWireGuardInterfaceGone), so, but for
// that lag (below), they are a subset of the host's local addresses: the
// rule matches a subset of what the fib match did, and every datagram it
// leaves out is one no socket of pcpd's would have received.
//
// What must stay tracked, and why the rules are this narrow:
//
//   - Forwarded traffic. The guard accepts replies ("ct state
//     established") and DNAT-ed flows ("ct status dnat") by their
//     conntrack entry, NAT (pcpd's DNAT/SNAT maps, the host's masquerade)
//     only translates tracked flows, and the engine deletes a lapsed
//     mapping's flows by their entries. A PCP request a client behind this
//     host sends to an upstream PCP server (an ISP's CGN) has destination
//     port 5351 too, and must be masqueraded: the upstream's address is
//     not one pcpd serves, so the rule leaves it alone (raw prerouting
//     runs before any DNAT, so it sees the address the client used).
//     Multicast and broadcast addresses are never in the sets (the
//     listener binds unicast addresses) and stay tracked; pcpd receives
//     neither.
//   - Datagrams to port 5351 on a local address pcpd does not serve (the
//     WAN address, loopback, an interface not given to --interface) are
//     tracked and not metered (under the fib rule they were both). They
//     reach no socket of pcpd's (its sockets are bound to the serving
//     addresses and interfaces, SEC-01): the host answers them as any
//     closed port, port unreachable, or the admin's input rules drop them.
//     Their conntrack entries are what a datagram to any other closed
//     port of the host costs, which pcpd's notrack never covered; the
//     meter is there to keep a flood out of pcpd's socket queue, which
//     they never enter.
//   - A datagram to a served address that arrives on another interface
//     than the serving ones and loopback (the WAN) skips control_local:
//     tracked and unmetered, like one to an address pcpd does not serve,
//     and it reaches no socket either (SO_BINDTODEVICE). Until review7 L1
//     it was metered and untracked: about 400 datagrams/s from one WAN
//     address kept the shared unowned bucket empty (an owned client whose
//     prefix lagged in the owner maps lost out) and WAN sources filled the
//     per-source meter sets (TestServingInterfacesOnlyL1). Loopback stays
//     in the set: the host's own requests reach pcpd through it. The
//     interface lookup comes after the address one, so only datagrams to
//     pcpd's port on a served address pay it.
//   - The sets lag the addresses by the listener's reaction (a netlink
//     notification, ≈ 1 ms; at worst its 2-s poll), and keep the last
//     addresses while pcpd is not running (a restart's Setup keeps them
//     until the listener gives its own). A new address's requests are
//     tracked and unmetered for that moment, as with TrackControl. An
//     address the host has just lost stays in the set as long: were the
//     host to forward datagrams to it on port 5351 (the address moved to
//     a machine behind or beyond this host) in that moment, they would go
//     untracked, unmasqueraded. The fib rule had no such window; it needs
//     an address to move between hosts within it, which is taken as not
//     worth a route lookup on every request.
//   - pcpd's ports are never mapped (server/hostports.go reserves
//     5350-5351 and the listen ports), so an untracked request can never
//     be one a DNAT map of pcpd's should have translated; untracked
//     packets skip the nat chains.
//   - Locally generated traffic to port 5351 (a PCP client on this host)
//     has a source port of its own and stays tracked; only datagrams sent
//     from pcpd's port are untracked: its answers and unsolicited
//     ANNOUNCEs (RFC 6887 §14.1.3, RFC 6886 §3.2.1).
//
// The sets are matched by address only, each served port against both:
// with explicit listen addresses on different ports (--listen), a
// datagram to a served address on another of pcpd's ports is metered and
// untracked too. It is addressed to this host, so nothing forwarded is
// concerned; a set of address . port pairs would need no "udp dport"
// first, but then every UDP packet the host forwards would pay its
// lookup, where now it stops at the port comparison.
//
// Everything else on the host (the admin's own tables) sees pcpd's
// datagrams with "ct state untracked": a rule accepting only "ct state
// new" to port 5351, or an output chain accepting only "ct state
// established", would drop them, and a DNAT or redirect of the admin's to
// pcpd's port needs the answer un-NATed by conntrack. For those hosts
// Config.TrackControl (pcpd: --nft-notrack=false) installs no notrack
// rules; the meter, when on, keeps control_in and its sets.
//
// It is not a speed-up: in the issue 8 benchmark (perf -a, malformed and
// unauthorised requests) conntrack cost about 1.1 µs of kernel CPU per
// request and answer, and the raw chains cost about 0.85 µs (half of it
// the fib route lookup since replaced by the set, half two more base
// chains on the path). Its point is that the conntrack table, shared by
// every namespace of the host (nf_conntrack_max), stays out of reach of
// whoever can send to pcpd.
//
// Attached mode installs none of it (pcpd adds no base chain or served
// address set to the admin's table; only <chain>_serving_ifs, for the guards:
// layout). The admin can add the same chains, or just
// their rules, to a table of their own ("fib daddr type local" in place of
// the sets there: nothing would keep such sets up to date).
//
// The sets (serving_ifs too) are pcpd's objects like the others: Setup
// creates them (an older pcpd's table is upgraded in the same transaction
// that rewrites control_in) and fills them with the last SetServed,
// Healthy compares
// their contents with it (they are as large as the served addresses, so
// the dump is cheap), and a flushed set is restored by the repair. An
// older pcpd refuses a table holding them (ErrNotOurs, as for the owner
// meter): a downgrade needs "nft delete table inet pcpd" first.

// controlRules are the rules of the control chains: control_in's, one per
// served port and family, control_local's (the served-source drops, the
// host's loopback bucket, then the meter's and notrack, or with the owner
// meter its map lookups, and
// control_meter's the per-source rules and notrack: ownerMeterRules), and
// notrack_out's, one per served port. Any may be empty.
func (b *Backend) controlRules() (in, local, meter, out [][]expr.Any) {
	udpPort := func(off uint32, port uint16) []expr.Any {
		return x(loadMeta(expr.MetaKeyL4PROTO, reg0), eq(reg0, unix.IPPROTO_UDP),
			loadTh(off, reg0), eq(reg0, byte(port>>8), byte(port)))
	}
	// ip6 daddr @served6, ip daddr @served4: the address is one pcpd
	// serves (SetServed). The port comparison comes first: every packet
	// the host forwards passes this chain, and most stop there.
	served := func(fam byte, off, n uint32, s *nftables.Set) []expr.Any {
		return rule(nfproto(fam), x(loadNet(off, n, reg0), lookup(s, reg0)))
	}
	// iifname @serving_ifs: it came in on an interface pcpd serves, or
	// loopback (the host's own requests); from anywhere else it reaches
	// no socket of pcpd's (SO_BINDTODEVICE) and is not metered.
	serving := func() []expr.Any {
		return x(loadMeta(expr.MetaKeyIIFNAME, reg0), lookup(b.servingIfs, reg0))
	}
	for _, port := range b.cfg.Meter.Ports {
		in = append(in,
			rule(udpPort(thDstOff, port), served(unix.NFPROTO_IPV6, ip6DstOff, 16, b.served6), serving(), x(goTo(b.chainControlLocal))),
			rule(udpPort(thDstOff, port), served(unix.NFPROTO_IPV4, ip4DstOff, 4, b.served4), serving(), x(goTo(b.chainControlLocal))))
	}
	local = append(b.servedSourceRules(), b.loopbackRules()...)
	last := &local // where notrack goes: after the per-source rules
	if b.ownerLayout() {
		local = append(local, b.ownerMeterRules()...)
		meter = b.perSourceRules(nil) // control_in matched the port
		last = &meter
	} else {
		local = append(local, b.meterRules()...)
	}
	if b.notracking() {
		*last = append(*last, x(&expr.Notrack{}))
		for _, port := range b.cfg.Meter.Ports {
			out = append(out, rule(udpPort(thSrcOff, port), x(&expr.Notrack{})))
		}
	}
	if b.ownerLayout() {
		// The owner map's verdict is a jump: at the end of control_meter
		// the kernel would return to control_local's next rule, goto
		// unowned, and charge an owner's datagram to the unowned bucket
		// too. Accepting here ends control_in, as falling off its end
		// does (policy accept).
		meter = append(meter, x(accept))
	}
	return in, local, meter, out
}

// servedSourceRules drop, first in control_local, a request whose source is
// an address pcpd serves unless it came over loopback (the host's own):
//
//	ip6 saddr @served6 ip6 saddr != fe80::/10 iif != "lo" counter drop
//	ip6 saddr @served6 iif != "lo" fib saddr . iif type local counter drop
//	ip saddr @served4 iif != "lo" counter drop
//
// Such a request cannot be real: pcpd's answer goes to the host itself,
// never to whoever sent it. The host's own address inside an owner's
// prefix (a static client's LAN /64 holds the host's LAN address) passed
// the owner chain from the owner's interface without the route lookup
// that drops a local source (ownerRules: NetlinkRoutes does not see the
// host's own addresses), was charged to the owner, and pcpd answered it to
// the host, at the port the sender chose: a datagram from the host's own
// address and port 5351 to the host's own services, with the request's
// bytes echoed in it (the leftover of the review of the interface
// comparisons, RELIABILITY.md; TestServedSourceDropped: 20 of 20 spoofed
// from the client's LAN reached pcpd's socket before). IPv4 routing would
// drop such a source as martian later (unless accept_local is set); the
// rule drops both families here, before the owner and per-source meters
// count them. It covers the addresses pcpd serves (every address of a
// serving interface, or the --listen ones), not the host's other
// addresses; one lookup in a set of a few addresses per request.
//
// A link-local source is left to the second rule: another link's host may
// hold a link-local address the host serves on a different interface
// (TestServedSourceDropped), but none may hold the host's own on the link
// it arrived from (duplicate address detection), and there the exception
// passed it: a client on the serving LAN spoofing the host's fe80::
// address of that interface reached pcpd, whose answer went to the host
// itself (review8 A2, TestServedLinkLocalSourceOwnLink). "fib saddr . iif
// type local" is local exactly when the source is an address of the
// arrival interface (nft_fib6: ipv6_chk_addr strict on it); its route
// lookup is paid only by a served link-local source, which is rare.
func (b *Backend) servedSourceRules() [][]expr.Any {
	if b.cfg.Attached {
		return nil
	}
	// Loopback is interface 1 in every namespace (LOOPBACK_IFINDEX).
	notLoopback := func() []expr.Any {
		return x(loadMeta(expr.MetaKeyIIF, reg0), &expr.Cmp{Op: expr.CmpOpNeq, Register: reg0, Data: binaryutil.NativeEndian.PutUint32(1)})
	}
	// Not a link-local one: another link's host may hold the same
	// link-local address as one of ours, and pcpd's answer (through the
	// socket of the interface it came in on) reaches it. Checked after the
	// lookup, so only for the rare datagram the lookup matched.
	// (Whole addresses, as nft writes "ip6 saddr != fe80::/10", which is
	// how it lists them.)
	llMask, ll := make([]byte, 16), make([]byte, 16)
	llMask[0], llMask[1], ll[0], ll[1] = 0xff, 0xc0, 0xfe, 0x80
	notLinkLocal := x(loadNet(ip6SrcOff, 16, reg0),
		&expr.Bitwise{SourceRegister: reg0, DestRegister: reg0, Len: 16, Mask: llMask, Xor: make([]byte, 16)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: reg0, Data: ll})
	ownOfArrival := x(&expr.Fib{Register: reg0, FlagSADDR: true, FlagIIF: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: reg0, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)})
	return [][]expr.Any{
		rule(nfproto(unix.NFPROTO_IPV6), x(loadNet(ip6SrcOff, 16, reg0), lookup(b.served6, reg0)), notLinkLocal, notLoopback(), x(&expr.Counter{}, drop)),
		rule(nfproto(unix.NFPROTO_IPV6), x(loadNet(ip6SrcOff, 16, reg0), lookup(b.served6, reg0)), notLoopback(), ownOfArrival, x(&expr.Counter{}, drop)),
		rule(nfproto(unix.NFPROTO_IPV4), x(loadNet(ip4SrcOff, 4, reg0), lookup(b.served4, reg0)), notLoopback(), x(&expr.Counter{}, drop)),
	}
}

// loopbackRules give the datagrams that came in over loopback (a process
// of this host's, any local user's, sending to a served address) a bucket
// of their own, the host's, in control_local right after the served-source
// drops, when the layout has the meter:
//
//	iif "lo" limit rate over 200/second burst 400 packets counter drop
//	iif "lo" notrack accept		("iif "lo" accept" with TrackControl)
//
// Before (h/local9's finding, RELIABILITY.md), they went on to the owner
// maps like any other: a served address inside an owner's prefix (a
// static client's LAN /64 holds the host's LAN address; the host's
// 10.0.0.1 in a client's 10.0.0.0/28) sent them to that owner's chain,
// whose reverse-path rule passes them (nft_fib answers loopback itself for
// a packet that arrived on it: oif is never 0), so the owner's limit and
// then its per-source /64 in meter6 counted them: a local user's flood of
// ANNOUNCEs above the owner's rate left the owner's own requests to
// nothing in the kernel, before pcpd's buckets (which give the host its
// own: sourceKey and bucketOwner in server) ever saw them. A local user binding any address
// (IPV6_FREEBIND needs no privilege) could pick the owner outright.
// Sources outside every prefix went to the unowned bucket, shared with
// the translated IPv4 hosts and every stranger.
//
// Nothing from elsewhere arrives on loopback (the kernel gives iif lo
// only to packets this host sent itself), so the bucket is the host's
// alone, both families and every served port together. Its rate is the
// per-source meter's (Meter.Rate, Burst): pcpd takes a loopback request
// only from the served address it was sent to, and counts it in that
// address's per-source bucket under the loopback interface's key, so
// the host's requests from one served address get what a client's source
// gets, with the same margin over pcpd's own limit, and the rest of a
// local flood is shed before the socket. (Several served addresses
// share it: a host sending from more of them at once, each at pcpd's
// full per-source rate, than the meter's margin over that rate (4 × by
// default) would lose some here that pcpd would take; the host's own
// requests are ANNOUNCEs and the odd refused MAP, far below.) The accept keeps them out
// of the owner maps, the unowned bucket and the per-source sets (whose
// /64 the host's address may share with a client). Every other datagram
// pays two comparisons of its arrival interface (BENCHMARKS.md item 89).
// The served-source drops come first, but pass loopback anyway (their
// "iif != lo"). Without the meter there is nothing to keep loopback from
// and no rule: notrack treats it as any other request.
func (b *Backend) loopbackRules() [][]expr.Any {
	if !b.metering() {
		return nil
	}
	m := b.cfg.Meter
	// Loopback is interface 1 in every namespace (LOOPBACK_IFINDEX).
	isLoopback := func() []expr.Any {
		return x(loadMeta(expr.MetaKeyIIF, reg0), eq(reg0, binaryutil.NativeEndian.PutUint32(1)...))
	}
	pass := x(accept)
	if b.notracking() {
		pass = x(&expr.Notrack{}, accept)
	}
	return [][]expr.Any{
		rule(isLoopback(), x(&expr.Limit{Type: expr.LimitTypePkts, Rate: uint64(m.Rate), Over: true,
			Unit: expr.LimitTimeSecond, Burst: m.Burst}, &expr.Counter{}, drop)),
		rule(isLoopback(), pass),
	}
}

// foldLoopbackCounter adds what control_local's loopback bucket (its
// listed rules: the one with a limit, loopbackRules; the per-source
// meter's limits are inside its set updates, not rules' own) counted
// since its last read to MeterDrops.Loopback. Without a read or write
// before (loopSeen), it sets the base; a counter below the last read was
// zeroed by a rewrite nobody reported, and counts from 0. Caller holds
// b.mu.
func (b *Backend) foldLoopbackCounter(rules []*nftables.Rule) {
	var now uint64
	for _, r := range rules {
		limited, n := false, uint64(0)
		for _, e := range r.Exprs {
			switch e := e.(type) {
			case *expr.Limit:
				limited = true
			case *expr.Counter:
				n += e.Packets
			}
		}
		if limited {
			now += n
		}
	}
	last, seen := b.loopCount, b.loopSeen
	b.loopCount, b.loopSeen = now, true
	if !seen {
		return
	}
	if now >= last {
		now -= last
	}
	b.loopDrops.Add(now)
}

// readLoopbackCounter folds control_local's loopback drops in before
// Setup rewrites the chain. Best effort, as readOwnerCounters: a failed
// read loses at most what it dropped since its last read. Caller holds
// b.mu.
func (b *Backend) readLoopbackCounter() {
	if !b.loopSeen {
		return
	}
	if rules, err := b.readConn().GetRules(b.table, &nftables.Chain{Table: b.table, Name: b.chainControlLocal}); err == nil {
		b.foldLoopbackCounter(rules)
	}
}

// controlChains are the control chains' objects (none when controlling is
// false). Priority raw (-300) runs before conntrack's own hook (-200),
// which is what lets notrack work.
func (b *Backend) controlChains() []*nftables.Chain {
	if !b.controlling() {
		return nil
	}
	accept := nftables.ChainPolicyAccept
	out := []*nftables.Chain{
		{Table: b.table, Name: b.chainControlIn, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRaw, Policy: &accept},
		{Table: b.table, Name: b.chainControlLocal},
	}
	if b.notracking() {
		out = append(out, &nftables.Chain{Table: b.table, Name: b.chainNotrackOut, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityRaw, Policy: &accept})
	}
	if b.ownerLayout() {
		out = append(out, &nftables.Chain{Table: b.table, Name: unownedChain},
			&nftables.Chain{Table: b.table, Name: controlMeterChain})
	}
	return out
}

// notracking: the notrack rules are part of what Setup installs.
func (b *Backend) notracking() bool { return !b.cfg.Attached && !b.cfg.TrackControl }

// controlling: Setup installs the control chains (there is something for
// them to do: notrack, or the meter).
func (b *Backend) controlling() bool {
	return !b.cfg.Attached && (b.notracking() || b.metering())
}

// controlChainNames are the names of every chain pcpd has used for its
// control traffic in standalone mode, those of older versions included
// ("input" held the meter, "notrack_in" the input notrack rule), regular
// chains last (unownedChain, which control_local goes to, after it, and
// controlMeterChain, which unownedChain and the owner chains go to, last)
// so that deleting them in this order drops the jumps to them first (the
// owner chains': queueStaleControlRemoval). They are pcpd's whether or not this Backend installs them (a
// pcpd run before with other settings, or an older pcpd, may have), so
// ownership accepts them and Setup removes those it does not install.
func (b *Backend) controlChainNames() []string {
	if b.cfg.Attached {
		return nil
	}
	return []string{"input", "notrack_in", b.chainControlIn, b.chainNotrackOut, b.chainControlLocal, unownedChain, controlMeterChain}
}

// isControlChain: name is one of controlChainNames.
func (b *Backend) isControlChain(name string) bool {
	return slices.Contains(b.controlChainNames(), name)
}

// queueStaleControlRemoval queues deleting the control chains that are
// present but not part of this Backend's layout: turning notrack off must
// not leave pcpd's control traffic untracked, and an older pcpd's chains
// must not meter or untrack a second time.
func (b *Backend) queueStaleControlRemoval() error {
	if b.cfg.Attached {
		return nil
	}
	ok, err := b.tableExists()
	if err != nil || !ok {
		return err
	}
	present, err := b.presentChains()
	if err != nil {
		return fmt.Errorf("pinhole: control chains: %w", err)
	}
	want := b.chains()
	var stale []string
	for _, name := range b.controlChainNames() {
		if present[name] && want[name] == nil {
			stale = append(stale, name)
		}
	}
	if len(stale) == 0 {
		return nil
	}
	// The kept control chains are flushed first: control_local, which
	// stays for notrack, may still jump to unownedChain (a run with the
	// meter on), and a chain something jumps to cannot be deleted (EBUSY).
	// Setup writes their rules again later in the same transaction.
	for _, name := range b.controlChainNames() {
		if present[name] && want[name] != nil {
			b.conn.FlushChain(&nftables.Chain{Table: b.table, Name: name})
		}
	}
	if slices.Contains(stale, controlMeterChain) {
		// The owner chains of a run with the owner meter go to it; their
		// rules are written again (or the chains deleted) by the owner
		// meter's write after Setup's transaction.
		for name := range present {
			if b.isOwnerChain(name) {
				b.conn.FlushChain(&nftables.Chain{Table: b.table, Name: name})
			}
		}
	}
	for _, name := range stale {
		b.conn.DelChain(&nftables.Chain{Table: b.table, Name: name})
	}
	return nil
}

// servedSets builds the sets of the addresses pcpd serves (standalone
// only): plain hash sets, one lookup per datagram to pcpd's port.
func servedSets(table *nftables.Table) (six, four *nftables.Set) {
	return &nftables.Set{Table: table, Name: "served6", KeyType: nftables.TypeIP6Addr, KeyByteOrder: binaryutil.BigEndian,
			Comment: "pcpd: IPv6 addresses pcpd serves on"},
		&nftables.Set{Table: table, Name: "served4", KeyType: nftables.TypeIPAddr, KeyByteOrder: binaryutil.BigEndian,
			Comment: "pcpd: IPv4 addresses pcpd serves on"}
}

// servingIfsSet builds the set of the interfaces pcpd serves on,
// loopback always among them: standalone, the control chains match it
// (above), and in every mode the guards (layout: a new flow from a
// protected source must come in on one) and postrouting (a flow leaving
// through one is not SNAT-ed); attached named prefix+"serving_ifs", as
// the attached mode's other sets.
func servingIfsSet(table *nftables.Table, prefix string) *nftables.Set {
	return &nftables.Set{Table: table, Name: prefix + "serving_ifs", KeyType: nftables.TypeIFName, KeyByteOrder: binaryutil.NativeEndian,
		Comment: "pcpd: interfaces pcpd serves on, and lo"}
}

// SetServed replaces the addresses pcpd serves on (its listening
// sockets' addresses; zones and duplicates do not matter) and the
// interfaces those sockets are bound to: the datagrams to pcpd's ports on
// those addresses that arrive on those interfaces or loopback, and only
// those, are metered and kept out of conntrack (see the top of this
// file). The interfaces are also the only ones a new flow from a
// protected source may come in on (the guards, layout), and the ones a
// flow from a mapped IPv4 port leaves through untranslated (postrouting:
// the SNAT companions apply towards the WAN only). The server calls
// it whenever the serving addresses change; Setup re-applies the last
// given. Attached, there are no served address sets (it records the
// addresses) but serving_ifs is written all the same, for the guards.
func (b *Backend) SetServed(addrs []netip.Addr, ifaces []string) (err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	defer b.dropUnsent(&err)
	b.gen++ // Healthy compares the served sets: a read it overlaps is done again
	served, err := servedAddrs(addrs)
	if err != nil {
		return err
	}
	ifs, err := servedIfNames(ifaces)
	if err != nil {
		return err
	}
	if err := b.queueServed(served, ifs); err != nil {
		return err
	}
	if err := b.flush(); err != nil {
		return fmt.Errorf("pinhole: set served addresses: %w", classify(err))
	}
	b.served, b.servedIfs, b.hasServed = served, ifs, true
	return nil
}

// servedIfNames checks ifaces and returns them as serving_ifs holds them:
// with "lo", sorted, each once.
func servedIfNames(ifaces []string) ([]string, error) {
	out := append([]string{"lo"}, ifaces...)
	for _, n := range out {
		if n == "" || len(n) >= unix.IFNAMSIZ {
			return nil, fmt.Errorf("pinhole: served interface %q: %w", n, ErrInvalid)
		}
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// ifNameKey is name as an ifname set key: NUL-padded to IFNAMSIZ.
func ifNameKey(name string) []byte {
	k := make([]byte, unix.IFNAMSIZ)
	copy(k, name)
	return k
}

// Served returns the addresses the served sets hold, sorted (none
// attached).
func (b *Backend) Served() ([]netip.Addr, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.readServed()
}

// servedAddrs checks addrs and returns them as the sets hold them:
// unzoned, IPv4-mapped ones as IPv4, sorted, each once.
func servedAddrs(addrs []netip.Addr) ([]netip.Addr, error) {
	out := make([]netip.Addr, 0, len(addrs))
	for _, a := range addrs {
		if !a.IsValid() {
			return nil, fmt.Errorf("pinhole: served address %v: %w", a, ErrInvalid)
		}
		out = append(out, a.WithZone("").Unmap())
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return slices.Compact(out), nil
}

// queueServed queues replacing the served sets' contents with served
// (servedAddrs' form; standalone only) and serving_ifs' with ifs (every
// mode), in the caller's transaction.
func (b *Backend) queueServed(served []netip.Addr, ifs []string) error {
	if b.served6 != nil {
		var v6, v4 []nftables.SetElement
		for _, a := range served {
			if a.Is4() {
				v4 = append(v4, nftables.SetElement{Key: a.AsSlice()})
			} else {
				v6 = append(v6, nftables.SetElement{Key: a.AsSlice()})
			}
		}
		for _, x := range []struct {
			s     *nftables.Set
			elems []nftables.SetElement
		}{{b.served6, v6}, {b.served4, v4}} {
			b.conn.FlushSet(x.s)
			if err := b.queueAddElements(x.s, x.elems); err != nil {
				return fmt.Errorf("pinhole: set %s: %w", x.s.Name, err)
			}
		}
	}
	var elems []nftables.SetElement
	for _, n := range ifs {
		elems = append(elems, nftables.SetElement{Key: ifNameKey(n)})
	}
	b.conn.FlushSet(b.servingIfs)
	if err := b.queueAddElements(b.servingIfs, elems); err != nil {
		return fmt.Errorf("pinhole: set %s: %w", b.servingIfs.Name, err)
	}
	return nil
}

// readServingIfs reads serving_ifs through v, sorted.
func (v kview) readServingIfs(s *nftables.Set) ([]string, error) {
	elems, err := v.conn.GetSetElements(s)
	if err != nil {
		return nil, fmt.Errorf("pinhole: read set %s: %w", s.Name, classify(err))
	}
	out := make([]string, 0, len(elems))
	for _, e := range elems {
		out = append(out, string(bytes.TrimRight(e.Key, "\x00")))
	}
	slices.Sort(out)
	return out, nil
}

// readServed dumps the served sets. Caller holds b.mu.
func (b *Backend) readServed() ([]netip.Addr, error) {
	if b.served6 == nil {
		return nil, nil
	}
	return b.view().readServed(b.served6, b.served4)
}

// readServed reads the served sets through v, sorted.
func (v kview) readServed(sets ...*nftables.Set) ([]netip.Addr, error) {
	var out []netip.Addr
	for _, s := range sets {
		elems, err := v.conn.GetSetElements(s)
		if err != nil {
			return nil, fmt.Errorf("pinhole: read set %s: %w", s.Name, classify(err))
		}
		for _, e := range elems {
			a, ok := netip.AddrFromSlice(e.Key)
			if !ok {
				return nil, fmt.Errorf("pinhole: set %s: element of %d bytes: %w", s.Name, len(e.Key), ErrInvalid)
			}
			out = append(out, a)
		}
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out, nil
}

// checkServed is Healthy's part for the served sets: they hold exactly
// the last SetServed. A flushed set leaves pcpd's requests tracked and
// unmetered (a conntrack flood is back within reach); an address added by
// hand would untrack datagrams the host may forward. Before any SetServed
// there is nothing to compare with (a restart keeps what the sets held).
// serving_ifs is compared in every mode (attached too: the guards match
// it); an interface added by hand would let a protected source in from it.
func (w *healthWant) checkServed(v kview) error {
	if !w.hasServed {
		return nil
	}
	if w.servedSets {
		got, err := v.readServed(&w.served6, &w.served4)
		if err != nil {
			return fmt.Errorf("pinhole: served sets: %w: %w", ErrUnhealthy, err)
		}
		if !slices.Equal(got, w.served) {
			return fmt.Errorf("pinhole: served sets hold %v, want %v: %w", got, w.served, ErrUnhealthy)
		}
	}
	ifs, err := v.readServingIfs(&w.servingIfs)
	if err != nil {
		return fmt.Errorf("pinhole: served sets: %w: %w", ErrUnhealthy, err)
	}
	if !slices.Equal(ifs, w.servedIfs) {
		return fmt.Errorf("pinhole: set %s holds %q, want %q: %w", w.servingIfs.Name, ifs, w.servedIfs, ErrUnhealthy)
	}
	return nil
}
