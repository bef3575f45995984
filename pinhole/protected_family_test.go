package pinhole_test

import (
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
