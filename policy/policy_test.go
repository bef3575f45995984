package policy

import (
	"errors"
	"net/netip"
	"testing"
	"time"
)

var (
	addr = netip.MustParseAddr
	pfx  = netip.MustParsePrefix
)

// Two clients used by the authorization tables. The host's own tunnel
// address 2001:db8:a::1 lies inside A's prefix on purpose.
func testClients() map[string][]netip.Prefix {
	return map[string][]netip.Prefix{
		"a": {pfx("2001:db8:a::/48"), pfx("10.0.1.0/24"), pfx("fd00:a::/64")},
		"b": {pfx("2001:db8:b::/48"), pfx("10.0.2.7/32")},
	}
}

func hostAddrs(a netip.Addr) bool { return a == addr("2001:db8:a::1") || a == addr("10.0.1.1") }

// opaque hides the fast path so Authorize's generic Ownership path is
// exercised with the same table.
type opaque struct{ Ownership }

// namedOwnership is one of Authorize's paths over an ownership.
type namedOwnership struct {
	name string
	o    Ownership
}

// bothPaths is st behind Authorize's fast path (this package's table)
// and behind its generic one (opaque).
func bothPaths(st *Static) []namedOwnership {
	return []namedOwnership{{"fast", st}, {"generic", opaque{st}}}
}

// TestAuthorizeAddressClasses covers every address class × owner relation
// (SEC-02, TP-03, PROTOCOL.md choices (a), (b)).
func TestAuthorizeAddressClasses(t *testing.T) {
	st, err := NewStatic(testClients())
	if err != nil {
		t.Fatal(err)
	}
	const a, b = OwnerID("static:a"), OwnerID("static:b")
	tcp := func(src, dst string, tp bool) Request {
		return Request{Source: addr(src), Target: addr(dst), ThirdParty: tp, Protocol: 6, InternalPort: 443}
	}
	cases := []struct {
		name   string
		req    Request
		owner  OwnerID
		reason Reason
	}{
		{"own address v6", tcp("2001:db8:a::10", "2001:db8:a::10", false), a, Allowed},
		{"own address v4", tcp("10.0.1.5", "10.0.1.5", false), a, Allowed},
		{"own address ULA", tcp("fd00:a::5", "fd00:a::5", false), a, Allowed},
		{"own address, documentation range allowed by default", tcp("2001:db8:b::1", "2001:db8:b::1", false), b, Allowed},
		{"own /32 v4", tcp("10.0.2.7", "10.0.2.7", false), b, Allowed},
		{"source IPv4-mapped is unmapped (ADDR-02)", tcp("::ffff:10.0.1.5", "10.0.1.5", false), a, Allowed},
		{"TP-04 own prefix, other address", tcp("2001:db8:a::10", "2001:db8:a:ffff::99", true), a, Allowed},
		{"TP-04 own other prefix, other family", tcp("2001:db8:a::10", "10.0.1.200", true), a, Allowed},
		{"TP-03 another client's address", tcp("2001:db8:a::10", "2001:db8:b::10", true), a, NotOwned},
		{"TP-03 another client's /32", tcp("10.0.1.5", "10.0.2.7", true), a, NotOwned},
		{"TP-03 just outside own /24", tcp("10.0.1.5", "10.0.2.0", true), a, NotOwned},
		{"TP-03 nobody's address", tcp("2001:db8:a::10", "2001:db8:c::10", true), a, NotOwned},
		{"TP-03 internet address", tcp("2001:db8:a::10", "2606:4700::1111", true), a, NotOwned},
		{"no owner: unknown source", tcp("2001:db8:c::10", "2001:db8:c::10", false), "", NoOwner},
		{"no owner: source owned by nobody, target owned by a", tcp("2001:db8:c::10", "2001:db8:a::10", true), "", NoOwner},
		{"no owner: invalid source", Request{Target: addr("2001:db8:a::10"), Protocol: 6, InternalPort: 1}, "", NoOwner},
		{"no owner: zoned source", tcp("fe80::1%wg0", "2001:db8:a::10", true), "", NoOwner},
		{"never: unspecified v6", tcp("2001:db8:a::10", "::", true), a, NeverOpenable},
		{"never: unspecified v4", tcp("10.0.1.5", "0.0.0.0", true), a, NeverOpenable},
		{"never: this-network v4", tcp("10.0.1.5", "0.1.2.3", true), a, NeverOpenable},
		{"never: broadcast v4", tcp("10.0.1.5", "255.255.255.255", true), a, NeverOpenable},
		{"never: loopback v6", tcp("2001:db8:a::10", "::1", true), a, NeverOpenable},
		{"never: loopback v4", tcp("10.0.1.5", "127.0.0.1", true), a, NeverOpenable},
		{"never: multicast v6 link", tcp("2001:db8:a::10", "ff02::1", true), a, NeverOpenable},
		{"never: multicast v6 site", tcp("2001:db8:a::10", "ff05::1:3", true), a, NeverOpenable},
		{"never: multicast v6 interface", tcp("2001:db8:a::10", "ff01::1", true), a, NeverOpenable},
		{"never: multicast v4", tcp("10.0.1.5", "224.0.0.1", true), a, NeverOpenable},
		{"never: link-local v6", tcp("2001:db8:a::10", "fe80::1", true), a, NeverOpenable},
		{"never: link-local v6 as own source", tcp("fe80::1", "fe80::1", false), "", NoOwner},
		{"never: link-local v4", tcp("10.0.1.5", "169.254.1.1", true), a, NeverOpenable},
		{"never: zoned target", tcp("2001:db8:a::10", "fe80::1%wg0", true), a, NeverOpenable},
		{"never: IPv4-mapped target of own address", tcp("10.0.1.5", "::ffff:10.0.1.5", false), a, NeverOpenable},
		{"never: invalid target", Request{Source: addr("10.0.1.5"), Protocol: 6, InternalPort: 1}, a, NeverOpenable},
		{"never: host's own address inside owned prefix", tcp("2001:db8:a::10", "2001:db8:a::1", true), a, NeverOpenable},
		{"never: host's own address as source", tcp("2001:db8:a::1", "2001:db8:a::1", false), a, NeverOpenable},
		{"never: host's own IPv4", tcp("10.0.1.5", "10.0.1.1", true), a, NeverOpenable},
		{"never beats not-owned", tcp("2001:db8:a::10", "ff0e::1", true), a, NeverOpenable},
		// The host's own address inside an owner's prefix is nobody's as a
		// THIRD_PARTY requester: only the host sends from it, over
		// loopback, and any local user may (h/hunt3).
		{"host's own address as THIRD_PARTY requester", tcp("2001:db8:a::1", "2001:db8:a::10", true), "", NoOwner},
		{"host's own address, THIRD_PARTY delete", Request{Source: addr("2001:db8:a::1"), Target: addr("2001:db8:a::10"), ThirdParty: true, Delete: true, Protocol: 6, InternalPort: 443}, "", NoOwner},
		{"host's own IPv4 as THIRD_PARTY requester", tcp("10.0.1.1", "10.0.1.5", true), "", NoOwner},
	}
	cfg := Config{HostAddrs: hostAddrs}
	for _, own := range bothPaths(st) {
		p, err := New(cfg, own.o)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range cases {
			t.Run(own.name+"/"+c.name, func(t *testing.T) {
				o, r := p.Authorize(c.req)
				if r != c.reason || o.ID != c.owner {
					t.Errorf("Authorize(%+v) = %q, %v; want %q, %v", c.req, o.ID, r, c.owner, c.reason)
				}
			})
		}
	}
}

func TestAuthorizeDocumentationRanges(t *testing.T) {
	st, err := NewStatic(map[string][]netip.Prefix{
		"doc":  {pfx("2001:db8:1::/48"), pfx("192.0.2.0/24"), pfx("198.18.0.0/16"), pfx("3fff:1::/32"), pfx("2001:2::/48")},
		"real": {pfx("2a01:4f8::/32"), pfx("100.64.0.0/24")},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, deny := range []bool{false, true} {
		p, err := New(Config{DenyDocumentation: deny}, st)
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range []string{"2001:db8:1::5", "192.0.2.9", "198.18.3.4", "3fff:1::1", "2001:2::9"} {
			want := Allowed
			if deny {
				want = NeverOpenable
			}
			if _, r := p.Authorize(Request{Source: addr(a), Target: addr(a), Protocol: 17, InternalPort: 53}); r != want {
				t.Errorf("deny=%v %s: %v, want %v", deny, a, r, want)
			}
		}
		for _, a := range []string{"2a01:4f8::1", "100.64.0.1"} {
			if _, r := p.Authorize(Request{Source: addr(a), Target: addr(a), Protocol: 17, InternalPort: 53}); r != Allowed {
				t.Errorf("deny=%v %s: %v, want allowed", deny, a, r)
			}
		}
	}
}

// TestAuthorizeRules covers THIRD_PARTY mode, protocols and ports
// (TP-02, MAP-04, MAP-05, OPT-08) and the order the checks run in (MAP-01).
func TestAuthorizeRules(t *testing.T) {
	st, err := NewStatic(testClients())
	if err != nil {
		t.Fatal(err)
	}
	own := addr("2001:db8:a::10")
	req := func(proto uint8, in, ext uint16, tp bool) Request {
		return Request{Source: own, Target: own, ThirdParty: tp, Protocol: proto, InternalPort: in, ExternalPort: ext}
	}
	cases := []struct {
		name string
		cfg  Config
		req  Request
		want Reason
	}{
		{"TCP allowed by default", Config{}, req(6, 80, 0, false), Allowed},
		{"UDP allowed by default", Config{}, req(17, 5000, 0, false), Allowed},
		{"MAP-04 SCTP refused by default", Config{}, req(132, 80, 0, false), ProtocolDenied},
		{"MAP-04 SCTP allowed when listed", Config{AllowedProtocols: []uint8{6, 132}}, req(132, 80, 0, false), Allowed},
		{"MAP-04 UDP refused when not listed", Config{AllowedProtocols: []uint8{6}}, req(17, 80, 0, false), ProtocolDenied},
		{"MAP-05 all protocols refused by default", Config{AllowAllPorts: true}, req(0, 0, 0, false), AllProtocolsDenied},
		{"MAP-05 all ports refused by default", Config{}, req(6, 0, 0, false), AllPortsDenied},
		{"MAP-05 all ports allowed", Config{AllowAllPorts: true}, req(6, 0, 0, false), Allowed},
		{"MAP-05 all ports not whole: deny-ports", Config{AllowAllPorts: true, DenyPorts: []PortRange{{22, 22}}}, req(6, 0, 0, false), AllPortsDenied},
		{"MAP-05 all ports not whole: allow-ports", Config{AllowAllPorts: true, AllowPorts: []PortRange{{1, 65534}}}, req(6, 0, 0, false), AllPortsDenied},
		{"MAP-05 all ports whole: allow-ports 1-65535", Config{AllowAllPorts: true, AllowPorts: []PortRange{{1, 65535}}}, req(6, 0, 0, false), Allowed},
		{"MAP-05 all traffic needs both switches", Config{AllowAllProtocols: true}, req(0, 0, 0, false), AllPortsDenied},
		{"MAP-05 all traffic allowed", Config{AllowAllProtocols: true, AllowAllPorts: true}, req(0, 0, 0, false), Allowed},
		{"denied port", Config{DenyPorts: []PortRange{{25, 25}}}, req(6, 25, 0, false), PortDenied},
		{"port next to denied one", Config{DenyPorts: []PortRange{{25, 25}}}, req(6, 26, 0, false), Allowed},
		{"port outside allowed ranges", Config{AllowPorts: []PortRange{{1024, 65535}}}, req(6, 80, 0, false), PortDenied},
		{"port inside allowed range", Config{AllowPorts: []PortRange{{1024, 65535}}}, req(6, 1024, 0, false), Allowed},
		{"deny inside allow", Config{AllowPorts: []PortRange{{1024, 65535}}, DenyPorts: []PortRange{{8000, 8999}}}, req(17, 8080, 0, false), PortDenied},
		{"top port", Config{}, req(6, 65535, 0, false), Allowed},
		{"chosen external port denied", Config{DenyPorts: []PortRange{{80, 80}}}, req(6, 443, 80, false), PortDenied},
		{"chosen external port allowed", Config{DenyPorts: []PortRange{{80, 80}}}, req(6, 443, 8443, false), Allowed},
		{"TP-02 third party off", Config{ThirdParty: ThirdPartyOff}, req(6, 80, 0, true), ThirdPartyDenied},
		{"TP-02 third party off does not affect plain requests", Config{ThirdParty: ThirdPartyOff}, req(6, 80, 0, false), Allowed},
		{"TP default mode: own address", Config{}, req(6, 80, 0, true), Allowed},
		{"MAP-01 TP switch before ownership", Config{ThirdParty: ThirdPartyOff},
			Request{Source: addr("2001:db8:c::1"), Target: addr("ff02::1"), ThirdParty: true, Protocol: 132}, ThirdPartyDenied},
		{"MAP-01 ownership before protocol", Config{},
			Request{Source: own, Target: addr("2001:db8:b::1"), ThirdParty: true, Protocol: 132}, NotOwned},
		{"MAP-01 protocol before port", Config{}, req(132, 0, 0, false), ProtocolDenied},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, err := New(c.cfg, st)
			if err != nil {
				t.Fatal(err)
			}
			if _, r := p.Authorize(c.req); r != c.want {
				t.Errorf("Authorize(%+v) = %v, want %v", c.req, r, c.want)
			}
		})
	}
}

func TestPortAllowedMAP09(t *testing.T) {
	p, err := New(Config{AllowPorts: []PortRange{{1000, 2000}, {3000, 3000}}, DenyPorts: []PortRange{{1500, 1600}}}, mustStatic(t))
	if err != nil {
		t.Fatal(err)
	}
	for port, want := range map[uint16]bool{0: false, 999: false, 1000: true, 1499: true, 1500: false, 1600: false, 1601: true, 2000: true, 2001: false, 3000: true, 65535: false} {
		if got := p.PortAllowed(port); got != want {
			t.Errorf("PortAllowed(%d) = %v, want %v", port, got, want)
		}
	}
}

func mustStatic(t *testing.T) *Static {
	t.Helper()
	st, err := NewStatic(testClients())
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// TestCheckQuotaMAP15: per-client limit → USER_EX_QUOTA, global → NO_RESOURCES.
func TestCheckQuotaMAP15(t *testing.T) {
	p, err := New(Config{MaxLeasesPerClient: 2, MaxLeases: 5}, mustStatic(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		client, total int
		want          Reason
	}{
		{0, 0, Allowed},
		{1, 4, Allowed},
		{2, 2, ClientQuota},
		{1, 5, GlobalQuota},
		{2, 5, ClientQuota}, // both: the more specific one (HDR-07)
	} {
		if got := p.CheckQuota(c.client, c.total); got != c.want {
			t.Errorf("CheckQuota(%d, %d) = %v, want %v", c.client, c.total, got, c.want)
		}
	}
	d, err := New(Config{}, mustStatic(t))
	if err != nil {
		t.Fatal(err)
	}
	if d.CheckQuota(DefaultMaxLeasesPerClient-1, 0) != Allowed || d.CheckQuota(DefaultMaxLeasesPerClient, 0) != ClientQuota ||
		d.CheckQuota(0, DefaultMaxLeases) != GlobalQuota {
		t.Error("default quotas not applied")
	}
}

// TestClampLifetimeLIFE01: grant = clamp(requested, 120 s, max), 0 deletes.
func TestClampLifetimeLIFE01(t *testing.T) {
	def, err := New(Config{}, mustStatic(t))
	if err != nil {
		t.Fatal(err)
	}
	custom, err := New(Config{MinLifetime: 2 * time.Second, MaxLifetime: time.Hour}, mustStatic(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		p       *Policy
		in, out time.Duration
	}{
		{def, 0, 0},
		{def, -time.Second, 0},
		{def, time.Second, 120 * time.Second},
		{def, 120 * time.Second, 120 * time.Second},
		{def, 3600 * time.Second, 3600 * time.Second},
		{def, time.Duration(1<<32-1) * time.Second, 24 * time.Hour},
		{custom, time.Second, 2 * time.Second},
		{custom, 3 * time.Second, 3 * time.Second},
		{custom, 2 * time.Hour, time.Hour},
	} {
		if got := c.p.ClampLifetime(c.in); got != c.out {
			t.Errorf("ClampLifetime(%v) [min %v max %v] = %v, want %v", c.in, c.p.MinLifetime(), c.p.MaxLifetime(), got, c.out)
		}
	}
}

func TestNewConfigErrors(t *testing.T) {
	st := mustStatic(t)
	for name, cfg := range map[string]Config{
		"min > max":             {MinLifetime: time.Hour, MaxLifetime: time.Minute},
		"negative min":          {MinLifetime: -1},
		"max beyond 32 bits":    {MaxLifetime: time.Duration(1<<32) * time.Second},
		"max beyond a year":     {MaxLifetime: LongestMaxLifetime + time.Second},
		"negative client quota": {MaxLeasesPerClient: -1},
		"negative global quota": {MaxLeases: -1},
		"protocol 0 listed":     {AllowedProtocols: []uint8{0, 6}},
		"reversed port range":   {AllowPorts: []PortRange{{10, 5}}},
		"port 0 range":          {DenyPorts: []PortRange{{0, 5}}},
		"unknown TP mode":       {ThirdParty: 7},
	} {
		if _, err := New(cfg, st); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%s: err = %v, want ErrInvalidConfig", name, err)
		}
	}
	if _, err := New(Config{}, nil); !errors.Is(err, ErrInvalidConfig) {
		t.Errorf("nil ownership: err = %v", err)
	}
}

func TestStaticConfig(t *testing.T) {
	for _, c := range []struct {
		name    string
		clients map[string][]netip.Prefix
		want    error
	}{
		{"ok", testClients(), nil},
		{"same client may repeat and nest", map[string][]netip.Prefix{"a": {pfx("2001:db8::/48"), pfx("2001:db8::/64"), pfx("2001:db8::/48")}}, nil},
		{"unmasked prefix is masked", map[string][]netip.Prefix{"a": {pfx("2001:db8::1/64")}}, nil},
		{"default route v6", map[string][]netip.Prefix{"a": {pfx("::/0")}}, ErrShortPrefix},
		{"default route v4", map[string][]netip.Prefix{"a": {pfx("0.0.0.0/0")}}, ErrShortPrefix},
		{"all GUA", map[string][]netip.Prefix{"a": {pfx("2000::/3")}}, ErrShortPrefix},
		{"v6 /31", map[string][]netip.Prefix{"a": {pfx("2001:db8::/31")}}, ErrShortPrefix},
		{"v4 /7", map[string][]netip.Prefix{"a": {pfx("10.0.0.0/7")}}, ErrShortPrefix},
		{"v6 /32 is the shortest accepted", map[string][]netip.Prefix{"a": {pfx("2001:db8::/32")}}, nil},
		{"v4 /8 is the shortest accepted", map[string][]netip.Prefix{"a": {pfx("10.0.0.0/8")}}, nil},
		{"mapped prefix", map[string][]netip.Prefix{"a": {pfx("::ffff:10.0.0.0/104")}}, ErrInvalidConfig},
		{"around the mapped range", map[string][]netip.Prefix{"a": {pfx("::/64")}}, ErrInvalidConfig},
		{"invalid prefix", map[string][]netip.Prefix{"a": {{}}}, ErrInvalidConfig},
		{"no prefixes", map[string][]netip.Prefix{"a": nil}, ErrInvalidConfig},
		{"empty name", map[string][]netip.Prefix{"": {pfx("10.0.0.0/24")}}, ErrInvalidConfig},
		{"name with space", map[string][]netip.Prefix{"a b": {pfx("10.0.0.0/24")}}, ErrInvalidConfig},
		{"equal prefixes", map[string][]netip.Prefix{"a": {pfx("10.0.0.0/24")}, "b": {pfx("10.0.0.0/24")}}, ErrOverlap},
		{"nested prefixes", map[string][]netip.Prefix{"a": {pfx("2001:db8::/48")}, "b": {pfx("2001:db8:0:5::/64")}}, ErrOverlap},
		{"nested behind own nest", map[string][]netip.Prefix{"a": {pfx("10.0.0.0/8"), pfx("10.1.0.0/16")}, "b": {pfx("10.1.2.0/24"), pfx("11.0.0.0/8")}}, ErrOverlap},
		{"adjacent is fine", map[string][]netip.Prefix{"a": {pfx("10.0.0.0/25")}, "b": {pfx("10.0.0.128/25")}}, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := NewStatic(c.clients)
			if (c.want == nil) != (err == nil) || (c.want != nil && !errors.Is(err, c.want)) {
				t.Errorf("NewStatic = %v, want %v", err, c.want)
			}
		})
	}
	st := mustStatic(t)
	o, ok := st.Lookup(addr("10.0.1.9"))
	if !ok || o.ID != "static:a" || o.Label != "a" || len(o.Prefixes) != 3 {
		t.Errorf("Lookup = %+v, %v", o, ok)
	}
	owners := st.Owners()
	owners[0].Prefixes[0] = netip.Prefix{} // a snapshot: changing it changes nothing
	if o, _ := st.Lookup(addr("10.0.1.9")); !o.Prefixes[0].IsValid() {
		t.Error("Owners returned shared prefixes")
	}
}

func TestReasonString(t *testing.T) {
	for r := Reason(0); r < numReasons; r++ {
		if s := r.String(); s == "" || s[0] == 'R' {
			t.Errorf("Reason %d has no name", r)
		}
	}
	if Reason(200).String() != "Reason(200)" {
		t.Error(Reason(200).String())
	}
}

// TestRulesWithoutOwnership: Rules is Authorize's verdict once ownership
// is settled, whoever owns the source and whatever the interface
// (restored leases, which have none).
func TestRulesWithoutOwnership(t *testing.T) {
	st, err := NewStatic(map[string][]netip.Prefix{"a": {netip.MustParsePrefix("2001:db8:a::/48")}})
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(Config{DenyPorts: []PortRange{{22, 22}}, ThirdParty: ThirdPartyOff,
		HostAddrs: func(a netip.Addr) bool { return a == addr("2001:db8:a::1") }}, st)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		req  Request
		want Reason
	}{
		{Request{Source: addr("2001:db8:a::5"), Target: addr("2001:db8:a::5"), Protocol: 6, InternalPort: 443}, Allowed},
		{Request{Source: addr("2001:db8:ff::5"), Target: addr("2001:db8:ff::5"), Protocol: 6, InternalPort: 443}, Allowed}, // owned by nobody: not Rules' concern
		{Request{Source: addr("2001:db8:ff::5"), Target: addr("2001:db8:ff::5"), Protocol: 6, InternalPort: 22}, PortDenied},
		{Request{Source: addr("2001:db8:a::5"), Iface: "wg9", Target: addr("2001:db8:a::5"), Protocol: 6, InternalPort: 22}, PortDenied},
		{Request{Source: addr("2001:db8:a::5"), Target: addr("2001:db8:a::5"), Protocol: 132, InternalPort: 443}, ProtocolDenied},
		{Request{Source: addr("2001:db8:a::5"), Target: addr("2001:db8:a::5"), Protocol: 6}, AllPortsDenied},
		{Request{Source: addr("2001:db8:a::1"), Target: addr("2001:db8:a::1"), Protocol: 6, InternalPort: 443}, NeverOpenable},
		{Request{Source: addr("2001:db8:a::5"), Target: addr("2001:db8:a::6"), ThirdParty: true, Protocol: 6, InternalPort: 443}, ThirdPartyDenied},
	} {
		if got := p.Rules(tc.req); got != tc.want {
			t.Errorf("Rules(%+v) = %v, want %v", tc.req, got, tc.want)
		}
		if _, got := p.Authorize(tc.req); tc.req.Iface == "" && got != NoOwner && got != tc.want {
			t.Errorf("Authorize(%+v) = %v, Rules %v", tc.req, got, tc.want)
		}
	}
}
