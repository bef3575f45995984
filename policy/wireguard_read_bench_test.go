package policy

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/pcpd/pcpd/internal/netlab"
)

// BenchmarkWireGuardReadPeers (review h/revtp, issue 9): one read of a
// userspace WireGuard interface's peers (wireguard-go, as the lab's), what
// a THIRD_PARTY request that finds the view older than --wireguard-fresh
// waits for in its socket reader (WireGuard.Freshen), with 1, 100 and
// 1000 peers, each with an IPv6 /64 and an IPv4 /32. "same": nothing
// changed (one wgctrl read and the comparison, the common case);
// "changed": peer 0's AllowedIPs changed before each read (the view
// rebuilt, its diff sent on Changes). Root only:
//
//	sudo go test ./policy -run '^$' -bench WireGuardReadPeers -benchtime 50x
func BenchmarkWireGuardReadPeers(b *testing.B) {
	netlab.RequireRoot(b)
	ns := netlab.NewNS(b, "wgread")
	ifname := netlab.UniqueIfName("wgr")
	netlab.StartWireGuard(b, ns, ifname, netlab.WireGuardBinary(b))
	c, err := wgctrl.New()
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	priv, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		b.Fatal(err)
	}
	ipn := func(p netip.Prefix) net.IPNet {
		return net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
	}
	for _, n := range []int{1, 100, 1000} {
		b.Run(fmt.Sprintf("peers=%d", n), func(b *testing.B) {
			peers := make([]wgtypes.PeerConfig, n)
			for i := range peers {
				k, err := wgtypes.GeneratePrivateKey()
				if err != nil {
					b.Fatal(err)
				}
				peers[i] = wgtypes.PeerConfig{PublicKey: k.PublicKey(), AllowedIPs: []net.IPNet{
					ipn(netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0, byte(i >> 8), byte(i)}), 64)),
					ipn(netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 77, byte(i >> 8), byte(i)}), 32)),
				}}
			}
			if err := c.ConfigureDevice(ifname, wgtypes.Config{PrivateKey: &priv, ReplacePeers: true, Peers: peers}); err != nil {
				b.Fatal(err)
			}
			w, err := NewWireGuard(c, []string{ifname}, time.Hour, nil)
			if err != nil {
				b.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			go func() { // the engine's part: drain the losses
				for {
					select {
					case <-w.Changes():
					case <-ctx.Done():
						return
					}
				}
			}()
			b.Run("same", func(b *testing.B) {
				for b.Loop() {
					if err := w.Refresh(ctx); err != nil {
						b.Fatal(err)
					}
				}
			})
			b.Run("changed", func(b *testing.B) {
				p0 := peers[0]
				wide := ipn(netip.MustParsePrefix("2001:db8:ffff::/48"))
				i := 0
				for b.Loop() {
					b.StopTimer()
					p0.ReplaceAllowedIPs = true
					p0.AllowedIPs = peers[0].AllowedIPs
					if i++; i%2 == 1 {
						p0.AllowedIPs = append([]net.IPNet{wide}, p0.AllowedIPs...)
					}
					if err := c.ConfigureDevice(ifname, wgtypes.Config{Peers: []wgtypes.PeerConfig{p0}}); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
					if err := w.Refresh(ctx); err != nil {
						b.Fatal(err)
					}
				}
			})
		})
	}
}
