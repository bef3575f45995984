package pinhole_test

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestSetDeletedUnderUs (review of 2026-12-03): `nft delete set` of any
// of pcpd's sets fails while a rule uses it (EBUSY, tried on each), so
// deleting one takes flushing its chain first. Then Healthy reports the
// set missing, for a full repair (not ErrProtected or ErrOwnerMeter,
// whose partial repairs cannot re-create a set), Setup restores it, and
// the calls that read the set report ErrMissing: before, the nftables
// library's reads gave ENOENT as text, so List (the server's audit) and
// SetProtected reported an unknown error.
func TestSetDeletedUnderUs(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	b := meteredTunnel(t, topo, nil)
	prot := []netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}
	owners := []pinhole.Owner{{ID: "static:x", Prefixes: prot}}
	give := func() {
		t.Helper()
		if err := b.SetProtected(prot); err != nil {
			t.Fatal(err)
		}
		if err := b.SetOwners(owners, nil); err != nil {
			t.Fatal(err)
		}
	}
	give()
	for _, tc := range []struct {
		chain, set, kind string
		list, protect    bool // List, SetProtected report ErrMissing
	}{
		{"guard6", "pin6", "set", true, false},
		{"prerouting", "redir6", "map", true, false},
		{"forward", "protected6", "set", false, true},
		{"control_local", "owners6", "map", false, false},
		{"control_meter", "meter6", "set", false, false},
		{"control_in", "served6", "set", false, false}, // control_local's use of it flushed too (below)
	} {
		t.Run(tc.set, func(t *testing.T) {
			if _, err := topo.Host.Run("nft", "delete", tc.kind, "inet", "pcpd", tc.set); err == nil {
				t.Fatalf("nft delete %s %s succeeded while a rule uses it", tc.kind, tc.set)
			}
			topo.Host.MustRun(t, "nft", "flush", "chain", "inet", "pcpd", tc.chain)
			if tc.set == "served6" {
				// control_local drops requests from a served address too
				// (servedSourceRules).
				topo.Host.MustRun(t, "nft", "flush", "chain", "inet", "pcpd", "control_local")
			}
			if tc.chain == "guard6" {
				// recheck6 looks the pinhole sets up too (cutflows.go).
				topo.Host.MustRun(t, "nft", "flush", "chain", "inet", "pcpd", "recheck6")
			}
			if tc.chain == "prerouting" {
				// recheck_nat looks the DNAT maps up too (natcut.go).
				topo.Host.MustRun(t, "nft", "flush", "chain", "inet", "pcpd", "recheck_nat")
			}
			if tc.set == "protected6" {
				// guard6's reverse-path rule looks it up too, and
				// local_out's forged-source drop (h/hunt4).
				topo.Host.MustRun(t, "nft", "flush", "chain", "inet", "pcpd", "guard6")
				topo.Host.MustRun(t, "nft", "flush", "chain", "inet", "pcpd", "local_out")
			}
			topo.Host.MustRun(t, "nft", "delete", tc.kind, "inet", "pcpd", tc.set)
			if _, err := b.List(); tc.list && !errors.Is(err, pinhole.ErrMissing) {
				t.Errorf("List: %v, want ErrMissing", err)
			}
			if err := b.SetProtected(prot); tc.protect && !errors.Is(err, pinhole.ErrMissing) {
				t.Errorf("SetProtected: %v, want ErrMissing", err)
			}
			err := b.Healthy()
			if !errors.Is(err, pinhole.ErrUnhealthy) || errors.Is(err, pinhole.ErrProtected) || errors.Is(err, pinhole.ErrOwnerMeter) {
				t.Fatalf("Healthy: %v, want damage for a full repair", err)
			}
			if err := b.Setup(); err != nil {
				t.Fatalf("Setup: %v", err)
			}
			give()
			if err := b.Healthy(); err != nil {
				t.Fatalf("Healthy after Setup: %v", err)
			}
			p := pinhole.Pinhole{InternalAddr: topo.ClientV6, Protocol: tcp, InternalPort: 22, ExternalAddr: topo.ClientV6, ExternalPort: 22}
			apply(t, b, install(p, time.Minute), del(p))
		})
	}
}
