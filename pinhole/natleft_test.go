package pinhole_test

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestCutsFlowsFalseWhileDamaged (review h/revnatcut, finding 4): the
// cut's objects damaged and the repairing Setup failing for as long as
// the damage lasts (recheck_nat and the DNAT chain flushed, the napt4 map
// replaced by a set of another type, which Setup's AddSet of napt4 cannot
// take: EEXIST). Healthy reports the damage, and from then on CutsFlows
// is false for every kind (IPv4 NAPT, IPv6 redirect, IPv6 pinhole) while
// Setup keeps failing: the server waits for its walk again. Once the
// foreign set is gone, a Setup lays the layout out and CutsFlows is true
// again. On main CutsFlows stayed true after Healthy's report and the
// failed Setups (what the last successful Setup had said).
func TestCutsFlowsFalseWhileDamaged(t *testing.T) {
	ns := netlab.NewNS(t, "natleftdmg")
	b := newBackend(t, ns, pinhole.Config{})
	v4 := netip.MustParseAddr("10.77.0.2")
	ps := []pinhole.Pinhole{
		{Protocol: tcp, InternalAddr: v4, InternalPort: 80, ExternalAddr: netip.MustParseAddr("192.0.2.77"), ExternalPort: 18080},
		{Protocol: tcp, InternalAddr: netip.MustParseAddr("2001:db8:77::2"), InternalPort: 443, ExternalPort: 8443},
		{Protocol: tcp, InternalAddr: netip.MustParseAddr("2001:db8:77::2"), InternalPort: 22},
	}
	cuts := func(step string, want bool) {
		t.Helper()
		for _, p := range ps {
			if got := b.CutsFlows(p); got != want {
				t.Errorf("%s: CutsFlows(%v) = %v, want %v", step, p, got, want)
			}
		}
	}
	cuts("fresh", true)
	ns.MustRun(t, "nft", "flush chain inet pcpd recheck_nat; flush chain inet pcpd prerouting; delete set inet pcpd napt4; add set inet pcpd napt4 { type ipv4_addr; }")
	if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
		t.Fatalf("Healthy = %v after the damage", err)
	}
	cuts("damage reported", false)
	for range 2 {
		if err := b.Setup(); err == nil {
			t.Fatal("Setup repaired over a foreign napt4: nothing to test")
		}
		cuts("Setup failing", false)
	}
	ns.MustRun(t, "nft", "delete set inet pcpd napt4")
	if err := b.Setup(); err != nil {
		t.Fatalf("Setup after the foreign set went: %v", err)
	}
	if err := b.Healthy(); err != nil {
		t.Fatalf("Healthy after the repair: %v", err)
	}
	cuts("repaired", true)
}
