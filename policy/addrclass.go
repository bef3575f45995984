package policy

import "net/netip"

// neverOpenable reports the classes no policy may open (DESIGN.md "Who owns
// what", TP-03): invalid or zoned, unspecified, IPv4 "this network" and
// limited broadcast, loopback, multicast, link-local, and IPv4-mapped IPv6.
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
		if b[0] == 0 || b == [4]byte{255, 255, 255, 255} {
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

func isDocumentation(a netip.Addr) bool {
	for _, p := range documentation {
		if p.Contains(a) {
			return true
		}
	}
	return false
}
