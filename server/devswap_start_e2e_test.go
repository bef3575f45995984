package server

import (
	"context"
	"testing"
	"time"

	"github.com/pcpd/pcpd/policy"
)

// TestE2EWireGuardDeviceSwapBeforeServing (issue 9, review h/revsw: the
// start-up window of h/swapev): the served WireGuard interface is
// deleted and created again under its name, as wg-quick down/up does,
// after the ownership's first read (NewWireGuard, as pcpd serve makes
// it) and before the listener's first pass. The listener reports device
// changes only against what it served before, and it served nothing:
// the swap was seen by no one, and the new device's requests were
// judged, within the fresh bound of that read, by the old device's
// peers. The ownership is made in the Host namespace, as pcpd's is in
// its own (its read resolves the interface's index there), and is read
// once, at its start (no periodic, miss or keeping read for an hour).
//
// Judged by the kernel's pinholes, the lease list and the ownership's
// reads:
//   - no swap: the client's MAP is its own, and the start costs no read
//     beyond the first (the index the listener serves is the one read);
//   - the new device's peer has a full tunnel (it owns nothing, but
//     WireGuard takes any source from it): its PCP MAP from the client's
//     IPv6 address and NAT-PMP mapping from its IPv4 address must be
//     refused, NOT_AUTHORIZED, no pinhole;
//   - the new device gives the client's AllowedIPs to a new key: granted,
//     in the new key's name.
func TestE2EWireGuardDeviceSwapBeforeServing(t *testing.T) {
	for _, tc := range []struct {
		name        string
		swap, full  bool // swapped; the new peer's AllowedIPs a full tunnel, else the old peer's
		owned       bool
		extraReads0 bool // no read but the first
	}{
		{"no swap", false, false, true, true},
		{"new peer with a full tunnel owns nothing", true, true, false, false},
		{"new key with the old peer's AllowedIPs", true, false, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t)
			l.stop()
			var wg *policy.WireGuard
			if err := l.topo.Host.Do(func() (err error) {
				wg, err = policy.NewWireGuard(l.wgc, []string{l.topo.HostLANIf}, time.Hour, l.log.Named("wgown"),
					policy.WithMissInterval(time.Hour), policy.WithFreshBound(time.Hour))
				return err
			}); err != nil {
				t.Fatal(err)
			}
			if _, ok := wg.FirstIndex(l.topo.HostLANIf); !ok {
				t.Fatalf("FirstIndex(%s): unknown, read in the Host namespace", l.topo.HostLANIf)
			}
			ctx, cancel := context.WithCancel(context.Background())
			t.Cleanup(cancel)
			go wg.Run(ctx)
			var err error
			l.wg = wg
			if l.pol, err = policy.New(policy.Config{}, wg); err != nil {
				t.Fatal(err)
			}
			wantOwner := "wg:" + l.topo.ClientKey.PublicKey().String()
			if tc.swap {
				wantOwner = "wg:" + l.swapHostWireGuard(t, tc.full).PublicKey().String()
			}
			if !tc.owned {
				wantOwner = ""
			}
			l.start() // the listener's first pass: after the swap
			l.checkNewDevice(t, "with the device swapped before the listener's first pass", wantOwner)
			if n := wg.Stats().Refreshes; tc.extraReads0 && n != 0 {
				t.Errorf("ownership reads after the first: %d, want 0 (the listener serves the index the first read found)", n)
			}
		})
	}
}
