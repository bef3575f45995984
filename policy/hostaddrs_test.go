package policy

import (
	"net/netip"
	"testing"
)

// TestHostReached: the host is reached at its addresses, at the broadcast
// and network addresses of its IPv4 subnets (not of a /31 or /32) and at
// the subnet-router anycast address of its IPv6 prefixes (not of a /127 or
// /128); never at another address of those prefixes.
func TestHostReached(t *testing.T) {
	cases := []struct {
		name    string
		prefix  string
		host    []string
		notHost []string
	}{
		{"v4 /24", "10.100.0.1/24", []string{"10.100.0.1", "10.100.0.255", "10.100.0.0"}, []string{"10.100.0.2", "10.100.0.254", "10.100.1.0", "10.99.255.255"}},
		{"v4 /30", "192.0.2.5/30", []string{"192.0.2.5", "192.0.2.4", "192.0.2.7"}, []string{"192.0.2.6", "192.0.2.3", "192.0.2.8"}},
		{"v4 /16", "172.16.3.4/16", []string{"172.16.0.0", "172.16.255.255"}, []string{"172.16.3.255", "172.16.3.0"}},
		{"v4 /8", "10.1.2.3/8", []string{"10.0.0.0", "10.255.255.255"}, []string{"10.1.2.255"}},
		{"v4 /31: both are hosts", "192.0.2.1/31", []string{"192.0.2.1"}, []string{"192.0.2.0"}},
		{"v4 /32", "198.51.100.1/32", []string{"198.51.100.1"}, []string{"198.51.100.0", "198.51.100.255"}},
		{"v6 /64", "2001:db8:1::1/64", []string{"2001:db8:1::1", "2001:db8:1::"}, []string{"2001:db8:1::2", "2001:db8:1:0:ffff:ffff:ffff:ffff"}},
		{"v6 /48, address in a /64 of it", "2001:db8:2:5::7/48", []string{"2001:db8:2::"}, []string{"2001:db8:2:5::"}},
		{"v6 /127: no anycast", "2001:db8:3::1/127", []string{"2001:db8:3::1"}, []string{"2001:db8:3::"}},
		{"v6 /128", "2001:db8:4::9/128", []string{"2001:db8:4::9"}, []string{"2001:db8:4::"}},
		{"v6 link-local", "fe80::1/64", []string{"fe80::1", "fe80::"}, []string{"fe80::2"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m := hostReached([]netip.Prefix{netip.MustParsePrefix(c.prefix)})
			var h HostSet
			h.set.Store(&m)
			for _, a := range c.host {
				if !h.Contains(netip.MustParseAddr(a)) {
					t.Errorf("%s: %s does not reach the host", c.prefix, a)
				}
			}
			for _, a := range c.notHost {
				if h.Contains(netip.MustParseAddr(a)) {
					t.Errorf("%s: %s counted as the host's", c.prefix, a)
				}
			}
		})
	}
	// The IPv4-mapped form of a host address is the host too.
	m := hostReached([]netip.Prefix{netip.MustParsePrefix("10.100.0.1/24")})
	var h HostSet
	h.set.Store(&m)
	for _, a := range []string{"::ffff:10.100.0.255", "::ffff:10.100.0.1"} {
		if !h.Contains(netip.MustParseAddr(a)) {
			t.Errorf("mapped %s does not reach the host", a)
		}
	}
	if (&HostSet{}).Contains(netip.MustParseAddr("10.100.0.1")) {
		t.Error("the zero HostSet holds an address")
	}
}
