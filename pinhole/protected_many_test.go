package pinhole_test

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// manyProtected returns n prefixes, half IPv6 /64s and half IPv4 /32s, every
// other one so that none merge, starting at the offset-th of each family.
func manyProtected(n, offset int) []netip.Prefix {
	var out []netip.Prefix
	for i := offset; i < offset+n/2; i++ {
		j := 2 * i
		out = append(out,
			netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, byte(j >> 16), byte(j >> 8), byte(j)}), 64),
			netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(j >> 16), byte(j >> 8), byte(j)}), 32))
	}
	return out
}

// TestSetupManyProtected: an operator with many static clients gives
// SetProtected thousands of prefixes; SetProtected, Setup (at start and as
// the repair after Healthy fails) and a SetProtected that changes part of
// them must all succeed and leave the kernel holding exactly the prefixes
// given. Before, Setup queued every protected element in its one
// transaction, which exceeded the netlink socket's send buffer at about 4
// 000 prefixes (EMSGSIZE: pcpd could not start), and SetProtected itself at
// about 10 000.
func TestSetupManyProtected(t *testing.T) {
	for _, n := range []int{4000, 10000} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			ns := netlab.NewNS(t, "manyprot")
			b := newBackend(t, ns, pinhole.Config{Meter: pinhole.Meter{Rate: 200}})
			given := manyProtected(n, 0)
			if err := b.SetProtected(given); err != nil {
				t.Fatalf("SetProtected of %d prefixes: %v", n, err)
			}
			if got := mustProtected(t, b); len(got) != n {
				t.Errorf("kernel holds %d protected prefixes, want %d", len(got), n)
			}
			if err := b.Healthy(); err != nil {
				t.Errorf("Healthy: %v", err)
			}
			// Setup as at a restart (a Backend of its own, which must
			// write the prefixes into sets that already hold them) and as
			// the repair of a flushed set.
			conn, err := ns.NftConn()
			if err != nil {
				t.Fatal(err)
			}
			b2, err := pinhole.New(conn, pinhole.Config{Meter: pinhole.Meter{Rate: 200}})
			if err != nil {
				t.Fatal(err)
			}
			if err := b2.SetProtected(given); err != nil {
				t.Fatalf("restart: SetProtected of %d prefixes before Setup: %v", n, err)
			}
			if err := b2.Setup(); err != nil {
				t.Fatalf("restart: Setup with %d protected prefixes: %v", n, err)
			}
			b = b2
			ns.MustRun(t, "nft", "flush", "set", "inet", "pcpd", "protected6")
			if err := b.Healthy(); err == nil {
				t.Errorf("Healthy passes with protected6 flushed")
			}
			if err := b.Setup(); err != nil {
				t.Fatalf("Setup with %d protected prefixes: %v", n, err)
			}
			if err := b.Healthy(); err != nil {
				t.Errorf("Healthy after Setup: %v", err)
			}
			if got := mustProtected(t, b); len(got) != n {
				t.Errorf("after Setup the kernel holds %d protected prefixes, want %d", len(got), n)
			}
			// Half of them replaced by others.
			moved := manyProtected(n, n/4)
			if err := b.SetProtected(moved); err != nil {
				t.Fatalf("SetProtected moving half of %d prefixes: %v", n, err)
			}
			if err := b.Healthy(); err != nil {
				t.Errorf("Healthy after the move: %v", err)
			}
			if got, want := mustProtected(t, b), sortedPrefixes(moved); fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("after the move the kernel holds %d prefixes, want %d (first %v, want %v)", len(got), len(want), got[:min(3, len(got))], want[:3])
			}
		})
	}
}

// sortedPrefixes orders prefixes as Protected returns them: IPv6, then
// IPv4, each by address.
func sortedPrefixes(ps []netip.Prefix) []netip.Prefix {
	out := slices.Clone(ps)
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if a.Addr().Is4() != b.Addr().Is4() {
			if a.Addr().Is4() {
				return 1
			}
			return -1
		}
		return a.Addr().Compare(b.Addr())
	})
	return out
}
