package pinhole

import (
	"errors"
	"net/netip"
	"testing"
	"unique"

	"github.com/google/go-cmp/cmp"
	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
)

var (
	cmpAddr   = cmp.Comparer(func(a, b netip.Addr) bool { return a == b })
	cmpPrefix = cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })
	// cmpOdd compares Pinhole.odd (a unique.Handle: equal handles, equal
	// elements).
	cmpOdd = cmp.Options{cmp.AllowUnexported(Pinhole{}), cmp.Comparer(func(a, b unique.Handle[oddElement]) bool { return a == b })}
	pfx    = netip.MustParsePrefix
	addr   = netip.MustParseAddr
)

// TestNormalize: what a Pinhole may be, and its canonical form.
func TestNormalize(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   Pinhole
		want Pinhole // zero: invalid
		kind kind
	}{
		{"plain IPv6", Pinhole{Protocol: 6, InternalAddr: tAddr, InternalPort: 22},
			Pinhole{Protocol: 6, InternalAddr: tAddr, InternalPort: 22, ExternalAddr: tAddr, ExternalPort: 22}, kindPort},
		{"all ports", Pinhole{Protocol: 17, InternalAddr: tAddr},
			Pinhole{Protocol: 17, InternalAddr: tAddr, ExternalAddr: tAddr}, kindProto},
		{"all protocols", Pinhole{InternalAddr: tAddr},
			Pinhole{InternalAddr: tAddr, ExternalAddr: tAddr}, kindAddr},
		{"portless protocol, all ports", Pinhole{Protocol: 50, InternalAddr: tAddr},
			Pinhole{Protocol: 50, InternalAddr: tAddr, ExternalAddr: tAddr}, kindProto},
		{"filter masked", Pinhole{Protocol: 6, InternalAddr: tAddr, InternalPort: 22, RemotePrefix: pfx("2001:db8:5::1/48")},
			Pinhole{Protocol: 6, InternalAddr: tAddr, InternalPort: 22, ExternalAddr: tAddr, ExternalPort: 22, RemotePrefix: pfx("2001:db8:5::/48")}, kindFilter},
		{"filter all protocols", Pinhole{InternalAddr: tAddr, RemotePrefix: pfx("::/0")},
			Pinhole{InternalAddr: tAddr, ExternalAddr: tAddr, RemotePrefix: pfx("::/0")}, kindAddrFilter},
		{"redirect", Pinhole{Protocol: 6, InternalAddr: tAddr, InternalPort: 443, ExternalAddr: tAddr, ExternalPort: 80},
			Pinhole{Protocol: 6, InternalAddr: tAddr, InternalPort: 443, ExternalAddr: tAddr, ExternalPort: 80}, kindRedirect6},
		{"NAPT, mapped addresses unmapped", Pinhole{Protocol: 6, InternalAddr: addr("::ffff:10.100.0.2"), InternalPort: 80,
			ExternalAddr: addr("::ffff:198.51.100.1"), ExternalPort: 8080, RemotePrefix: pfx("::ffff:203.0.113.7/120")},
			Pinhole{Protocol: 6, InternalAddr: tCli4, InternalPort: 80, ExternalAddr: tPub, ExternalPort: 8080, RemotePrefix: pfx("203.0.113.0/24")}, kindNAPT4Filter},

		{"no address", Pinhole{Protocol: 6, InternalPort: 22}, Pinhole{}, 0},
		{"unspecified", Pinhole{Protocol: 6, InternalAddr: addr("::"), InternalPort: 22}, Pinhole{}, 0},
		{"zone", Pinhole{Protocol: 6, InternalAddr: addr("fe80::1%eth0"), InternalPort: 22}, Pinhole{}, 0},
		{"protocol 0 with port", Pinhole{InternalAddr: tAddr, InternalPort: 22}, Pinhole{}, 0},
		{"port on a portless protocol", Pinhole{Protocol: 58, InternalAddr: tAddr, InternalPort: 1}, Pinhole{}, 0},
		{"IPv6 external elsewhere", Pinhole{Protocol: 6, InternalAddr: tAddr, InternalPort: 22, ExternalAddr: addr("2001:db8::9")}, Pinhole{}, 0},
		{"all-ports redirect", Pinhole{Protocol: 6, InternalAddr: tAddr, ExternalPort: 80}, Pinhole{}, 0},
		{"remote port without prefix", Pinhole{Protocol: 6, InternalAddr: tAddr, InternalPort: 22, RemotePort: 9}, Pinhole{}, 0},
		{"remote prefix of the other family", Pinhole{Protocol: 6, InternalAddr: tAddr, InternalPort: 22, RemotePrefix: pfx("203.0.113.0/24")}, Pinhole{}, 0},
		{"NAPT without external address", Pinhole{Protocol: 6, InternalAddr: tCli4, InternalPort: 80, ExternalPort: 8080}, Pinhole{}, 0},
		{"NAPT to IPv6 external", Pinhole{Protocol: 6, InternalAddr: tCli4, InternalPort: 80, ExternalAddr: tAddr, ExternalPort: 8080}, Pinhole{}, 0},
		{"NAPT all ports", Pinhole{Protocol: 6, InternalAddr: tCli4, ExternalAddr: tPub}, Pinhole{}, 0},
		{"NAPT all protocols", Pinhole{InternalAddr: tCli4, ExternalAddr: tPub}, Pinhole{}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.in.normalize()
			if tc.want == (Pinhole{}) {
				if !errors.Is(err, ErrInvalid) || got != (Pinhole{}) {
					t.Fatalf("normalize(%v) = %v, %v; want ErrInvalid and no value", tc.in, got, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("normalize: %v", err)
			}
			if diff := cmp.Diff(tc.want, got, cmpAddr, cmpPrefix, cmpOdd); diff != "" {
				t.Errorf("normalize (-want +got):\n%s", diff)
			}
			if k := kindOf(got); k != tc.kind {
				t.Errorf("kind %s, want %s", specs[k].name, specs[tc.kind].name)
			}
			// Canonical is a fixed point, and an element decodes back to it.
			if again, err := got.normalize(); err != nil || again != got {
				t.Errorf("normalize not idempotent: %v, %v", again, err)
			}
			back, err := decode(kindOf(got), element(kindOf(got), got))
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			if diff := cmp.Diff(got, back, cmpAddr, cmpPrefix, cmpOdd); diff != "" {
				t.Errorf("element round trip (-want +got):\n%s", diff)
			}
		})
	}
}

// TestOpValidate: timeouts are mandatory for Install and Refresh, so no
// element can ever be installed without a kernel expiry.
func TestOpValidate(t *testing.T) {
	p := Pinhole{Protocol: 6, InternalAddr: tAddr, InternalPort: 22}
	for _, tc := range []struct {
		op Op
		ok bool
	}{
		{Op{Kind: Install, Pinhole: p, Timeout: 0}, false},
		{Op{Kind: Refresh, Pinhole: p, Timeout: 999 * 1000}, false}, // 999 µs
		{Op{Kind: Install, Pinhole: p, Timeout: maxTimeout + 1}, false},
		{Op{Kind: 0, Pinhole: p}, false},
		{Op{Kind: Install, Pinhole: p, Timeout: 1000 * 1000}, true},
		{Op{Kind: Delete, Pinhole: p}, true},
	} {
		_, err := tc.op.validate()
		if (err == nil) != tc.ok {
			t.Errorf("validate(%+v) = %v, want ok=%v", tc.op, err, tc.ok)
		}
	}
}

// TestDecodeRejectsForeign: an element pcpd did not write (a remote range
// that is not a prefix, a port range that is neither one port nor all)
// is not misread: it decodes to an odd Pinhole whose Delete removes
// exactly it (h/redir6; TestOddElementRoundTrip), and a key too short for
// the set is refused.
func TestDecodeRejectsForeign(t *testing.T) {
	good, _ := Pinhole{Protocol: 6, InternalAddr: tAddr, InternalPort: 22, RemotePrefix: pfx("2001:db8:5::/48")}.normalize()
	e := element(kindFilter, good)
	notPrefix := append([]byte{}, e.KeyEnd...)
	notPrefix[24+15] = 0x07 // remote range ends at ...:7
	portRange := append([]byte{}, e.KeyEnd...)
	portRange[20], portRange[21] = 0, 23 // dport 22-23
	for name, el := range map[string]nftables.SetElement{
		"remote not a prefix": {Key: e.Key, KeyEnd: notPrefix},
		"port range":          {Key: e.Key, KeyEnd: portRange},
		"short key":           {Key: e.Key[:10], KeyEnd: e.KeyEnd},
	} {
		p, err := decode(kindFilter, el)
		if name == "short key" {
			if err == nil {
				t.Errorf("%s: decoded as %v", name, p)
			}
			continue
		}
		if err != nil || !p.Odd() || p == good || !sameElement(element(kindOf(p), p), el) {
			t.Errorf("%s: decoded as %v (odd %v), %v; want an odd Pinhole of exactly this element", name, p, p.Odd(), err)
		}
	}
}

// TestIntervalElements: protected prefixes become merged, non-overlapping
// intervals (the kernel refuses overlaps), and read back as prefixes.
func TestIntervalElements(t *testing.T) {
	in := []netip.Prefix{pfx("2001:db8:1::/48"), pfx("2001:db8:1:2::/64"), pfx("2001:db8:2::/48"), pfx("2001:db8:9::/48")}
	elems := intervalElements(in)
	type iv struct {
		Key string
		End bool
	}
	var got []iv
	for _, e := range elems {
		a, _ := netip.AddrFromSlice(e.Key)
		got = append(got, iv{a.String(), e.IntervalEnd})
	}
	want := []iv{{"2001:db8:1::", false}, {"2001:db8:3::", true}, {"2001:db8:9::", false}, {"2001:db8:a::", true}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("intervals (-want +got):\n%s", diff)
	}
	if got := intervalElements([]netip.Prefix{pfx("::/0")}); len(got) != 1 || got[0].IntervalEnd {
		t.Errorf("::/0 should be one open-ended start element, got %v", got)
	}
	back := rangePrefixes(addr("2001:db8:1::"), addr("2001:db8:2:ffff:ffff:ffff:ffff:ffff"))
	if diff := cmp.Diff([]netip.Prefix{pfx("2001:db8:1::/48"), pfx("2001:db8:2::/48")}, back, cmpPrefix); diff != "" {
		t.Errorf("rangePrefixes (-want +got):\n%s", diff)
	}
}

// TestConfigNames: names are defaulted and checked; attached objects are
// prefixed so they cannot collide with the admin's.
func TestConfigNames(t *testing.T) {
	conn, _ := nftables.New(nftables.WithTestDial(func([]netlink.Message) ([]netlink.Message, error) { return nil, nil }))
	b, err := New(conn, Config{Attached: true, Table: "filter"})
	if err != nil {
		t.Fatal(err)
	}
	if b.chainEntry != "pcpd" || b.sets[kindPort].Name != "pcpd_pin6" || b.chainGuard6 != "pcpd_guard6" {
		t.Errorf("attached names: %s %s %s", b.chainEntry, b.sets[kindPort].Name, b.chainGuard6)
	}
	if _, err := New(conn, Config{Table: "a\x00b"}); !errors.Is(err, ErrInvalid) {
		t.Errorf("NUL in table name: %v", err)
	}
	if _, err := New(nil, Config{}); !errors.Is(err, ErrInvalid) {
		t.Errorf("nil conn: %v", err)
	}
}
