package policy

import "net/netip"

// neverOpenable reports the classes no policy may open (DESIGN.md "Who owns
// what", TP-03): invalid or zoned, unspecified, IPv4 "this network" and
// limited broadcast, loopback, multicast, link-local, IPv4-mapped IPv6,
// and the IPv6 forms that stand for an IPv4 host (translation).
// A mapped address reaching the policy means an IPv4 address was carried
// where an IPv6 address (a global unicast one) is required: the codec
// unmaps wire addresses, so a mapped Target is never a real IPv6 host.
func neverOpenable(a netip.Addr) bool {
	if !a.IsValid() || a.Zone() != "" || a.Is4In6() {
		return true
	}
	if a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() ||
		a.IsLinkLocalUnicast() || a.IsLinkLocalMulticast() || a.IsInterfaceLocalMulticast() {
		return true
	}
	if a.Is4() {
		b := a.As4()
		// 0.0.0.0/8 "this network" (RFC 1122 3.2.1.3, source only) and the
		// limited broadcast address.
		return b[0] == 0 || b == [4]byte{255, 255, 255, 255}
	}
	return isTranslated(a)
}

// isTranslated reports whether a lies in one of the fixed translation
// prefixes. Every one lies in 0000::/8; global unicast (2000::/3) and
// ULAs (fc00::/7), the common addresses, skip the search on their first
// octet.
func isTranslated(a netip.Addr) bool {
	return a.As16()[0] == 0 && inPrefixes(a, translation)
}

// translation holds the IPv6 prefixes whose addresses embed an IPv4
// address and reach the IPv4 host it names, not an IPv6 host: a NAT64
// (RFC 6146) or SIIT translator, or Linux's sit0 device for the IPv4-
// compatible form, carries a packet to 64:ff9b::c000:201 to 192.0.2.1.
// A pinhole there would open, through the translator, an IPv4 host that
// is someone else's, whoever owns the IPv6 prefix (an operator giving a
// client 64:ff9b::/96, or a WireGuard peer that is the NAT64 gateway and
// holds it in its AllowedIPs). Always never openable; an operator's
// network-specific prefixes (RFC 6052 §2.2) are added by
// Config.TranslationPrefixes (--nat64-prefix).
var translation = []netip.Prefix{
	netip.MustParsePrefix("64:ff9b::/96"),   // RFC 6052 §2.1, the NAT64 well-known prefix
	netip.MustParsePrefix("64:ff9b:1::/48"), // RFC 8215, local-use IPv4/IPv6 translation
	netip.MustParsePrefix("::/96"),          // IPv4-compatible, deprecated (RFC 4291 §2.5.5.1); Linux's sit0 tunnels it to the IPv4 address
}

// OverlapsTranslation returns the first translation prefix (the fixed
// ones, then extra) that p overlaps: an owner holding p cannot open the
// addresses they share (NeverOpenable), which its operator should hear
// of once (a static client at start, a WireGuard peer when read).
func OverlapsTranslation(p netip.Prefix, extra []netip.Prefix) (netip.Prefix, bool) {
	for _, list := range [][]netip.Prefix{translation, extra} {
		for _, t := range list {
			if p.Overlaps(t) {
				return t, true
			}
		}
	}
	return netip.Prefix{}, false
}

func inPrefixes(a netip.Addr, ps []netip.Prefix) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// documentation holds the documentation (RFC 5737, 3849, 9637) and
// benchmarking (RFC 2544, 5180) ranges, never openable when
// Config.DenyDocumentation is set.
var documentation = []netip.Prefix{
	netip.MustParsePrefix("192.0.2.0/24"),
	netip.MustParsePrefix("198.51.100.0/24"),
	netip.MustParsePrefix("203.0.113.0/24"),
	netip.MustParsePrefix("198.18.0.0/15"),
	netip.MustParsePrefix("2001:db8::/32"),
	netip.MustParsePrefix("3fff::/20"),
	netip.MustParsePrefix("2001:2::/48"),
}

func isDocumentation(a netip.Addr) bool { return inPrefixes(a, documentation) }
