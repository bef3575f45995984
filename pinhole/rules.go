package pinhole

import (
	"reflect"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/ctnl"
)

// Registers are addressed in 32-bit units; a concatenated lookup key starts
// at reg0 and each field takes ceil(len/4) registers, which is exactly the
// element layout of layout.go.
const reg0 = unix.NFT_REG32_00

// Header offsets (RFC 8200, RFC 791, and the first four bytes every
// port-carrying transport header shares).
const (
	ip6SrcOff = 8
	ip6DstOff = 24
	ip4SrcOff = 12
	ip4DstOff = 16
	thSrcOff  = 0
	thDstOff  = 2
	// RFC 9293 §3.1: the flags octet and its bits.
	tcpFlagsOff = 13
	tcpFIN      = 0x01
	tcpSYN      = 0x02
	tcpRST      = 0x04
	tcpACK      = 0x10
)

// ipsDstNAT is IPS_DST_NAT from linux/netfilter/nf_conntrack_common.h.
const ipsDstNAT = ctnl.IPSDstNAT

func loadNet(off, n, reg uint32) expr.Any {
	return &expr.Payload{Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n, DestRegister: reg}
}

func loadTh(off, reg uint32) expr.Any {
	return &expr.Payload{Base: expr.PayloadBaseTransportHeader, Offset: off, Len: 2, DestRegister: reg}
}

func loadMeta(k expr.MetaKey, reg uint32) expr.Any { return &expr.Meta{Key: k, Register: reg} }

func loadCt(k expr.CtKey, reg uint32) expr.Any { return &expr.Ct{Key: k, Register: reg} }

func eq(reg uint32, data ...byte) expr.Any {
	return &expr.Cmp{Op: expr.CmpOpEq, Register: reg, Data: data}
}

func lookup(s *nftables.Set, reg uint32) expr.Any {
	return &expr.Lookup{SourceRegister: reg, SetName: s.Name, SetID: s.ID}
}

// bitsSet matches when (reg & mask) != 0; ct state and status are host
// endian in the register.
func bitsSet(reg, mask uint32) []expr.Any {
	return []expr.Any{
		&expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(mask), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: reg, Data: make([]byte, 4)},
	}
}

func nfproto(fam byte) []expr.Any {
	return []expr.Any{loadMeta(expr.MetaKeyNFPROTO, reg0), eq(reg0, fam)}
}

var (
	accept = &expr.Verdict{Kind: expr.VerdictAccept}
	drop   = &expr.Verdict{Kind: expr.VerdictDrop}
)

func goTo(chain string) expr.Any { return &expr.Verdict{Kind: expr.VerdictGoto, Chain: chain} }

func rule(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func x(e ...expr.Any) []expr.Any { return e }

// Lookup keys built from the packet, as the guard (forward) sees it.
func keyPacket6(k kind) []expr.Any {
	switch k {
	case kindPort:
		return x(loadNet(ip6DstOff, 16, reg0), loadMeta(expr.MetaKeyL4PROTO, reg0+4), loadTh(thDstOff, reg0+5))
	case kindProto:
		return x(loadNet(ip6DstOff, 16, reg0), loadMeta(expr.MetaKeyL4PROTO, reg0+4))
	case kindAddr:
		return x(loadNet(ip6DstOff, 16, reg0))
	case kindFilter, kindRedirect6Filter:
		return x(loadNet(ip6DstOff, 16, reg0), loadMeta(expr.MetaKeyL4PROTO, reg0+4), loadTh(thDstOff, reg0+5),
			loadNet(ip6SrcOff, 16, reg0+6), loadTh(thSrcOff, reg0+10))
	case kindAddrFilter:
		return x(loadNet(ip6DstOff, 16, reg0), loadNet(ip6SrcOff, 16, reg0+4))
	case kindRedirect6:
		return x(loadNet(ip6DstOff, 16, reg0), loadMeta(expr.MetaKeyL4PROTO, reg0+4), loadTh(thDstOff, reg0+5))
	}
	panic("pinhole: no IPv6 packet key for kind")
}

func keyPacket4(k kind) []expr.Any {
	switch k {
	case kindNAPT4:
		return x(loadNet(ip4DstOff, 4, reg0), loadMeta(expr.MetaKeyL4PROTO, reg0+1), loadTh(thDstOff, reg0+2))
	case kindNAPT4Filter:
		return x(loadNet(ip4DstOff, 4, reg0), loadMeta(expr.MetaKeyL4PROTO, reg0+1), loadTh(thDstOff, reg0+2),
			loadNet(ip4SrcOff, 4, reg0+3), loadTh(thSrcOff, reg0+4))
	}
	panic("pinhole: no IPv4 packet key for kind")
}

// chainRules holds every rule of every chain pcpd owns, by chain name.
type chainRules struct {
	name  string
	rules [][]expr.Any
}

// queueRewrite queues c's flush and cr's rules into c, the last one with
// cr's checked mark (checkedMark) when marked: Setup's layout, Arm and
// markVerified write a chain the same way, so a later start reads the
// same marks whichever of them wrote it. Caller holds b.mu and flushes.
func (b *Backend) queueRewrite(c *nftables.Chain, cr chainRules, marked bool) {
	b.conn.FlushChain(c)
	for i, exprs := range cr.rules {
		r := &nftables.Rule{Table: b.table, Chain: c, Exprs: exprs}
		if marked && i == len(cr.rules)-1 {
			r.UserData = b.checkedMark(cr.name)
		}
		b.conn.AddRule(r)
	}
}

// layout returns the rules of pcpd's chains: the entry chain (standalone:
// the forward base chain; attached: the chain the admin jumps to), the two
// guards, the DNAT prerouting and SNAT postrouting chains and, standalone,
// the control chains: the request meter and notrack (notrack.go).
func (b *Backend) layout() []chainRules {
	ctEstablished := rule(x(loadCt(expr.CtKeySTATE, reg0)), bitsSet(reg0, expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED))
	ctDNAT := rule(x(loadCt(expr.CtKeySTATUS, reg0)), bitsSet(reg0, ipsDstNAT))

	// No mid-stream pickup from the protected side: with the kernel's
	// default nf_conntrack_tcp_loose=1, a non-SYN segment without a
	// conntrack entry creates one in the ESTABLISHED state. When the
	// engine ends the connections of a deleted mapping (PMP-12) by
	// deleting their entries, one segment from the client would revive
	// the flow with the client as its originator, and the remote's data
	// would pass the guard as "established". So a new TCP flow from a
	// protected address must start with a bare SYN. (It also ends a
	// client's connections whose entries the kernel lost, e.g. after a
	// conntrack flush; they could not be told from revived ones.)
	ctNew := rule(x(loadCt(expr.CtKeySTATE, reg0)), bitsSet(reg0, expr.CtStateBitNEW))
	notBareSYN := x(loadMeta(expr.MetaKeyL4PROTO, reg0), eq(reg0, unix.IPPROTO_TCP),
		&expr.Payload{Base: expr.PayloadBaseTransportHeader, Offset: tcpFlagsOff, Len: 1, DestRegister: reg0},
		&expr.Bitwise{SourceRegister: reg0, DestRegister: reg0, Len: 1, Mask: []byte{tcpFIN | tcpSYN | tcpRST | tcpACK}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: reg0, Data: []byte{tcpSYN}})
	entry := [][]expr.Any{
		rule(nfproto(unix.NFPROTO_IPV6), x(loadNet(ip6SrcOff, 16, reg0), lookup(b.protected6, reg0)), notBareSYN, ctNew, x(drop)),
		rule(nfproto(unix.NFPROTO_IPV4), x(loadNet(ip4SrcOff, 4, reg0), lookup(b.protected4, reg0)), notBareSYN, ctNew, x(drop)),
		rule(nfproto(unix.NFPROTO_IPV6), x(loadNet(ip6DstOff, 16, reg0), lookup(b.protected6, reg0), goTo(b.chainGuard6))),
		rule(nfproto(unix.NFPROTO_IPV4), x(loadNet(ip4DstOff, 4, reg0), lookup(b.protected4, reg0), goTo(b.chainGuard4))),
	}

	// RFC 4890 section 4.3.1 (must not drop in transit) and 4.3.2 (should not):
	// destination unreachable, packet too big, time exceeded, parameter
	// problem. Errors that belong to a tracked flow are "related" anyway;
	// these rules also pass the ones conntrack cannot match.
	icmp := rule(x(loadMeta(expr.MetaKeyL4PROTO, reg0), eq(reg0, unix.IPPROTO_ICMPV6),
		&expr.Payload{Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1, DestRegister: reg0},
		&expr.Range{Op: expr.CmpOpEq, Register: reg0, FromData: []byte{1}, ToData: []byte{4}}, accept))
	// A flow that was DNAT-ed came in through a live mapping: the maps'
	// elements carry the lease's timeout, so once a mapping lapses no new
	// flow is translated, and an untranslated packet to the internal port
	// meets the drop below. (Matching the conntrack original tuple against
	// the map would be tighter, but nft cannot list such rules.)
	// A new flow from inside the protected prefixes must come in where
	// the host routes its source: strict reverse path (RFC 3704 §2.2),
	// as the owner chains check requests (ownerRules), but here for the
	// forwarded traffic to clients, IPv6 and IPv4 alike:
	//
	//	ip6 saddr @protected6 fib saddr . iif oif 0 counter drop
	//
	// A client's address is authenticated over its tunnel (WireGuard's
	// cryptokey routing) and clients may trust it; a datagram from the
	// WAN carrying it is spoofed, and without this rule it passed a
	// pinhole (IPv6, which has no rp_filter) or a NAPT mapping (IPv4:
	// the kernel's rp_filter=2, systemd's default, passes a source with
	// any route back, and the host routes every client prefix) to the
	// client, as if from the other peer (review of the IPv4 data plane,
	// 2026-12-04; TestMappingDropsSpoofedOwnedSource). After the
	// established accept, so that only a flow's first packets pay the
	// route lookup, and those only when the source is protected (client
	// to client); before the DNAT accept, since the IPv4 case arrives
	// DNAT-ed. Always strict, whatever Meter.ReversePath says: loose
	// passes every client source (the host routes them all), and the
	// rule only ever drops traffic from a client's address that came in
	// where the host does not route it. Attached, it drops too: it is
	// spoofed whatever the admin's chain would say.
	//
	// The route lookup alone passes a protected prefix the host has no
	// route of its own for: the lookup falls to the default route,
	// through the WAN, the very interface the spoof came in on (the whole
	// --wireguard-gone-grace window, when the interface and its routes
	// are gone but its peers still own and protect their AllowedIPs; a
	// withdrawn route; an IPv4 multipath with a next hop via the WAN).
	// So the rule after it also drops a new flow from a protected source
	// that came in on an interface pcpd does not serve:
	//
	//	ip6 saddr @protected6 iifname != @serving_ifs counter drop
	//
	// (review of the guard rule, 2026-12-04, h/revspoof;
	// TestGuardDropsSpoofedSourceRoutedViaWAN). A client's address is
	// genuine only on an interface pcpd serves (its tunnel, or its LAN in
	// static mode, a gateway on that LAN included). What it refuses: a
	// protected prefix reached through an interface pcpd does not serve
	// (one not in --interface, or one pcpd holds no socket on: down,
	// without an address, or its addresses still in DAD), and, before the
	// first SetServed of a fresh table, every new client-to-client flow
	// (serving_ifs is empty; a restart keeps what it held). After the
	// route lookup, so that a spoof the lookup catches is counted there as
	// before; either order costs a genuine client-to-client flow both.
	spoofed := func(fam byte, src []expr.Any, s *nftables.Set) []expr.Any {
		return rule(nfproto(fam), src, x(lookup(s, reg0),
			&expr.Fib{Register: reg0, FlagSADDR: true, FlagIIF: true, ResultOIF: true},
			eq(reg0, 0, 0, 0, 0), &expr.Counter{}, drop))
	}
	unserved := func(fam byte, src []expr.Any, s *nftables.Set) []expr.Any {
		return rule(nfproto(fam), src, x(lookup(s, reg0), loadMeta(expr.MetaKeyIIFNAME, reg0),
			&expr.Lookup{SourceRegister: reg0, SetName: b.servingIfs.Name, SetID: b.servingIfs.ID, Invert: true},
			&expr.Counter{}, drop))
	}
	// A new flow from one of the host's own addresses is spoofed, from
	// wherever it came: the host's own packets leave through output and
	// postrouting, never the forward hook, so a forwarded packet with a
	// local source was made by someone else. IPv6 has no martian-source
	// check, and before this rule a datagram from the WAN with the host's
	// tunnel address as its source passed a MAP's or PEER's pinhole to
	// the client, which saw it come "from its gateway" (h/peerend's probe;
	// TestGuardDropsHostOwnSource, TestE2ESpoofedHostSource):
	//
	//	ip6 saddr != @protected6 fib saddr type 2-4 counter drop
	//
	// A route lookup of the source without an interface, its type local
	// (2: the host holds the address on some interface, its local table),
	// broadcast (3: an IPv4 subnet broadcast of the host's) or anycast
	// (4: an IPv6 subnet-router anycast address, which the kernel joins for
	// every prefix of a forwarding interface); nft lists the range as
	// "2-4". h/spoofsrc's "type local" passed the last two from the WAN
	// (the broadcast with rp_filter=0, the kernel's default, whose martian
	// check looks for interface addresses only), and the client's answer
	// went to the host (review h/revspoof2,
	// TestGuardDropsHostAnycastBroadcastSource). Not for a protected
	// source: the rules above drop one the host holds (its route is local
	// or anycast: "oif 0"), and the lookup calls "anycast" the prefix
	// address of any route without a gateway too, such as 2001:db8:1:4::
	// of a client prefix routed "dev wg0", which a client may send from
	// (TestGuardLocalSourceSparesProtected: dropped without the set
	// lookup; protected sources skip this route lookup now). A link-local
	// source needs no exception: the kernel does not forward one to
	// another interface (ip6_forward, before the hook). After the
	// established accept, so only a flow's new packets (a one-way UDP
	// stream's every datagram: "new" until a reply) pay it, and before the
	// DNAT accept, which an IPv6 MAP's redirected flows take. IPv4 has it
	// too, in the same place (a NAPT mapping's flows arrive DNAT-ed): the
	// kernel's martian check drops a local source after the DNAT by
	// default, but not with accept_local=1, and then the spoof passed a
	// NAPT mapping the same way. Attached, it drops too, as the rules
	// above.
	localSource := func(fam byte, src []expr.Any, s *nftables.Set) []expr.Any {
		return rule(nfproto(fam), src, x(&expr.Lookup{SourceRegister: reg0, SetName: s.Name, SetID: s.ID, Invert: true},
			&expr.Fib{Register: reg0, FlagSADDR: true, ResultADDRTYPE: true},
			&expr.Range{Op: expr.CmpOpEq, Register: reg0,
				FromData: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL),
				ToData:   binaryutil.NativeEndian.PutUint32(unix.RTN_ANYCAST)},
			&expr.Counter{}, drop))
	}
	guard6 := [][]expr.Any{rule(ctEstablished, x(accept)),
		spoofed(unix.NFPROTO_IPV6, x(loadNet(ip6SrcOff, 16, reg0)), b.protected6),
		unserved(unix.NFPROTO_IPV6, x(loadNet(ip6SrcOff, 16, reg0)), b.protected6),
		localSource(unix.NFPROTO_IPV6, x(loadNet(ip6SrcOff, 16, reg0)), b.protected6),
		rule(ctDNAT, x(accept)), icmp}
	if b.cfg.AllowEcho {
		guard6 = append(guard6, rule(x(loadMeta(expr.MetaKeyL4PROTO, reg0), eq(reg0, unix.IPPROTO_ICMPV6),
			&expr.Payload{Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1, DestRegister: reg0},
			eq(reg0, 128), accept)))
	}
	var recheck6 [][]expr.Any
	for _, k := range cutKinds {
		// The nfproto match is implied by the jump here, but without it
		// nft lists raw "@nh,192,128" instead of "ip6 daddr".
		admit := rule(nfproto(unix.NFPROTO_IPV6), keyPacket6(k), x(lookup(b.sets[k], reg0)))
		var verdict expr.Any = accept
		if b.cutLabels {
			recheck6 = append(recheck6, rule(admit, x(accept)))
			admit = rule(admit, b.setFlowLabel())
			if b.recordsFlows() {
				verdict = goTo(b.chainAdmit6) // the record (flowed.go)
			}
		}
		guard6 = append(guard6, rule(admit, x(verdict)))
	}
	if b.cutLabels && !b.cfg.Attached {
		// An established flow a pinhole admitted (flowLabel), in its
		// original direction (from the remote), is let on only while an
		// element still admits it (recheck6, cutFlowRules): a deleted,
		// revoked or expired pinhole's flows end in the kernel with its
		// element, with no conntrack walk and with pcpd dead too.
		guard6 = append([][]expr.Any{rule(x(loadCt(expr.CtKeyDIRECTION, reg0), eq(reg0, 0)),
			x(loadCt(expr.CtKeySTATE, reg0)), bitsSet(reg0, expr.CtStateBitESTABLISHED),
			x(loadCt(expr.CtKeyLABELS, reg0)), labelSet(flowLabel), x(goTo(b.chainRecheck6)))}, guard6...)
	}
	if b.cutLabels {
		// Attached, pcpd_cut sends them here (attcut.go). Disarmed
		// (arm.go): accept.
		recheck6 = append(recheck6, b.recheckEnd())
	}

	guard4 := [][]expr.Any{rule(ctEstablished, x(accept)),
		spoofed(unix.NFPROTO_IPV4, x(loadNet(ip4SrcOff, 4, reg0)), b.protected4),
		unserved(unix.NFPROTO_IPV4, x(loadNet(ip4SrcOff, 4, reg0)), b.protected4),
		localSource(unix.NFPROTO_IPV4, x(loadNet(ip4SrcOff, 4, reg0)), b.protected4),
		rule(ctDNAT, x(accept))}
	if !b.cfg.Attached {
		// Standalone, the guards are the last word for protected prefixes.
		// Attached, falling off the end returns to the admin's chain, whose
		// own rules and policy decide.
		guard6 = append(guard6, x(drop))
		guard4 = append(guard4, x(drop))
	}

	// The map's data (address . port) lands in the registers the lookup key
	// came from; the port starts after the address. With the labels
	// (natcut.go), the translated flow is labelled natLabel first, on the
	// same key's hit, as nft writes and lists it:
	//
	//	ip daddr . meta l4proto . th dport @napt4 ct label set 126 dnat ip to ip daddr . meta l4proto . th dport map @napt4
	//
	// (a label set between the map's lookup and the dnat would list as
	// "ct label set 126 dnat ...", which read back labels every flow).
	dnat := func(fam byte, key func() []expr.Any, s *nftables.Set, portReg uint32) []expr.Any {
		r := nfproto(fam)
		if b.natCutting() {
			r = rule(r, key(), x(lookup(s, reg0)), b.setLabel(b.natLabel))
		}
		return rule(r, key(), x(
			&expr.Lookup{SourceRegister: reg0, DestRegister: reg0, IsDestRegSet: true, SetName: s.Name, SetID: s.ID},
			&expr.NAT{Type: expr.NATTypeDestNAT, Family: uint32(fam), RegAddrMin: reg0, RegProtoMin: portReg, Specified: true},
		))
	}
	key6 := func(k kind) func() []expr.Any { return func() []expr.Any { return keyPacket6(k) } }
	key4 := func(k kind) func() []expr.Any { return func() []expr.Any { return keyPacket4(k) } }
	prerouting := [][]expr.Any{
		dnat(unix.NFPROTO_IPV6, key6(kindRedirect6), b.sets[kindRedirect6], reg0+4),
		dnat(unix.NFPROTO_IPV6, key6(kindRedirect6Filter), b.sets[kindRedirect6Filter], reg0+4),
		dnat(unix.NFPROTO_IPV4, key4(kindNAPT4), b.sets[kindNAPT4], reg0+1),
		dnat(unix.NFPROTO_IPV4, key4(kindNAPT4Filter), b.sets[kindNAPT4Filter], reg0+1),
	}

	// Two-way NAPT (RFC 6886 §3.9): a new outbound flow from a mapped
	// internal address and port leaves from its external address and
	// port. Flows that came in through the DNAT are already translated
	// and never reach a nat chain again.
	//
	// Only towards the WAN: a flow leaving through an interface pcpd
	// serves (serving_ifs: another tunnel client, a host on a served
	// LAN) keeps its source, so the peer sees the client's own address
	// and answers it directly. Before, every new flow from the mapped
	// port was translated whatever interface it left on: the peer saw
	// the public address and its replies hairpinned through the host
	// (review of the IPv4 data plane, 2026-12-04;
	// TestNAPT4SNATOnlyTowardsWAN). One rule first, for both maps:
	//
	//	oifname @serving_ifs ct status ! dnat return
	//
	// A flow DNAT-ed on its way (hairpinning: a client's new flow from
	// its mapped port to another client's public endpoint) is still
	// translated: the receiver must see the sender's public endpoint
	// (RFC 4787 REQ-9 a, RFC 5382 REQ-8), as before d42eb88. Untranslated,
	// a socket connected to that endpoint dropped it, and on one LAN the
	// replies went straight back past the reverse DNAT (review revedge,
	// TestNAPT4HairpinKeepsExternalSource). A flow from the WAN through
	// a mapping is DNAT-ed too, but its source is no client's, so no
	// snat4 element matches it.
	//
	// (return in a base chain is its policy, accept: the host's own
	// srcnat chains, a masquerade, still run). Like the guards' rule it
	// keys on the interface, not an address: the WAN is every interface
	// pcpd does not serve. In a fresh table before the listener's first
	// SetServed, serving_ifs is empty and every such flow is translated,
	// as before; a restart keeps what it held.
	snat := func(key []expr.Any, s *nftables.Set) []expr.Any {
		return rule(nfproto(unix.NFPROTO_IPV4), key, x(
			&expr.Lookup{SourceRegister: reg0, DestRegister: reg0, IsDestRegSet: true, SetName: s.Name, SetID: s.ID},
			&expr.NAT{Type: expr.NATTypeSourceNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: reg0, RegProtoMin: reg0 + 1, Specified: true},
		))
	}
	postrouting := [][]expr.Any{
		rule(x(loadMeta(expr.MetaKeyOIFNAME, reg0), lookup(b.servingIfs, reg0), loadCt(expr.CtKeySTATUS, reg0),
			&expr.Bitwise{SourceRegister: reg0, DestRegister: reg0, Len: 4,
				Mask: binaryutil.NativeEndian.PutUint32(ipsDstNAT), Xor: make([]byte, 4)},
			&expr.Cmp{Op: expr.CmpOpEq, Register: reg0, Data: make([]byte, 4)},
			&expr.Verdict{Kind: expr.VerdictReturn})),
		snat(x(loadNet(ip4SrcOff, 4, reg0), loadMeta(expr.MetaKeyL4PROTO, reg0+1), loadTh(thSrcOff, reg0+2)), b.snat[snat4]),
		snat(x(loadNet(ip4SrcOff, 4, reg0), loadMeta(expr.MetaKeyL4PROTO, reg0+1), loadTh(thSrcOff, reg0+2),
			loadNet(ip4DstOff, 4, reg0+3), loadTh(thDstOff, reg0+4)), b.snat[snat4Filter]),
	}

	// The host's own processes must not send from a protected address
	// that is not one of the host's (h/hunt4, issue 9). An unprivileged
	// process may bind an IPv6 socket to any address (IPV6_FREEBIND) and
	// send from it: from a client's address and port to an internet host,
	// conntrack records a flow at the output hook, and the remote's
	// datagrams to the client's port then pass the guards above as that
	// flow's replies (established): a hole in front of the client that no
	// lease made. To another client, the datagram passes for the first
	// client's own. So, at the output hook, a datagram of a local socket
	// whose source lies in a protected prefix but is not local (nor
	// anycast: the route lookup fib does for the source, as localSource
	// above) is dropped:
	//
	//	ip6 saddr @protected6 meta skuid >= 0 fib saddr type != local-anycast counter drop
	//
	// "meta skuid" holds for a packet with a full socket only: what the
	// kernel sends for no socket (a reject's TCP reset to an inbound
	// connection, which carries the client's address as its source) is
	// left alone. IPv4 the same, though IPv4 has no unprivileged way to
	// send from an address not the host's (no IP_TRANSPARENT).
	//
	// The same flow can be begun from its other end (h/revh4): a process
	// bound (IPV6_FREEBIND) to an internet host's address and port sends
	// to a client's service; conntrack records the remote as the flow's
	// original side, the client's answer is forwarded out as its reply,
	// and the remote's own datagrams to the client are then established
	// in the original direction. So a packet of a local socket to a
	// protected address, from a source that is not the host's, is dropped
	// too when it would make a flow (ct state new); within a flow that is
	// already there (a transparent proxy answering a client as the server
	// it asked) it passes:
	//
	//	ct state new ip6 daddr @protected6 meta skuid >= 0 fib saddr type != local-anycast counter drop
	//
	// Every packet the host sends passes this chain, so each rule tests
	// its cheapest field first: nfproto, then ct state (a load from the
	// packet's conntrack entry), the set lookup after it (an interval
	// set's tree walk), fib last (a route lookup). pcpd's own answers
	// (untracked, notrack_out) and the host's established flows leave
	// the destination rules at the ct state compare instead of after a
	// lookup in protected6/protected4: ≈ 115 ns a datagram less, while
	// a new flow's pays one ct compare more, within the spread
	// (BENCHMARKS.md item 91). The expressions only match, so their
	// order changes no verdict.
	forged := func(fam byte, addr []expr.Any, s *nftables.Set, cond ...[]expr.Any) []expr.Any {
		return rule(nfproto(fam), rule(cond...), addr, x(lookup(s, reg0)), x(
			loadMeta(expr.MetaKeySKUID, reg0),
			&expr.Cmp{Op: expr.CmpOpGte, Register: reg0, Data: make([]byte, 4)},
			&expr.Fib{Register: reg0, FlagSADDR: true, ResultADDRTYPE: true},
			&expr.Range{Op: expr.CmpOpNeq, Register: reg0,
				FromData: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL),
				ToData:   binaryutil.NativeEndian.PutUint32(unix.RTN_ANYCAST)},
			&expr.Counter{}, drop))
	}
	localOut := [][]expr.Any{
		forged(unix.NFPROTO_IPV6, x(loadNet(ip6SrcOff, 16, reg0)), b.protected6),
		forged(unix.NFPROTO_IPV4, x(loadNet(ip4SrcOff, 4, reg0)), b.protected4),
		forged(unix.NFPROTO_IPV6, x(loadNet(ip6DstOff, 16, reg0)), b.protected6, ctNew),
		forged(unix.NFPROTO_IPV4, x(loadNet(ip4DstOff, 4, reg0)), b.protected4, ctNew),
	}

	out := []chainRules{
		{b.chainGuard6, guard6},
		{b.chainGuard4, guard4},
		{b.chainEntry, entry},
		{b.chainPrerouting, prerouting},
		{b.chainPostrouting, postrouting},
		{b.chainLocalOut, localOut},
	}
	if b.recordsFlows() {
		out = append(out, chainRules{b.chainAdmit6, b.admit6Rules()})
	}
	if b.cutLabels {
		out = append(out, chainRules{b.chainRecheck6, recheck6})
	}
	if b.attCut() {
		out = append(out, b.attCutLayout()...)
	} else if b.natCutting() {
		natcut, recheckNAT := b.natCutRules()
		out = append(out, chainRules{b.chainNATCut, natcut}, chainRules{b.chainRecheckNAT, recheckNAT})
	}
	if b.controlling() {
		in, local, meter, outRules := b.controlRules()
		out = append(out, chainRules{b.chainControlIn, in}, chainRules{b.chainControlLocal, local})
		if b.notracking() {
			out = append(out, chainRules{b.chainNotrackOut, outRules})
		}
		if b.ownerLayout() {
			out = append(out, chainRules{unownedChain, b.unownedChainRules()}, chainRules{controlMeterChain, meter})
		}
	}
	return out
}

// layoutRuleIs: r, a rule of a layout chain as the kernel lists it, holds
// want's expressions (a rule of layout(), asListed), every value equal:
// counters' figures and the set IDs of the transaction that wrote a
// lookup (the kernel lists the set by name) aside. Else the index of the
// first expression that differs. Healthy compared the layout chains by
// rule count only, so a guard's final drop replaced with "counter accept"
// (the inbound guard off) passed every check (review4 F3,
// TestHealthyGuardRuleReplaced).
func layoutRuleIs(r *nftables.Rule, want []expr.Any) (int, bool) {
	for j, e := range r.Exprs {
		if j >= len(want) {
			return j, false
		}
		w := want[j]
		switch v := e.(type) {
		case *expr.Counter:
			e = &expr.Counter{}
			if _, ok := w.(*expr.Counter); ok {
				w = e // admit6's, written at 1 (flowed.go)
			}
		case *expr.Lookup:
			if wl, ok := w.(*expr.Lookup); ok {
				c, d := *v, *wl
				c.SetID, d.SetID = 0, 0
				e, w = &c, &d
			}
		case *expr.Ct:
			if wc, ok := w.(*expr.Ct); ok && wc.SourceRegister {
				// The library decodes a ct set's key but not its
				// source register (NFTA_CT_SREG): it lists as a ct
				// load into register 0, which no load can be (the
				// verdict register).
				c, d := *v, *wc
				c.Register, d.Register, d.SourceRegister = 0, 0, false
				e, w = &c, &d
			}
		case *expr.Dynset:
			if wd, ok := w.(*expr.Dynset); ok {
				c, d := *v, *wd
				c.SetID, d.SetID = 0, 0
				e, w = &c, &d
			}
		}
		if !reflect.DeepEqual(e, w) {
			return j, false
		}
	}
	if len(r.Exprs) != len(want) {
		return len(r.Exprs), false
	}
	return 0, true
}
