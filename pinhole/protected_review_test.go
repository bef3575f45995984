package pinhole_test

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

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
