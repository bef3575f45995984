package pinhole

import (
	"errors"
	"hash/fnv"
	"net/netip"
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Standalone, the guard cuts the flows of a removed pinhole by itself.
// Its "ct state established,related accept" let a flow go on once a
// pinhole admitted it, so a deleted, revoked or expired pinhole's open
// connections passed until the server's conntrack walk deleted their
// entries (PMP-12), and every reply of a batch that ended one waited for
// that walk (≈ 9 ms a dump of the machine-wide table: BENCHMARKS.md item
// 41). Now the five IPv6 admission rules mark the flow they admit with
// the conntrack label bit flowLabel:
//
//	ip6 daddr . meta l4proto . th dport @pin6 ct label set 127 accept
//
// and guard6 sends such a flow's established packets in its original
// direction (from the remote) to recheck6 before the established accept:
//
//	ct direction original ct state established ct label 127 goto recheck6
//
// which runs the same lookups on the packet and accepts on a hit, else
// drops (counted). For an IPv6 flow the guard did not see translated, the
// packet in its original direction carries the conntrack original tuple,
// the key the element admitted, so a flow is cut exactly when no element
// (of any of the five sets: a PEER on the same endpoint, an all-ports MAP)
// admits it any longer, and at once: the element's removal commits with
// the delete (or the kernel's timeout: pcpd dead too). The flow's entry
// stays (the server's walk still removes it, for the table's space and
// TCP's state); a loose-picked-up revival of it is a new flow, which the
// admission rules judge.
//
// Unlabelled flows keep the established accept: the replies to a
// client's own outbound flows (their original direction is the client's),
// DNAT-ed flows (redir6, accepted by "ct status dnat" before the
// admission rules, so never labelled), ICMP and echo flows, and flows
// that began before the rules existed (an upgrade, an admission rule an
// admin altered: Setup sees such a guard6, and CutsFlows is false from
// then on, admitsUnlabelled). A packet cannot set or fake the
// label: it is conntrack's metadata, written only by ruleset rules and
// ctnetlink (CAP_NET_ADMIN).
//
// Attached, the admin's chain usually accepts established flows before
// it jumps to pcpd's, so a re-check in pcpd's chain would not run: the
// re-check is in a base chain of pcpd's own there, with a bit of its own
// (attcut.go). Not when the kernel refuses conntrack labels
// (CONFIG_NF_CONNTRACK_LABELS unset): Setup falls back to the layout
// without them (labelsRefused), and the server waits for its walk.

// flowLabel is the conntrack label bit (of 128) the guard sets on the
// flows a pinhole admitted. The highest: connlabel.conf users and tools
// number their labels from bit 0 upwards, and ct label set only ever adds
// this bit (the kernel replaces the bits of its mask, which is the value):
// an admin's own labels on the flow stay. A flow an admin's own rule
// labels with it is re-checked as if a pinhole admitted it.
const flowLabel = 127

// cutKinds are the sets whose elements admit a flow in guard6's admission
// rules, as the packet keys them (keyPacket6): their flows are labelled
// and re-checked.
var cutKinds = [...]kind{kindPort, kindProto, kindAddr, kindFilter, kindAddrFilter}

// natLabel is the conntrack label bit pcpd's own DNAT rules set on the
// flows they translate (IPv4 NAPT, IPv6 port redirects): the re-check of
// natcut (natcut.go). Its own bit, not flowLabel: guard6 sends flowLabel
// flows to recheck6, whose lookups a redirected packet (translated before
// forward) never matches, and natcut sends natLabel flows to recheck_nat,
// whose lookups an IPv6 pinhole's flow never matches.
const natLabel = 126

// natLabelFor is the label bit table's DNAT rules set and its natcut
// re-checks: natLabel for the default table, another bit of 64-125 (a
// hash of the name) for any other. natcut sees every packet the host
// receives, so with one bit for every table a second pcpd on the host
// (its own table, its own clients) had its DNAT-ed flows re-checked
// against the first one's maps, and every one dropped after its first
// packet, both ways (review h/revnatcut, finding 1,
// TestNATCutSparesOthersLabelledFlows). recheck_nat cannot tell the
// flows apart otherwise: a rule on the flow's DNAT target ("ct reply ip
// saddr @protected4") needs a direction the nftables library writes for
// none of the typed address keys, and nft aborts listing the untyped
// one. Two tables other than the default may still share a bit (1 in 62).
func natLabelFor(table string) int {
	if table == "pcpd" {
		return natLabel
	}
	h := fnv.New32a()
	h.Write([]byte(table))
	return 64 + int(h.Sum32()%62)
}

// labelBits is label as the kernel's 128-bit label bitmap (bit n is
// bit n%8 of byte n/8, as nft writes "ct label 127").
func labelBits(label int) []byte {
	b := make([]byte, 16)
	b[label/8] = 1 << (label % 8)
	return b
}

// labelSet matches a label register holding label: "ct label 127".
func labelSet(label int) []expr.Any {
	return x(&expr.Bitwise{SourceRegister: reg0, DestRegister: reg0, Len: 16, Mask: labelBits(label), Xor: make([]byte, 16)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: reg0, Data: make([]byte, 16)})
}

// setFlowLabel is "ct label set 127" (attached: its own bit, attcut.go).
func (b *Backend) setFlowLabel() []expr.Any { return b.setLabel(b.cutLabelBit()) }

// setLabel is "ct label set <label>". refuseLabels (tests) writes a ct
// set of the state instead, which every kernel refuses as one without
// label support refuses this (EOPNOTSUPP: nft_ct_set_init).
func (b *Backend) setLabel(label int) []expr.Any {
	key := expr.CtKeyLABELS
	if b.refuseLabels {
		key = expr.CtKeySTATE
	}
	return x(&expr.Immediate{Register: reg0, Data: labelBits(label)},
		&expr.Ct{Key: key, Register: reg0, SourceRegister: true})
}

// labelsRefusal: Setup's layout transaction failed (err) with the label
// rules in it, as on a kernel without conntrack labels. Caller holds b.mu.
func (b *Backend) labelsRefusal(err error) bool { return b.cutLabels && labelsRefusal(err) }

func labelsRefusal(err error) bool {
	var le layoutError
	return errors.As(err, &le) && errors.Is(err, unix.EOPNOTSUPP)
}

// admitsUnlabelled reports whether guard6 as it is in the kernel, before
// Setup writes it, has an admission rule (a lookup in one of cutKinds'
// sets) that does not set flowLabel: a table laid out by a pcpd before
// the label rules (an upgrade), or one an admin altered (the repair after
// Healthy found it). The flows it admitted are unlabelled and the
// re-check never sees them, but the server's walk ends them as before, so
// their deletes' replies must wait for it: without this, an upgraded
// pcpd answered the delete of a mapping whose connection opened before
// the upgrade at once, and the connection carried data until the walk,
// up to ctWalkGap later (review h/revctcut). A guard6 that cannot be read
// (no table yet: no flows) admits nothing. Caller holds b.mu.
func (b *Backend) admitsUnlabelled() bool {
	return b.looksUpUnlabelled(b.chainGuard6, cutKinds[:])
}

// looksUpUnlabelled reports whether chain as it is in the kernel has a
// rule looking the packet up in a set or map of kinds that does not set a
// label (scanRules, isLabelSet), or has rules but no label rule at all: a
// layout of a pcpd before the labels, whatever its sets were named. A
// chain that cannot be read for want of the table (ENOENT) has none; one
// that cannot be read otherwise is taken to have one. Caller holds b.mu.
func (b *Backend) looksUpUnlabelled(chain string, kinds []kind) bool {
	rules, err := b.scanRules(b.readConn(), chain, kinds, isLabelSet)
	if err != nil {
		return !errors.Is(err, unix.ENOENT)
	}
	labelled := false
	for _, r := range rules {
		if r.lookup && !r.found {
			return true
		}
		labelled = labelled || r.found
	}
	return len(rules) > 0 && !labelled
}

// isLabelSet: e reads or sets the conntrack labels.
func isLabelSet(e expr.Any) bool {
	c, ok := e.(*expr.Ct)
	return ok && c.Key == expr.CtKeyLABELS
}

// scanned is a rule as scanRules read it: whether it looks the packet up
// in a set of the kinds asked for, and whether an expression of it is
// what the caller looks for.
type scanned struct{ lookup, found bool }

// scanRules reads chain through c and scans each rule: its lookups in
// kinds' sets, and found on each expression. Caller holds b.mu.
func (b *Backend) scanRules(c *nftables.Conn, chain string, kinds []kind, found func(expr.Any) bool) ([]scanned, error) {
	rules, err := c.GetRules(b.table, &nftables.Chain{Table: b.table, Name: chain})
	if err != nil {
		return nil, err
	}
	names := map[string]bool{}
	for _, k := range kinds {
		names[b.sets[k].Name] = true
	}
	out := make([]scanned, len(rules))
	for i, r := range rules {
		for _, e := range r.Exprs {
			if l, ok := e.(*expr.Lookup); ok && names[l.SetName] {
				out[i].lookup = true
			}
			out[i].found = out[i].found || found(e)
		}
	}
	return out, nil
}

// routeHandle opens a route socket in the Backend's namespace (a route
// socket only: see NetlinkRoutesAt).
func (b *Backend) routeHandle() (*netlink.Handle, error) {
	if b.netns > 0 {
		return netlink.NewHandleAt(netns.NsHandle(b.netns), unix.NETLINK_ROUTE)
	}
	return netlink.NewHandle(unix.NETLINK_ROUTE)
}

// localAddrs6 returns the IPv6 addresses of the Backend's namespace.
func (b *Backend) localAddrs6() (map[netip.Addr]struct{}, error) {
	h, err := b.routeHandle()
	if err != nil {
		return nil, err
	}
	defer h.Close()
	addrs, err := h.AddrList(nil, netlink.FAMILY_V6)
	if err != nil {
		return nil, err
	}
	local := make(map[netip.Addr]struct{}, len(addrs))
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			local[ip] = struct{}{}
		}
	}
	return local, nil
}

// CutsFlows reports whether the ruleset itself ends the established flows
// p admitted once p's element is gone (the label layout, standalone, in
// place since the last successful Setup, and no Setup of this Backend's
// found flows admitted unlabelled: admitsUnlabelled): an IPv6 pinhole that is not a
// port redirect. Attached too (attcut.go). Else (a kernel without
// labels) only the conntrack walk ends them. False too from a
// Healthy that found the layout damaged until a Setup writes it again
// (noteDamage); between the damage and that check it still says what
// the last Setup wrote. Cheap and lock-free
// (the server asks for every ended mapping).
//
// Also an IPv4 NAPT mapping's or an IPv6 redirect's (natCutKinds), with
// the natcut layout in place and no Setup of this Backend's having found
// pcpd's DNAT rules unlabelled (natUnlabelled): then the flows the DNAT
// translated end with the element. Not the outbound flows a NAPT
// mapping's SNAT companion translated (natcut.go): the caller must know
// whether the mapping may have some.
func (b *Backend) CutsFlows(p Pinhole) bool {
	n, err := p.normalize()
	if err != nil {
		return false
	}
	k := kindOf(n)
	if slices.Contains(natCutKinds[:], k) {
		return b.cuttingNAT.Load()
	}
	return b.cutting.Load() && slices.Contains(cutKinds[:], k)
}
