package policy

import (
	"errors"
	"net"
	"net/netip"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
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

// TestAuthorizeRefusedUntilHostRead: while the first read of the host's
// addresses fails, the host-address set is empty, so Authorize refuses
// every request it would otherwise allow with HostUnread (NO_RESOURCES in
// the engine), the host's own address and its subnet's broadcast among
// them, and leaves other refusals as they are; Rules (restored leases)
// does not. The failure is logged once. Once a read succeeds, the
// host's addresses are refused as never openable and the rest allowed;
// a later failed read keeps that last good set. Without the check
// (readHost returning its reason) the first step grants the MAP to the
// host's 10.0.1.1 and to 10.0.1.255: before, a failed first read failed
// open until a later read succeeded. Those two are THIRD_PARTY targets:
// refused earlier, HostSourceUnread (the requester may be the host
// itself; NO_RESOURCES too, and deletes as well:
// server TestThirdPartyDeleteFromHostUntilHostRead).
func TestAuthorizeRefusedUntilHostRead(t *testing.T) {
	st, err := NewStatic(testClients())
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zap.InfoLevel)
	fail := true
	h := &HostSet{Log: zap.New(core), Addrs: func() ([]net.Addr, error) {
		if fail {
			return nil, errors.New("netlink: injected failure")
		}
		return []net.Addr{&net.IPNet{IP: net.ParseIP("10.0.1.1").To4(), Mask: net.CIDRMask(24, 32)},
			&net.IPNet{IP: net.ParseIP("2001:db8:a::1"), Mask: net.CIDRMask(64, 128)}}, nil
	}}
	for _, own := range []struct {
		name string
		o    Ownership
	}{{"fast", st}, {"generic", opaque{st}}} {
		p, err := New(Config{HostAddrs: h.Contains, HostAddrsRead: h.Read, DenyPorts: []PortRange{{22, 22}}}, own.o)
		if err != nil {
			t.Fatal(err)
		}
		req := func(dst string, port uint16) Request {
			return Request{Source: addr("10.0.1.5"), Target: addr(dst), ThirdParty: dst != "10.0.1.5", Protocol: 6, InternalPort: port}
		}
		for _, step := range []struct {
			name                 string
			fail                 bool
			own, host, bcast, pd Reason
		}{
			{"first read fails", true, HostUnread, HostSourceUnread, HostSourceUnread, PortDenied},
			{"first read fails again", true, HostUnread, HostSourceUnread, HostSourceUnread, PortDenied},
			{"a read succeeds", false, Allowed, NeverOpenable, NeverOpenable, PortDenied},
			{"a later read fails", true, Allowed, NeverOpenable, NeverOpenable, PortDenied},
		} {
			t.Run(own.name+"/"+step.name, func(t *testing.T) {
				fail = step.fail
				if err := h.Refresh(); (err != nil) != step.fail {
					t.Fatalf("Refresh = %v", err)
				}
				for _, c := range []struct {
					what string
					r    Request
					want Reason
				}{
					{"own address", req("10.0.1.5", 443), step.own},
					{"the host's address", req("10.0.1.1", 443), step.host},
					{"the host's subnet broadcast", req("10.0.1.255", 443), step.bcast},
					{"a denied port", req("10.0.1.5", 22), step.pd},
				} {
					if _, r := p.Authorize(c.r); r != c.want {
						t.Errorf("Authorize(%s) = %v, want %v", c.what, r, c.want)
					}
				}
				if r := p.Rules(req("10.0.1.5", 443)); r != Allowed {
					t.Errorf("Rules(own address) = %v, want allowed (restored leases are kept)", r)
				}
			})
		}
		// The next ownership starts unread again.
		h.set.Store(nil)
		h.warned = false
	}
	if n := logs.FilterMessageSnippet("cannot read the host's addresses").Len(); n != 2 {
		t.Errorf("%d warnings for failed first reads, want 1 per HostSet life (2)", n)
	}
	if n := logs.FilterMessageSnippet("requests are served again").Len(); n != 2 {
		t.Errorf("%d notices of the first good read, want 2", n)
	}
}

// TestHostSetGen: Gen is 0 until a read succeeds and changes exactly when
// a read changes the set (the server's sweep re-checks every lease then,
// and only then).
func TestHostSetGen(t *testing.T) {
	a := &net.IPNet{IP: net.ParseIP("10.0.0.1"), Mask: net.CIDRMask(24, 32)}
	b := &net.IPNet{IP: net.ParseIP("2001:db8::1"), Mask: net.CIDRMask(64, 128)}
	var next []net.Addr
	var fail bool
	h := &HostSet{Addrs: func() ([]net.Addr, error) {
		if fail {
			return nil, errors.New("injected")
		}
		return next, nil
	}}
	for i, step := range []struct {
		addrs []net.Addr
		fail  bool
		gen   uint64
	}{
		{nil, true, 0},            // first read failed
		{[]net.Addr{a}, false, 1}, // first good read
		{[]net.Addr{a}, false, 1}, // the same
		{nil, true, 1},            // failed: last good kept
		{[]net.Addr{a, b}, false, 2},
		{[]net.Addr{b, a}, false, 2}, // same set, other order
		{[]net.Addr{}, false, 3},     // all gone
	} {
		next, fail = step.addrs, step.fail
		h.Refresh()
		if got := h.Gen(); got != step.gen {
			t.Fatalf("step %d: Gen %d, want %d", i, got, step.gen)
		}
	}
}
