package pinhole_test

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestForgetFlowedMany (review h/revrem): a walk's prune of many
// addresses (a walk after a burst of ended mappings, a revocation of a
// large prefix, a backlog after failed walks) deletes them all from
// flowed6, and Reflowed adds them all back, the record still trusted.
// Before, each went as one set-element message: past ≈ 2 340 addresses
// the element list's 16-bit length wrapped and the kernel took only its
// start (ForgetFlowed reported success, the rest stayed in flowed6 for
// good; Reflowed left leases' addresses out of the record, unrecorded
// flows), and past ≈ 7 400 the transaction outgrew the socket's send
// buffer (EMSGSIZE: nothing pruned; Reflowed's failure made the record
// untrusted for the Backend's life).
func TestForgetFlowedMany(t *testing.T) {
	topo, be := guardedTopology(t, pinhole.Config{})
	for _, n := range []int{3000, 10000} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			fillFlowed(t, topo.Host, n)
			if _, ok := be.FlowedAddrs(); !ok {
				t.Fatal("FlowedAddrs untrusted")
			}
			as := make([]netip.Addr, n)
			for i := range as {
				as[i] = netip.MustParseAddr(fmt.Sprintf("2001:db8:ff00::%x:%x", i>>16, i&0xffff))
			}
			if !be.ForgetFlowed(as) {
				t.Fatalf("ForgetFlowed of %d addresses failed", n)
			}
			if left := flowedCount(t, topo.Host); left != 0 {
				t.Fatalf("%d of %d addresses still in flowed6 after ForgetFlowed reported them deleted", left, n)
			}
			be.Reflowed(as)
			if got := flowedCount(t, topo.Host); got != n {
				t.Fatalf("%d of %d addresses back in flowed6 after Reflowed", got, n)
			}
			if _, ok := be.FlowedAddrs(); !ok {
				t.Fatal("the record untrusted after Reflowed")
			}
			if !be.ForgetFlowed(as) { // empty again for the next size
				t.Fatal("ForgetFlowed failed")
			}
		})
	}
}

// flowedCount is how many addresses flowed6 holds.
func flowedCount(t testing.TB, host *netlab.NS) int {
	t.Helper()
	return strings.Count(host.MustRun(t, "nft", "list", "set", "inet", "pcpd", "flowed6"), "2001:db8:ff00:")
}
