package server

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestE2EWireGuardDeviceBackFromNamespace (issue 9, h/swap2; h/swapev
// left it untried): the served WireGuard interface is moved to another
// network namespace (ip link set dev X netns Y: its addresses go, its
// index stays), configured there with other peers, and moved back under
// its name on the same index. The ownership read it while it was away
// (a periodic read; Refresh here, the others held off for an hour): the
// userspace device answers its control socket from any namespace, so
// that read was clean and of the peers it had then. The device back
// must not be judged by that view: whatever was configured while it was
// away is unknown to it.
//
// Judged by the kernel's pinholes and the lease list, per row:
//   - the device back gives a full tunnel to a new key (the client's
//     device takes it): MAP and NAT-PMP from the client's addresses
//     refused, NOT_AUTHORIZED, no pinhole;
//   - the device back gives the client's prefixes to a new key: granted
//     in the new key's name;
//
// and in both the client's lease of before (its old key, removed while
// away) loses its pinhole; pcpd serves the device back without restart.
func TestE2EWireGuardDeviceBackFromNamespace(t *testing.T) {
	for _, tc := range []struct {
		name string
		full bool
	}{
		{"back with a full-tunnel peer", true},
		{"back with the client's prefixes under a new key", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t)
			host := l.topo.HostLANIf
			l.useWireGuard(t, []string{host}, time.Hour, policy.WithMissInterval(time.Hour), policy.WithFreshBound(time.Hour))
			cli6 := l.topo.ClientV6
			if r := l.pcp(mapReq(cli6, pcp.ProtoTCP, 8181, 0, time.Hour, 2)); r.Result != pcp.Success {
				t.Fatalf("MAP before the move: %v", r.Result)
			}
			before := netip.AddrPortFrom(cli6, 8181)
			index := hostIndex(t, l, host)

			away := netlab.NewNS(t, "away")
			l.topo.Host.MustRun(t, "ip", "link", "set", "dev", host, "netns", away.Name)
			if err := netlab.Eventually(10*time.Second, func() error {
				if len(l.srv.Status().Listen) > 0 {
					return errNotYet
				}
				return nil
			}); err != nil {
				t.Fatal("pcpd still serves the interface moved away")
			}
			// A read while it is away, of the peers it has then.
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := l.wg.Refresh(ctx); err != nil {
				t.Fatalf("read while away: %v", err)
			}
			k, _ := wgtypes.GeneratePrivateKey()
			allowed := []net.IPNet{ipnet(l.topo.ClientPrefix6), ipnet(l.topo.ClientPrefix4)}
			if tc.full {
				allowed = []net.IPNet{ipnet(netip.MustParsePrefix("::/0")), ipnet(netip.MustParsePrefix("0.0.0.0/0"))}
			}
			if err := l.wgc.ConfigureDevice(host, wgtypes.Config{ReplacePeers: true, Peers: []wgtypes.PeerConfig{{
				PublicKey: k.PublicKey(), ReplaceAllowedIPs: true, AllowedIPs: allowed,
			}}}); err != nil {
				t.Fatal(err)
			}
			away.MustRun(t, "ip", "link", "set", "dev", host, "netns", l.topo.Host.Name)
			if err := l.topo.UpHostWireGuard(); err != nil {
				t.Fatal(err)
			}
			if got := hostIndex(t, l, host); got != index {
				t.Fatalf("back on index %d, was %d: not the case this test is for", got, index)
			}
			if err := l.wgc.ConfigureDevice(l.topo.ClientIf, wgtypes.Config{PrivateKey: &k}); err != nil {
				t.Fatal(err)
			}
			wantOwner := ""
			if !tc.full {
				wantOwner = "wg:" + k.PublicKey().String()
			}
			l.checkNewDevice(t, "from the device back from another namespace, configured there", wantOwner)
			l.waitHoleGone(t, "the client's lease of before the move (its old key, removed while away)", before)
		})
	}
}
