// Package pinhole is pcpd's nftables backend: it keeps expiring inbound
// pinholes, port redirects and IPv4 NAPT mappings in the kernel, over netlink
// (github.com/google/nftables), and guards the protected prefixes.
//
// Expiry is the kernel's job: every entry is a set element with its own
// timeout, so nothing outlives its lease even when pcpd is killed. The
// package knows nothing of PCP; the engine translates leases into Pinholes.
//
// See README.md in this directory for the table layout and for the two ways
// pcpd fits into a host's firewall (standalone and attached), each with a
// worked example.
package pinhole

import (
	"errors"
	"fmt"
	"net/netip"
	"time"
	"unique"
)

// Protocol numbers with a port field at the start of the transport header.
// Only these may carry a non-zero port: for any other protocol the "port"
// bytes would be whatever the header holds there.
var portProtocols = map[uint8]bool{
	6:   true, // TCP
	17:  true, // UDP
	33:  true, // DCCP
	132: true, // SCTP
	136: true, // UDP-Lite
}

// HasPorts reports whether protocol proto carries 16-bit ports that a
// Pinhole may name.
func HasPorts(proto uint8) bool { return portProtocols[proto] }

// Sentinel errors. Errors returned by this package wrap one of these (and,
// for kernel failures, the errno as well).
var (
	// ErrInvalid: a Pinhole, Op or Config that can never be installed.
	ErrInvalid = errors.New("invalid")
	// ErrConflict: the kernel holds a different mapping under the same key
	// (an external port already forwarded elsewhere), or intervals overlap.
	ErrConflict = errors.New("conflicting entry")
	// ErrMissing: pcpd's table, set or chain is gone (tampering, or Setup
	// never ran); run Setup and re-install.
	ErrMissing = errors.New("object missing")
	// ErrFull: the kernel refused to grow a set.
	ErrFull = errors.New("set full")
	// ErrUnhealthy: Healthy found pcpd's objects incomplete or altered.
	ErrUnhealthy = errors.New("ruleset damaged")
	// ErrCheckFailed: Healthy could not tell, its check transaction having
	// failed as a whole (ENOMEM under memory pressure): no damage found,
	// none ruled out; check again later rather than repair (a repair's
	// writes would meet the same failure).
	ErrCheckFailed = errors.New("health check failed")
	// ErrNoTable: attached mode, and the admin's table does not exist.
	ErrNoTable = errors.New("table not found")
	// ErrOwnerMeter: the owner meter (ownermeter.go) could not be written,
	// or Healthy found it other than SetOwners left it, while everything
	// else is in place: pinholes can be installed, and RepairOwners is
	// the retry. Healthy wraps ErrUnhealthy with it.
	ErrOwnerMeter = errors.New("owner meter not in place")
	// ErrProtected: the protected sets could not be written, or Healthy
	// found them other than SetProtected was last given, while everything
	// else but possibly the owner meter is in place: pinholes can be
	// installed, and RepairProtected is the retry. Healthy wraps
	// ErrUnhealthy with it.
	ErrProtected = errors.New("protected sets not in place")
)

// Pinhole is one inbound opening. Its shape decides what gets installed:
//
//   - IPv6, ExternalPort == InternalPort (or 0): a plain pinhole, traffic to
//     InternalAddr/Protocol/InternalPort is let through the guard.
//   - IPv6, ExternalPort != InternalPort: a port redirect on the same address
//     (e.g. 80 → 443), DNAT-ed and let through.
//   - IPv4: a NAPT mapping, ExternalAddr:ExternalPort DNAT-ed to
//     InternalAddr:InternalPort and let through.
//
// Protocol 0 means all protocols (ports must then be 0); port 0 means all
// ports (plain IPv6 pinholes only). A valid RemotePrefix restricts the
// pinhole to remote peers inside it, and a non-zero RemotePort to that
// source port (FILTER and PEER).
type Pinhole struct {
	Protocol     uint8
	InternalAddr netip.Addr
	InternalPort uint16
	ExternalAddr netip.Addr // IPv6: zero value or InternalAddr
	ExternalPort uint16     // IPv6: 0 means InternalPort
	RemotePrefix netip.Prefix
	RemotePort   uint16
	// odd is, for a Pinhole List or the watcher read from an element
	// pcpd never writes (by hand: one that element would not write back
	// to the set it came from, such as an IPv6 redirect from a port to
	// itself or from every port, which kindOf puts in another set, or one
	// whose fields no Pinhole has, such as a port range 10-20, whose
	// fields are then as far as they could be read), that element and its
	// set: a Delete of this Pinhole removes exactly it (no SNAT companion
	// with it). The zero Handle for every other Pinhole. Such a Pinhole
	// equals no lease's, and Apply installs none (h/redir6).
	odd unique.Handle[oddElement]
}

// oddElement is a Pinhole's odd element: its set and its bytes.
type oddElement struct {
	k             kind
	key, end, val string
	// snat: an element of k's SNAT map (kindNAPT4: snat4,
	// kindNAPT4Filter: snat4_filter) that is no companion pcpd writes
	// (decodeSNAT: a catch-all, h/catchall; any other shape, h/oddsnat).
	snat bool
}

// setName is the (unprefixed) name of o's set.
func (o oddElement) setName() string {
	if o.snat {
		return snatSpecs[snatOf(o.k)].name
	}
	return specs[o.k].name
}

// Odd reports whether p was read from an element pcpd never writes (by
// hand), which only a Delete of p removes; such a p is none of a lease's
// pinholes.
func (p Pinhole) Odd() bool { return p.odd != unique.Handle[oddElement]{} }

// OddSNAT reports whether p was read from an element of a SNAT map
// (snat4, snat4_filter) that is no companion pcpd writes (by hand): its
// Delete removes exactly that element, no map element with it; its
// fields are the internal endpoint (and filter) the element keys, as far
// as they could be read, and the external endpoint it translates to.
func (p Pinhole) OddSNAT() bool { return p.Odd() && p.odd.Value().snat }

// SNATCompanionOf is, for an odd SNAT Pinhole that is byte for byte the
// SNAT companion pcpd writes for a NAPT mapping (List returns one when it
// read no map element for that mapping: added by hand, or the mapping's
// map element deleted by hand), that mapping. The audit leaves it to a
// live lease that holds the mapping (whose put-back writes the map
// element): never deleted under it.
func (p Pinhole) SNATCompanionOf() (Pinhole, bool) {
	if !p.OddSNAT() {
		return Pinhole{}, false
	}
	o := p.odd.Value()
	n := p
	n.odd = unique.Handle[oddElement]{}
	if c, err := n.normalize(); err != nil || c != n {
		return Pinhole{}, false
	}
	i, se, ok := snatElement(kindOf(n), n)
	if !ok || i != snatOf(o.k) || string(se.Key) != o.key || string(se.KeyEnd) != o.end || string(se.Val) != o.val {
		return Pinhole{}, false
	}
	return n, true
}

// CatchAll reports whether p was read from a catch-all element (nft's
// "*", by hand) of a pinhole set or map or a SNAT map: an odd Pinhole of
// no fields.
func (p Pinhole) CatchAll() bool { return p.Odd() && p.odd.Value().key == "" }

// String is for logs and error messages.
func (p Pinhole) String() string {
	if p.Odd() && p.odd.Value().key == "" {
		return p.odd.Value().setName() + " catch-all element (pcpd never writes one)"
	}
	s := fmt.Sprintf("proto %d %s", p.Protocol, netip.AddrPortFrom(p.InternalAddr, p.InternalPort))
	if p.ExternalAddr.IsValid() && (p.ExternalAddr != p.InternalAddr || p.ExternalPort != p.InternalPort) {
		s += fmt.Sprintf(" via %s", netip.AddrPortFrom(p.ExternalAddr, p.ExternalPort))
	}
	if p.RemotePrefix.IsValid() {
		s += fmt.Sprintf(" from %s", p.RemotePrefix)
		if p.RemotePort != 0 {
			s += fmt.Sprintf(" port %d", p.RemotePort)
		}
	}
	if p.Odd() {
		o := p.odd.Value()
		s += fmt.Sprintf(" (%s element pcpd never writes: %x . %x : %x)", o.setName(), o.key, o.end, o.val)
	}
	return s
}

// Admits reports whether the kernel lets a new inbound flow of protocol
// proto from src to dst through p once installed: dst is where the remote
// sends (the external endpoint; IPv6: the internal address, or the
// external port of a redirect). Each field matches as p's set element
// does (layout.go, keyPacket6/keyPacket4): protocol 0 and port 0 any, the
// remote prefix a range of addresses (an IPv4-mapped one is IPv4, as
// normalize makes it), remote port 0 any. False for a p Apply refuses.
// It says nothing of where the kernel delivers the flow (AdmitsFlow,
// which the server spares tracked flows with; TestAdmitsAsKernelKey
// checks Admits against the set elements).
func (p Pinhole) Admits(proto uint8, src, dst netip.AddrPort) bool {
	n, err := p.normalize()
	if err != nil {
		return false
	}
	sa, da := src.Addr().Unmap(), dst.Addr().Unmap()
	return (n.Protocol == 0 || n.Protocol == proto) &&
		da == n.ExternalAddr && (n.ExternalPort == 0 || n.ExternalPort == dst.Port()) &&
		(!n.RemotePrefix.IsValid() || n.RemotePrefix.Contains(sa)) &&
		(n.RemotePort == 0 || n.RemotePort == src.Port())
}

// AdmitsFlow is Admits for a tracked flow from src to dst that the kernel
// delivers at to (its reply tuple's source; dst unless a DNAT moved it):
// p admits it and would deliver it there. An IPv4 NAPT mapping or an IPv6
// redirect DNATs what it admits to its internal endpoint, so only flows
// delivered there; a plain IPv6 pinhole translates nothing, so flows
// delivered at dst, or at another port it admits as well (an all-ports
// pinhole, for a flow an ended redirect DNAT-ed). Admits alone took a
// mapping that took over an endpoint, DNAT-ing it elsewhere, for one that
// admits the connections of the mapping that ended there (review
// h/revctl, TestE2EEndpointRetakenEndsOldFlow).
func (p Pinhole) AdmitsFlow(proto uint8, src, dst, to netip.AddrPort) bool {
	if !p.Admits(proto, src, dst) {
		return false
	}
	n, _ := p.normalize() // Admits: valid
	to, dst = netip.AddrPortFrom(to.Addr().Unmap(), to.Port()), netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if n.InternalAddr.Is4() || n.ExternalPort != n.InternalPort {
		return to == netip.AddrPortFrom(n.InternalAddr, n.InternalPort)
	}
	return to == dst || p.Admits(proto, src, to)
}

// normalize validates p and returns it in canonical form: IPv6 external
// fields filled in, remote prefix masked. Everything Apply sends and List
// returns is canonical, so the two compare equal. Its errors say what is
// wrong; callers add which pinhole.
func (p Pinhole) normalize() (Pinhole, error) {
	bad := func(format string, a ...any) (Pinhole, error) {
		return Pinhole{}, fmt.Errorf("%s: %w", fmt.Sprintf(format, a...), ErrInvalid)
	}
	in := p.InternalAddr
	if !in.IsValid() || in.IsUnspecified() || in.Zone() != "" {
		return bad("internal address must be a unicast address without zone")
	}
	in = in.Unmap()
	if in.IsLoopback() {
		// Never forwarded, so never pinholed; ::1 is Setup's probe key.
		return bad("internal address must not be a loopback address")
	}
	p.InternalAddr = in
	if p.Protocol == 0 && (p.InternalPort != 0 || p.ExternalPort != 0 || p.RemotePort != 0) {
		return bad("protocol 0 (all protocols) requires ports 0")
	}
	if !HasPorts(p.Protocol) && (p.InternalPort != 0 || p.ExternalPort != 0 || p.RemotePort != 0) {
		return bad("protocol %d has no ports", p.Protocol)
	}
	if p.RemotePrefix.IsValid() {
		rp := netip.PrefixFrom(p.RemotePrefix.Addr().Unmap(), p.RemotePrefix.Bits())
		if p.RemotePrefix.Addr().Is4In6() {
			rp = netip.PrefixFrom(rp.Addr(), p.RemotePrefix.Bits()-96)
		}
		if !rp.IsValid() || rp.Addr().Is4() != in.Is4() || rp.Addr().Zone() != "" {
			return bad("remote prefix must be of the internal address's family")
		}
		p.RemotePrefix = rp.Masked()
	} else {
		p.RemotePrefix = netip.Prefix{}
		if p.RemotePort != 0 {
			return bad("remote port without remote prefix")
		}
	}
	if in.Is6() {
		if p.ExternalAddr.IsValid() && p.ExternalAddr.Unmap() != in {
			return bad("IPv6 external address must equal the internal address")
		}
		p.ExternalAddr = in
		if p.ExternalPort == 0 {
			p.ExternalPort = p.InternalPort
		}
		if p.InternalPort == 0 && p.ExternalPort != 0 {
			return bad("all-ports pinhole cannot have an external port")
		}
		return p, nil
	}
	// IPv4: NAPT only.
	ext := p.ExternalAddr.Unmap()
	if !ext.Is4() || ext.IsUnspecified() {
		return bad("IPv4 mapping needs an IPv4 external address")
	}
	p.ExternalAddr = ext
	if p.Protocol == 0 || p.InternalPort == 0 || p.ExternalPort == 0 {
		return bad("IPv4 mapping needs a protocol with ports and both ports")
	}
	return p, nil
}

// OpKind says what an Op does.
type OpKind uint8

const (
	// Install puts the pinhole in place with the given timeout. Installing
	// what is already there is not an error: it resets the timeout.
	Install OpKind = iota + 1
	// Refresh sets a new remaining timeout; if the kernel expired the entry
	// meanwhile it is put back. In the kernel it is the same as Install.
	Refresh
	// Delete removes the pinhole; deleting one that already expired (or
	// never existed) is not an error. For a redirect or NAPT mapping the
	// internal address and port must match what the kernel holds under the
	// external key, or the op fails with ErrConflict.
	Delete
)

func (k OpKind) String() string {
	switch k {
	case Install:
		return "install"
	case Refresh:
		return "refresh"
	case Delete:
		return "delete"
	}
	return fmt.Sprintf("OpKind(%d)", uint8(k))
}

// Op is one change in an Apply batch. Timeout is the remaining life of the
// entry (Install and Refresh; at least 1 ms); the kernel removes the entry
// when it runs out.
//
// After makes the op take effect after every earlier op of the batch, as if
// sent in a transaction of its own after them (but within the batch's one
// transaction). Apply otherwise lets the ops on distinct elements of one
// phase go as grouped steps (every add first, then the deletes: queueOps),
// which is the same outcome unless two of them touch overlapping elements of
// a concatenated-range set: the kernel refuses an element whose range starts
// or ends inside another's, so an element put back (or a Delete's guard add)
// after the delete of one it overlaps needs After. Costs a message a step.
type Op struct {
	Kind    OpKind
	Pinhole Pinhole
	Timeout time.Duration
	After   bool
	// Companion, with Delete of a NAPT mapping: only its SNAT companion
	// is deleted (guard add and delete), its map element left as it is.
	// It takes a live mapping's companion out of the way of a foreign
	// mapping's Delete (whose guard add of its own companion would start
	// inside it) where the live one's own Delete would be refused, its
	// guard add of the map element starting inside the foreign one (a
	// narrower foreign filter from the same start: h/redir6).
	Companion bool
}

// maxTimeout keeps timeouts far below what the kernel's jiffies conversion
// accepts; leases are clamped long before this anyway.
const maxTimeout = 365 * 24 * time.Hour

func (o Op) validate() (Op, error) {
	switch o.Kind {
	case Install, Refresh:
		if o.Pinhole.Odd() {
			return Op{}, fmt.Errorf("an element pcpd never writes (read by List or the watcher) can only be deleted: %w", ErrInvalid)
		}
		if o.Timeout < time.Millisecond || o.Timeout > maxTimeout {
			return Op{}, fmt.Errorf("timeout %v out of range [1ms, %v]: %w", o.Timeout, maxTimeout, ErrInvalid)
		}
	case Delete:
	default:
		return Op{}, fmt.Errorf("unknown op kind: %w", ErrInvalid)
	}
	if o.Companion && (o.Kind != Delete || !o.Pinhole.InternalAddr.Unmap().Is4() || o.Pinhole.Odd()) {
		return Op{}, fmt.Errorf("only a NAPT mapping's Delete can be of its SNAT companion alone: %w", ErrInvalid)
	}
	if o.Pinhole.Odd() {
		// A Delete of the element it was read from, whatever its fields
		// (they may be none a Pinhole can have).
		return o, nil
	}
	p, err := o.Pinhole.normalize()
	if err != nil {
		return Op{}, err
	}
	o.Pinhole = p
	return o, nil
}

// OpError is the error Apply returns when one Op fails. The whole batch is
// then discarded by the kernel: nothing of it was applied, but for the
// catch-all Deletes Apply sent first, each on its own (see Apply).
type OpError struct {
	Index int // position in the batch; -1 when no single op is to blame
	Op    Op
	Err   error
}

func (e *OpError) Error() string {
	if e.Index < 0 {
		return fmt.Sprintf("pinhole: batch failed: %v", e.Err)
	}
	return fmt.Sprintf("pinhole: op %d (%s %s): %v", e.Index, e.Op.Kind, e.Op.Pinhole, e.Err)
}

func (e *OpError) Unwrap() error { return e.Err }

// Entry is what the kernel holds for one Pinhole.
type Entry struct {
	Pinhole   Pinhole
	Remaining time.Duration
	// NoCompanion: an IPv4 NAPT mapping List read from its map whose SNAT
	// companion it did not read (deleted by hand while the watch was off
	// or deaf; or the dump missed it): new outbound flows of the internal
	// endpoint do not leave from the mapping's external one. An Install
	// of the mapping writes both. Before (review h/revsnat), List said
	// nothing of it and the audit left the companion missing
	// (TestE2EAuditPutsBackDeletedCompanion).
	NoCompanion bool
	// CompanionRemaining is, for an IPv4 NAPT mapping whose SNAT
	// companion List read, the companion's remaining time (NoTimeout: it
	// has none); zero otherwise. The mapping's Install writes both with
	// one timeout: the audit compares the longer of Remaining and this
	// with the lease (h/auditrem).
	CompanionRemaining time.Duration
}

// NoTimeout is an Entry's CompanionRemaining for a companion that has no
// timeout (it never ends by itself). A Remaining of 0 says the same of
// the element itself.
const NoTimeout time.Duration = -1

// Longest is the longest the kernel holds any part of e (the element
// and, for a NAPT mapping, its companion), and false when a part has no
// timeout.
func (e Entry) Longest() (time.Duration, bool) {
	if e.Remaining <= 0 || e.CompanionRemaining < 0 {
		return 0, false
	}
	return max(e.Remaining, e.CompanionRemaining), true
}

// Canonical is p as Apply sends it and List returns it (IPv6 external
// fields filled in, remote prefix masked), or an error when Apply would
// refuse p.
func (p Pinhole) Canonical() (Pinhole, error) { return p.normalize() }
