package servertest_test

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/server/servertest"
)

// meterFirewall is what the owner-meter steps below need of either
// firewall: the real nftables backend or the test double.
type meterFirewall interface {
	Setup() error
	Healthy() error
	SetOwners([]pinhole.Owner, []netip.Prefix) error
	RepairOwners() error
}

// verdict classes an error as the server acts on it (checkFirewall): none,
// the owner meter alone (RepairOwners), other damage (Setup and a
// re-install), or another failure.
func verdict(err error) string {
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, pinhole.ErrOwnerMeter):
		return "owner meter"
	case errors.Is(err, pinhole.ErrUnhealthy):
		return "unhealthy"
	}
	return "error"
}

// TestFailedSetOwnersAgrees: the test double the server's tests run on
// must answer as the real backend does when writing the owner meter
// fails, first of all the first SetOwners: the server's reactions
// (RepairOwners, a full repair, nothing) follow Healthy's answer. Before,
// after a failed first SetOwners the real backend's Healthy passed (it had
// no owners to compare with) and its RepairOwners did nothing, while the
// double's Healthy reported the owner meter off.
func TestFailedSetOwnersAgrees(t *testing.T) {
	ns := netlab.NewNS(t, "fakeagree")
	conn, err := ns.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	real, err := pinhole.New(conn, pinhole.Config{Meter: pinhole.Meter{Rate: 200}})
	if err != nil {
		t.Fatal(err)
	}
	fake := servertest.NewFirewall(time.Now)
	owners := []pinhole.Owner{{ID: "static:c", Prefixes: []netip.Prefix{
		netip.MustParsePrefix("2001:db8:1:2::/64"), netip.MustParsePrefix("10.100.0.0/24")}}}
	chain := pinhole.OwnerChains(owners)["static:c"]
	// The real trigger (as TestSetupOwnerMeterFailure's): a base chain
	// where the owner's chain goes, which no map element can jump to.
	breakMeter := func() {
		ns.MustRun(t, "nft", "add", "chain", "inet", "pcpd", chain, "{ type filter hook input priority 10; policy accept; }")
		fake.FailOwners = func() error { return servertest.ErrInjected }
	}
	mendMeter := func() {
		ns.MustRun(t, "nft", "delete", "chain", "inet", "pcpd", chain)
		fake.FailOwners = nil
	}
	for _, step := range []struct {
		name string
		do   func(f meterFirewall) error
		want string
	}{
		{"Setup", meterFirewall.Setup, "ok"},
		{"Healthy", meterFirewall.Healthy, "ok"},
		{"first SetOwners, failing", func(f meterFirewall) error {
			if f == meterFirewall(real) {
				breakMeter()
			}
			return f.SetOwners(owners, nil)
		}, "error"},
		{"Healthy after it", meterFirewall.Healthy, "owner meter"},
		{"RepairOwners, still failing", meterFirewall.RepairOwners, "owner meter"},
		{"Setup, still failing", meterFirewall.Setup, "owner meter"},
		{"Healthy", meterFirewall.Healthy, "owner meter"},
		{"RepairOwners, mended", func(f meterFirewall) error {
			if f == meterFirewall(real) {
				mendMeter()
			}
			return f.RepairOwners()
		}, "ok"},
		{"Healthy after the repair", meterFirewall.Healthy, "ok"},
		{"SetOwners", func(f meterFirewall) error { return f.SetOwners(owners, nil) }, "ok"},
		{"Healthy", meterFirewall.Healthy, "ok"},
	} {
		gr, gf := step.do(real), step.do(fake)
		if verdict(gr) != verdict(gf) || verdict(gr) != step.want {
			t.Errorf("%s: real backend %q (%v), test double %q (%v), want both %q", step.name, verdict(gr), gr, verdict(gf), gf, step.want)
		}
	}
}
