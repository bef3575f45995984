package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// OwnerID names an administrative domain: "wg:<base64 public key>" for a
// WireGuard peer, "static:<name>" for a statically configured client.
type OwnerID string

// Owner is one administrative domain and the prefixes it was given. Prefixes
// are the configured ones (masked, minus those too short to confer ownership);
// the effective ownership of an address is decided by Lookup, since a more
// specific prefix of another owner takes precedence.
type Owner struct {
	ID       OwnerID
	Label    string // operator label, or the static client's name; may be empty
	Prefixes []netip.Prefix
}

// Ownership maps addresses to owners.
type Ownership interface {
	// Lookup returns the owner whose prefix is the longest match for src.
	// IPv4 addresses must be unmapped (10.0.0.1, not ::ffff:10.0.0.1); an
	// IPv4-mapped or zoned address has no owner. The returned Prefixes are
	// shared with the lookup structure: read them, do not modify them.
	Lookup(src netip.Addr) (Owner, bool)
	// Owners returns a snapshot of every owner, safe to keep and modify.
	Owners() []Owner
}

// Holes is an optional extra of an Ownership (*WireGuard and *Static have
// it): the prefixes that are deliberately owned by nobody although they
// may lie inside an owner's prefix (WireGuard AllowedIPs that overlap
// across interfaces). Lookup misses inside a hole unless a more specific
// owned prefix holds the address, exactly as if the hole were an owner of
// its own; whoever mirrors the ownership by longest match (the kernel's
// owner meter, pinhole/ownermeter.go) needs them, or the enclosing owner's
// prefix covers the hole there.
type Holes interface {
	// Holes returns the hole prefixes in address order, safe to keep and
	// modify.
	Holes() []netip.Prefix
}

// InterfaceLookup is an optional extra of an Ownership (*WireGuard and
// *Static have it): ownership of a request's source as seen on the
// interface the request arrived on. WireGuard checks a packet's source
// only against the peers of the interface it arrives on, so a peer of
// another interface (a full-tunnel ::/0 one, whose AllowedIPs own
// nothing, or any peer of an interface whose peers may send from
// anywhere) can send from an address another interface's peer owns;
// Lookup, which knows no interface, would take it as that owner's. Use
// LookupOn for every decision about a request; Lookup for what the
// ownership itself covers (sweeps, revocation, the guarded prefixes).
type InterfaceLookup interface {
	// LookupOn is Lookup for a request from src that arrived on the
	// interface whose kernel name is iface: src's owner only if that
	// owner's peer holds on iface an ownable AllowedIP containing src
	// (one long enough to own, not a hole: a full-tunnel ::/0 makes no
	// source the peer's). An owner
	// bound to no interface (static) is returned whatever iface is; for
	// one bound to interfaces, an unknown iface ("") matches none.
	LookupOn(src netip.Addr, iface string) (Owner, bool)
}

// RenameFollower is an optional extra of an InterfaceLookup (*WireGuard
// has it): it learns interface names from its own reads, while the server's
// listener follows renames at once (a socket per interface index, named by
// its kernel name now). When a served interface's kernel name or index
// changes, the listener calls InterfacesRenamed with the kernel names
// concerned, before it serves them: requests arriving under them are
// nobody's until the ownership has re-read the interfaces by their new
// names. Otherwise, after two interfaces trade names, a request would be
// checked against the peers of the interface that had the name before.
type RenameFollower interface {
	InterfacesRenamed(knames []string)
}

// DeviceFollower is an optional extra of an Ownership read from devices
// that may be swapped under a name (*WireGuard has it). The server's
// listener, which follows the kernel's link events to keep its sockets
// (one per interface index), calls DevicesChanged with the kernel names
// of served interfaces whose device is not the one it served before:
// deleted (gone true), created again under the name (a new index), or
// renamed; it does so before it serves the new device, so the new
// device's first request meets the ownership told. A view read before
// the call then judges no request that opens a pinhole: the device it
// read may be gone, and its peers' AllowedIPs with it.
//
// FirstIndex closes the start-up window (review h/revsw): the listener's
// first pass reports no change of its own (it served nothing before),
// so a device swapped between the ownership's first read and that pass
// was judged, within the fresh bound of that read, by the old device's
// peers. On its first pass the listener asks FirstIndex for every served
// kernel name and calls DevicesChanged with those whose index differs
// or is unknown (ok false).
type DeviceFollower interface {
	DevicesChanged(knames []string, gone bool)
	// FirstIndex is the interface index kname had at the ownership's
	// first read (resolved before the device was read), ok false if
	// it does not know it.
	FirstIndex(kname string) (index int, ok bool)
}

// Errors returned by constructors; match with errors.Is.
var (
	ErrInvalidConfig = errors.New("invalid configuration")
	ErrOverlap       = errors.New("prefixes of different clients overlap")
	ErrShortPrefix   = errors.New("prefix too short to own")
)

// Static is ownership from configuration: named clients, each owning a list
// of prefixes. It is immutable.
type Static struct {
	t *table
}

var (
	_ Ownership       = (*Static)(nil)
	_ Holes           = (*Static)(nil)
	_ InterfaceLookup = (*Static)(nil)
)

// NewStatic validates and masks the prefixes of each named client. A prefix
// shorter than MinOwnedBits6 / MinOwnedBits4, an IPv4-mapped IPv6 prefix, or
// a prefix of one client overlapping (equal to, inside, or around) a prefix of
// another client is an error: static clients are separate administrative
// domains (RFC 6887 §18.1), and overlapping claims are a configuration
// mistake better refused than silently resolved.
func NewStatic(clients map[string][]netip.Prefix) (*Static, error) {
	names := make([]string, 0, len(clients))
	for n := range clients {
		names = append(names, n)
	}
	slices.Sort(names)
	var (
		owners []Owner
		spans  []span
	)
	for _, name := range names {
		if name == "" || strings.ContainsFunc(name, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
			return nil, fmt.Errorf("policy: static client name %q: must be non-empty without spaces or control characters: %w", name, ErrInvalidConfig)
		}
		var pfx []netip.Prefix
		for _, p := range clients[name] {
			if err := checkOwnedPrefix(p); err != nil {
				return nil, fmt.Errorf("policy: static client %q: %w", name, err)
			}
			p = p.Masked()
			if !slices.Contains(pfx, p) {
				pfx = append(pfx, p)
			}
		}
		if len(pfx) == 0 {
			return nil, fmt.Errorf("policy: static client %q owns no prefix: %w", name, ErrInvalidConfig)
		}
		slices.SortFunc(pfx, comparePrefix)
		idx := int32(len(owners))
		owners = append(owners, Owner{ID: OwnerID("static:" + name), Label: name, Prefixes: pfx})
		for _, p := range pfx {
			s := spanOf(p)
			s.owner = idx
			spans = append(spans, s)
		}
	}
	sortSpans(spans)
	// Prefixes are nested or disjoint, so in (first, shorter-first) order a
	// prefix overlaps an earlier one only if an open enclosing one is still
	// on the stack; the innermost is enough to check (an outer one of
	// another client would have failed against it already).
	var stack []span
	for _, s := range spans {
		for len(stack) > 0 && stack[len(stack)-1].last.less(s.first) {
			stack = stack[:len(stack)-1]
		}
		if n := len(stack); n > 0 && stack[n-1].owner != s.owner {
			in := owners[stack[n-1].owner]
			return nil, fmt.Errorf("policy: static client %q prefix %s overlaps client %q prefix %s: %w",
				owners[s.owner].Label, prefixOf(s.first, s.bits), in.Label, prefixOf(stack[n-1].first, stack[n-1].bits), ErrOverlap)
		}
		stack = append(stack, s)
	}
	return &Static{t: build(owners, spans)}, nil
}

// Lookup implements Ownership.
func (s *Static) Lookup(src netip.Addr) (Owner, bool) { return s.t.lookup(src) }

// LookupOn implements InterfaceLookup: static clients are bound to no
// interface (the operator vouches for the network their prefixes come
// from), so it is Lookup whatever iface is.
func (s *Static) LookupOn(src netip.Addr, iface string) (Owner, bool) {
	return s.t.lookupOn(src, iface)
}

// Owners implements Ownership.
func (s *Static) Owners() []Owner { return s.t.snapshot() }

// Holes implements Holes: none, since NewStatic refuses overlaps.
func (s *Static) Holes() []netip.Prefix { return s.t.holesCopy() }

// checkOwnedPrefix rejects prefixes that cannot be owned.
func checkOwnedPrefix(p netip.Prefix) error {
	switch {
	case !p.IsValid():
		return fmt.Errorf("invalid prefix %s: %w", p, ErrInvalidConfig)
	case p.Addr().Is4In6():
		return fmt.Errorf("prefix %s is IPv4-mapped; write it as IPv4: %w", p, ErrInvalidConfig)
	case p.Addr().Is4() && p.Bits() < MinOwnedBits4:
		return fmt.Errorf("prefix %s shorter than /%d: %w", p, MinOwnedBits4, ErrShortPrefix)
	case p.Addr().Is6() && p.Bits() < MinOwnedBits6:
		return fmt.Errorf("prefix %s shorter than /%d: %w", p, MinOwnedBits6, ErrShortPrefix)
	case p.Addr().Is6() && p.Overlaps(mappedPrefix):
		// IPv4 shares the table as ::ffff:a.b.c.d, so an IPv6 prefix around
		// ::ffff:0:0/96 (only reserved ::/8 space) would claim all of IPv4.
		return fmt.Errorf("prefix %s covers the IPv4-mapped range ::ffff:0:0/96: %w", p, ErrInvalidConfig)
	}
	return nil
}

var mappedPrefix = netip.MustParsePrefix("::ffff:0:0/96")

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

func (s *Static) current() *table { return s.t }
func (s *Static) miss()           {}
