package reliability

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
)

// TestWireGuardBounce: the WireGuard interface pcpd serves is deleted
// and re-created, as `systemctl restart wg-quick@wg0` or `wg-quick down
// wg0; wg-quick up wg0` does, and stays gone until pcpd's WireGuard
// refresh (every 5 s) has seen it gone (the test waits for pcpd's log
// line). Within --wireguard-gone-grace (default 1m) the client's lease
// is still listed, its kernel element still there, and once the
// interface is back with the same peer, traffic passes through the
// pinhole with no renewal (the lease's expiry unchanged). Gone longer
// than the grace: the lease and its element are revoked. Back within the
// grace with another peer: revoked at once (the next refresh), not at the
// grace's end.
func TestWireGuardBounce(t *testing.T) {
	for _, tc := range []struct {
		name  string
		extra []string
		back  string // "same" or "other" peer; "": stays gone
		kept  bool
	}{
		{name: "back with the same peer within the grace", back: "same", kept: true},
		{name: "gone longer than the grace", extra: []string{"--wireguard-gone-grace", "6s"}},
		{name: "back with another peer within the grace", back: "other"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t, labOptions{wireGuard: true, extra: tc.extra})
			l.start()
			cli := l.topo.ClientV6
			l.topo.Client.ServeTCP(t, netip.AddrPortFrom(cli, servicePort).String())
			l.mustMap(l.pcpClient(cli), cli, pcp.ProtoTCP, servicePort, time.Hour)
			if err := l.dialService(cli, servicePort); err != nil {
				t.Fatal(err)
			}
			key := leaseKey{cli, "tcp", servicePort}
			before, ok := leaseSet(l.leases())[key]
			if !ok {
				t.Fatal("no lease after MAP")
			}
			held := func(when string) {
				t.Helper()
				if _, ok := leaseSet(l.leases())[key]; !ok {
					t.Fatalf("%s: lease tcp/%d revoked; log:\n%s", when, servicePort, l.log.tail(10))
				}
				if !l.kernelHas(cli, pcp.ProtoTCP, servicePort) {
					t.Fatalf("%s: lease listed but its kernel element is gone", when)
				}
			}
			revoked := func(within time.Duration, when string) {
				t.Helper()
				if _, ok := waitFor(within, func() bool {
					_, listed := leaseSet(l.leases())[key]
					return !listed && !l.kernelHas(cli, pcp.ProtoTCP, servicePort)
				}); !ok {
					t.Fatalf("%s: lease or kernel element still there after %v; log:\n%s", when, within, l.log.tail(10))
				}
			}

			off := l.log.len()
			l.topo.Host.MustRun(t, "ip", "link", "del", l.topo.HostLANIf)
			gone := time.Now()
			// pcpd's refresh has read the interface gone (either log
			// line: "...; its peers own nothing" without a grace).
			if _, ok := waitFor(15*time.Second, func() bool {
				return strings.Contains(l.log.since(off), "WireGuard interface gone")
			}); !ok {
				t.Fatalf("pcpd did not notice the interface gone in 15 s; log:\n%s", l.log.since(off))
			}
			if tc.back == "" {
				held("just after pcpd found the interface gone")
				revoked(15*time.Second, "interface gone longer than the 6 s grace")
				if !strings.Contains(l.log.since(off), "its peers own nothing") {
					t.Fatalf("revoked without the grace's end logged:\n%s", l.log.since(off))
				}
				t.Logf("gone: held, then revoked %v after the deletion", time.Since(gone).Round(time.Millisecond))
				return
			}
			time.Sleep(time.Until(gone.Add(6 * time.Second))) // longer than a refresh
			held("interface gone for 6 s")

			if tc.back == "other" {
				other, err := wgtypes.GeneratePrivateKey()
				if err != nil {
					t.Fatal(err)
				}
				recreateWireGuardPeer(t, l, other.PublicKey())
				back := time.Now()
				revoked(15*time.Second, "back with another peer")
				t.Logf("back with another peer: revoked %v after the return (grace 1m)", time.Since(back).Round(time.Millisecond))
				return
			}
			recreateWireGuard(t, l) // waits for the tunnel
			outage := time.Since(gone)
			held("interface back")
			if err := netlab.Eventually(5*time.Second, func() error { return l.dialService(cli, servicePort) }); err != nil {
				t.Fatalf("interface back but the kept pinhole passes no traffic: %v", err)
			}
			after := leaseSet(l.leases())[key]
			if !after.ExpiresAt.Equal(before.ExpiresAt) {
				t.Fatalf("lease renewed meanwhile (expiry %v, was %v): the test must not renew", after.ExpiresAt, before.ExpiresAt)
			}
			if !strings.Contains(l.log.since(off), "back within its grace") {
				t.Fatalf("return not logged:\n%s", l.log.since(off))
			}
			t.Logf("bounce of %v (pcpd saw it gone): lease, kernel element and traffic kept without a renewal", outage.Round(time.Millisecond))
		})
	}
}
