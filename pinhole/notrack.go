package pinhole

import (
	"fmt"
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
// datagrams to pcpd's port on a local address and hands them to a regular
// chain that meters them, then marks them untracked:
//
//	chain control_in {
//		type filter hook prerouting priority raw; policy accept;
//		udp dport 5351 fib daddr type local goto control_local
//	}
//	chain control_local {
//		udp dport 5351 update @meter6 { ip6 saddr & ffff:ffff:ffff:ffff:: ... } drop
//		udp dport 5351 update @meter4 { ip saddr ... } drop
//		notrack
//	}
//	chain notrack_out {
//		type filter hook output priority raw; policy accept;
//		udp sport 5351 notrack
//	}
//
// Every base chain a packet passes costs a hook call and a walk of its
// rules; before, the meter had an input chain of its own (and the fib
// match its own raw chain), which cost about 0.4 µs more per request and
// answer (BenchmarkControlDatagram, BENCHMARKS.md "What changed" 16).
// The meter now also drops a flood before conntrack and routing see it.
// Setup removes the former chains ("input", "notrack_in") of a table an
// older pcpd made.
//
// What must stay tracked, and why the rules are this narrow:
//
//   - Forwarded traffic. The guard accepts replies ("ct state
//     established") and DNAT-ed flows ("ct status dnat") by their
//     conntrack entry, NAT (pcpd's DNAT/SNAT maps, the host's masquerade)
//     only translates tracked flows, and the engine deletes a lapsed
//     mapping's flows by their entries. A PCP request a client behind this
//     host sends to an upstream PCP server (an ISP's CGN) has destination
//     port 5351 too, and must be masqueraded: "fib daddr type local"
//     limits the input rule to datagrams addressed to this host (raw
//     prerouting runs before any DNAT, so it sees the address the client
//     used). Multicast and broadcast are not "local" and stay tracked;
//     pcpd receives neither.
//   - pcpd's ports are never mapped (server/hostports.go reserves
//     5350-5351 and the listen ports), so an untracked request can never
//     be one a DNAT map of pcpd's should have translated; untracked
//     packets skip the nat chains.
//   - Locally generated traffic to port 5351 (a PCP client on this host)
//     has a source port of its own and stays tracked; only datagrams sent
//     from pcpd's port are untracked: its answers and unsolicited
//     ANNOUNCEs (RFC 6887 §14.1.3, RFC 6886 §3.2.1).
//
// Everything else on the host (the admin's own tables) sees pcpd's
// datagrams with "ct state untracked": a rule accepting only "ct state
// new" to port 5351, or an output chain accepting only "ct state
// established", would drop them, and a DNAT or redirect of the admin's to
// pcpd's port needs the answer un-NATed by conntrack. For those hosts
// Config.TrackControl (pcpd: --nft-notrack=false) installs no raw chains.
//
// It is not a speed-up: in the issue 8 benchmark (perf -a, malformed and
// unauthorised requests) conntrack cost about 1.1 µs of kernel CPU per
// request and answer, and the raw chains cost about 0.85 µs (half of it the
// fib route lookup, half two more base chains on the path). Its point is
// that the conntrack table, shared by every namespace of the host
// (nf_conntrack_max), stays out of reach of whoever can send to pcpd.
//
// Attached mode installs none of it (pcpd adds no base chain to the
// admin's table). The admin can add the same two chains, or just their
// rules, to a table of their own.

// controlRules are the rules of the control chains: control_in's, one per
// served port, and control_local's (the meter's, then notrack), and
// notrack_out's, one per served port. Any may be empty.
func (b *Backend) controlRules() (in, local, out [][]expr.Any) {
	udpPort := func(off uint32, port uint16) []expr.Any {
		return x(loadMeta(expr.MetaKeyL4PROTO, reg0), eq(reg0, unix.IPPROTO_UDP),
			loadTh(off, reg0), eq(reg0, byte(port>>8), byte(port)))
	}
	// fib daddr type local: the route type of the destination address
	// (RTN_LOCAL), host endian in the register.
	isLocal := x(&expr.Fib{Register: reg0, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: reg0, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)})
	for _, port := range b.cfg.Meter.Ports {
		in = append(in, rule(udpPort(thDstOff, port), isLocal, x(goTo(b.chainControlLocal))))
	}
	local = b.meterRules()
	if b.notracking() {
		local = append(local, x(&expr.Notrack{}))
		for _, port := range b.cfg.Meter.Ports {
			out = append(out, rule(udpPort(thSrcOff, port), x(&expr.Notrack{})))
		}
	}
	return in, local, out
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
	return out
}

// notracking: the notrack rules are part of what Setup installs.
func (b *Backend) notracking() bool { return !b.cfg.Attached && !b.cfg.TrackControl }

// controlling: Setup installs the control chains (there is something for
// them to do: notrack, or the meter).
func (b *Backend) controlling() bool {
	return !b.cfg.Attached && (b.notracking() || len(b.meterRules()) > 0)
}

// controlChainNames are the names of every chain pcpd has used for its
// control traffic in standalone mode, those of older versions included
// ("input" held the meter, "notrack_in" the input notrack rule), regular
// chains last so that deleting them in this order drops the jumps to them
// first. They are pcpd's whether or not this Backend installs them (a
// pcpd run before with other settings, or an older pcpd, may have), so
// ownership accepts them and Setup removes those it does not install.
func (b *Backend) controlChainNames() []string {
	if b.cfg.Attached {
		return nil
	}
	return []string{"input", "notrack_in", b.chainControlIn, b.chainNotrackOut, b.chainControlLocal}
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
	for _, name := range b.controlChainNames() {
		if present[name] && want[name] == nil {
			b.conn.DelChain(&nftables.Chain{Table: b.table, Name: name})
		}
	}
	return nil
}
