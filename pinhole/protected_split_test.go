package pinhole_test

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestProtectedOtherFamilyOnError: when one family's protected set cannot
// be written, SetProtected still writes the other's and returns the error.
// Before, writeProtected stopped at protected6's first failed transaction,
// so a new IPv4 client given in the same call stayed unguarded (and stayed
// so while the server retried).
func TestProtectedOtherFamilyOnError(t *testing.T) {
	v6a, v6b := netip.MustParsePrefix("2001:db8:1::/64"), netip.MustParsePrefix("2001:db8:2::/64")
	v4a, v4b := netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("198.51.100.0/24")
	for _, tc := range []struct {
		broken int
		landed []netip.Prefix // after the failing call: the broken family's old prefix, the other's new one
	}{
		{6, []netip.Prefix{v4b, v6a}},
		{4, []netip.Prefix{v4a, v6b}},
	} {
		t.Run(map[int]string{4: "protected4 fails", 6: "protected6 fails"}[tc.broken], func(t *testing.T) {
			ns := netlab.NewNS(t, "protfam")
			b := newBackend(t, ns, pinhole.Config{Meter: pinhole.Meter{Rate: 200}})
			if err := b.SetProtected([]netip.Prefix{v6a, v4a}); err != nil {
				t.Fatal(err)
			}
			restore := pinhole.BreakProtectedSet(b, tc.broken)
			err := b.SetProtected([]netip.Prefix{v6b, v4b})
			restore()
			if err == nil {
				t.Errorf("SetProtected with protected%d missing succeeded", tc.broken)
			}
			got, err := b.Protected()
			if err != nil {
				t.Fatal(err)
			}
			slices.SortFunc(got, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
			if !slices.Equal(got, tc.landed) {
				t.Errorf("kernel holds %v, want %v (the other family written)", got, tc.landed)
			}
			if err := b.SetProtected([]netip.Prefix{v6b, v4b}); err != nil {
				t.Errorf("SetProtected after restore: %v", err)
			}
		})
	}
}

// TestProtectedBigComponentBothWays: one overlap component far over a
// transaction's limit that writeProtected must both grow (held /64s under
// a wanted range) and cut down (a held /56 over wanted /64s), the two
// joined by an overlap, each way, and then a restart's Setup: the kernel
// must accept every intermediate range and end holding what was given.
func TestProtectedBigComponentBothWays(t *testing.T) {
	at := func(pos int) netip.Prefix { // the pos-th /64 of 2001:db8::/48
		return netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0, byte(pos >> 8), byte(pos)}), 64)
	}
	// a: a /56 (positions 0-255) and a /63 (256-257), merged into one
	// range, and every other /64 from 258 to 12256 (6 000).
	var a []netip.Prefix
	a = append(a, netip.MustParsePrefix("2001:db8::/56"), netip.MustParsePrefix("2001:db8:0:100::/63"))
	for pos := 258; pos < 12258; pos += 2 {
		a = append(a, at(pos))
	}
	// b: every other /64 from 1 to 255, and 256-16383 (overlapping a's
	// range 0-257 at 256-257).
	var b []netip.Prefix
	for pos := 1; pos < 256; pos += 2 {
		b = append(b, at(pos))
	}
	b = append(b, netip.MustParsePrefix("2001:db8:0:100::/56"), netip.MustParsePrefix("2001:db8:0:200::/55"),
		netip.MustParsePrefix("2001:db8:0:400::/54"), netip.MustParsePrefix("2001:db8:0:800::/53"),
		netip.MustParsePrefix("2001:db8:0:1000::/52"), netip.MustParsePrefix("2001:db8:0:2000::/51"))
	contains := func(ps []netip.Prefix, x netip.Addr) bool {
		return slices.ContainsFunc(ps, func(p netip.Prefix) bool { return p.Contains(x) })
	}
	for _, tc := range []struct {
		name     string
		from, to []netip.Prefix
	}{{"a to b", a, b}, {"b to a", b, a}} {
		t.Run(tc.name, func(t *testing.T) {
			ns := netlab.NewNS(t, "protboth")
			be := newBackend(t, ns, pinhole.Config{Meter: pinhole.Meter{Rate: 200}})
			if err := be.SetProtected(tc.from); err != nil {
				t.Fatalf("SetProtected(from): %v", err)
			}
			if err := be.SetProtected(tc.to); err != nil {
				t.Fatalf("SetProtected(to): %v", err)
			}
			if err := be.Setup(); err != nil {
				t.Fatalf("Setup: %v", err)
			}
			if err := be.Healthy(); err != nil {
				t.Errorf("Healthy: %v", err)
			}
			got, err := be.Protected()
			if err != nil {
				t.Fatal(err)
			}
			for pos := range 16400 {
				if x := at(pos).Addr(); contains(got, x) != contains(tc.to, x) {
					t.Fatalf("/64 %d (%v): guarded %v, given %v", pos, x, contains(got, x), contains(tc.to, x))
				}
			}
		})
	}
}

// siteSixtyFours are n /64s of 2001:db8::/48, every other one (so that
// none are adjacent and the set holds n ranges).
func siteSixtyFours(n int) []netip.Prefix {
	var out []netip.Prefix
	for i := range n {
		j := 2 * i
		out = append(out, netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0, byte(j >> 8), byte(j)}), 64))
	}
	return out
}

// TestProtectedOneComponentTooBig: planIntervalSync puts a whole overlap
// component in one transaction, whatever its size. An operator who
// protects many clients' /64s one by one and then adds the site's /48
// (which covers them all), or goes back, makes one component of every
// prefix: one transaction larger than the netlink socket's send buffer.
func TestProtectedOneComponentTooBig(t *testing.T) {
	site := []netip.Prefix{netip.MustParsePrefix("2001:db8::/48")}
	for _, n := range []int{3000, 6000} {
		for _, dir := range []string{"specifics->aggregate", "aggregate->specifics"} {
			t.Run(fmt.Sprint(n, dir), func(t *testing.T) {
				ns := netlab.NewNS(t, "r2big")
				b := newBackend(t, ns, pinhole.Config{Meter: pinhole.Meter{Rate: 200}})
				from, to := siteSixtyFours(n), site
				if dir == "aggregate->specifics" {
					from, to = site, siteSixtyFours(n)
				}
				if err := b.SetProtected(from); err != nil {
					t.Fatalf("SetProtected(from): %v", err)
				}
				if err := b.SetProtected(to); err != nil {
					t.Errorf("SetProtected %s with %d /64s: %v", dir, n, err)
				}
				// A restart with the new list: Setup must bring the sets to it.
				if err := b.Setup(); err != nil {
					t.Errorf("Setup %s with %d /64s: %v", dir, n, err)
				}
				if err := b.Healthy(); err != nil {
					t.Errorf("Healthy: %v", err)
				}
			})
		}
	}
}

// TestProtectedOtherFamilyGuarded: writeProtected syncs protected6 then
// protected4 and stops at the first failed transaction, so a new IPv4
// client given in the same SetProtected as an oversized IPv6 component is
// left unguarded (and stays so while the server retries).
func TestProtectedOtherFamilyGuarded(t *testing.T) {
	ns := netlab.NewNS(t, "r2fam")
	b := newBackend(t, ns, pinhole.Config{Meter: pinhole.Meter{Rate: 200}})
	specifics := siteSixtyFours(6000)
	if err := b.SetProtected(specifics); err != nil {
		t.Fatal(err)
	}
	v4 := netip.MustParsePrefix("192.0.2.0/24")
	err := b.SetProtected([]netip.Prefix{netip.MustParsePrefix("2001:db8::/48"), v4})
	got, perr := b.Protected()
	if perr != nil {
		t.Fatal(perr)
	}
	guarded := false
	for _, p := range got {
		if p == v4 {
			guarded = true
		}
	}
	if !guarded {
		t.Errorf("new IPv4 client %v not guarded after SetProtected (error %v)", v4, err)
	}
}
