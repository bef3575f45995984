package policy

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"
)

// TestWireGuardDevicesChangedOtherFails (review h/revsw of h/swapev):
// with two served interfaces, wg0 is created again with a new key holding
// its old peer's prefix while wg1 cannot be read (EACCES on its UAPI
// socket, say: a state that lasts). The reads after the change read wg0
// cleanly; only wg1's last good peers may be stale. Before, any failed
// read kept every replaced name unserved, so wg0's clients were refused
// (nobody's) for as long as wg1 failed, though wg0's new peers were read;
// wg0 itself failing keeps it unserved (its last good peers are the old
// device's).
func TestWireGuardDevicesChangedOtherFails(t *testing.T) {
	a := netip.MustParseAddr("2001:db8:a::5")
	b := netip.MustParseAddr("2001:db8:b::5")
	for _, tc := range []struct {
		name    string
		failing string
		owner   OwnerID // a's request on wg0 after the reads
	}{
		{name: "the other interface fails", failing: "wg1", owner: wgID(2)},
		{name: "the changed interface fails", failing: "wg0", owner: ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := &devices{}
			d.set("wg0", peer(1, "2001:db8:a::/48"))
			d.set("wg1", peer(3, "2001:db8:b::/48"))
			w, err := newWireGuard(d, []string{"wg0", "wg1"}, time.Hour, nil, WithFreshBound(time.Hour), WithMissInterval(time.Hour))
			if err != nil {
				t.Fatal(err)
			}
			p, err := New(Config{}, w)
			if err != nil {
				t.Fatal(err)
			}
			judged := func(src netip.Addr, iface string) OwnerID {
				o, reason := p.Authorize(Request{Source: src, Iface: iface, Target: src, Protocol: 6, InternalPort: 443})
				if reason != Allowed {
					return ""
				}
				return o.ID
			}
			d.fail(tc.failing, errors.New("permission denied"))
			d.set("wg0", peer(2, "2001:db8:a::/48"))
			w.DevicesChanged([]string{"wg0"}, false)
			w.Freshen()
			for range 3 { // the failure lasts: later reads change nothing
				_ = w.Refresh(context.Background())
			}
			if got := judged(a, "wg0"); got != tc.owner {
				t.Errorf("%s failing, after reads of the new wg0: %s's request on wg0 judged %q, want %q", tc.failing, a, got, tc.owner)
			}
			if got := judged(b, "wg1"); got != wgID(3) {
				t.Errorf("%s failing: %s's request on wg1 judged %q, want peer 3 (its last good peers)", tc.failing, b, got)
			}
		})
	}
}
