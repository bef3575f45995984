// Package policy decides whether a requester may open an address: who owns
// which address (WireGuard cryptokey routing or static configuration), which
// addresses are never openable, and the operator's rules (protocols, ports,
// quotas, lifetimes, THIRD_PARTY, per-source rate limits).
//
// Ownership follows WireGuard's own routing: an address belongs to the owner
// whose prefix is the LONGEST match for it, exactly as WireGuard picks the
// peer an outbound packet is sent to. A request is authorised only when the
// source and the address to open resolve to the same owner, so a peer holding
// 2001:db8::/32 cannot open an address inside another peer's more specific
// 2001:db8:1::/48, which is where traffic to it would be delivered.
//
// WireGuard enforces that longest match only among the peers of the
// interface a packet arrives on. So a request's source is its owner's only
// when the request arrived on an interface where the owner's peer holds
// it (Request.Iface, InterfaceLookup.LookupOn): a peer of another
// interface, a full-tunnel one whose ::/0 owns nothing included, may send
// from any address there. Lookup, which knows no interface, serves what
// the ownership covers (sweeps, the guarded prefixes). And with several
// interfaces, a prefix of one peer that equals or lies inside a prefix of
// a different peer on a different interface is owned by nobody (a hole,
// logged as a warning): traffic to it could go to either peer.
//
// Very short prefixes never confer ownership: a full-tunnel peer whose
// AllowedIPs hold ::/0 or 0.0.0.0/0 (or any IPv6 prefix shorter than /32,
// IPv4 shorter than /8) would otherwise "own" the internet. WireGuard
// ownership ignores such prefixes and logs one warning per peer and prefix;
// static configuration rejects them.
//
// Decisions are typed Reasons; the engine maps them to PCP and NAT-PMP
// result codes in one place. This package knows nothing of the wire format:
// protocols are plain IANA numbers.
package policy
