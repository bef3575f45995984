package reliability

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/pcpd/pcpd/pcp"
)

// TestNAPTAdminForwardAddedAfterMapping (h/hunt2): a client holds an IPv4
// mapping of public port 40080; then the admin forwards 40080 with a DNAT
// rule of their own (one pcpd reads: h/adminports), and pcpd reads it
// (a NAT-PMP mapping of another port asks for a fresh read). The client's
// renewal, same request, must not keep 40080: the admin's forward, at
// dstnat, takes every connection to it (the client's mapping is dead,
// yet renewed with SUCCESS), and one hooked after pcpd's (dstnat + 2) is
// never reached while the client renews. Judged by the kernel (no
// element of pcpd's on 40080 after the renewal) and by connections from
// the internet: 40080 reaches the admin's backend, the renewal's port the
// client.
//
// Before the fix both rows failed: "the renewal kept the admin's
// forwarded port: granted 198.51.100.1:40080 again".
func TestNAPTAdminForwardAddedAfterMapping(t *testing.T) {
	for _, tc := range []struct {
		name string
		prio string
		pcp  bool // a PCP MAP renewed with its nonce, else NAT-PMP
	}{
		{"NAT-PMP, admin at dstnat", "dstnat", false},
		{"PCP MAP, admin at dstnat + 2", "dstnat + 2", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const port, other = 40080, 40090
			f := newForwardLab(t, port)
			l, pub, admin, client, c := f.lab, f.lab.topo.HostPublicV4, f.admin, f.client, f.c
			req := pcp.NewMap(l.topo.ClientV4, pcp.ProtoTCP, port, time.Hour)
			req.Map.ExternalPort = port
			renew := func() netip.AddrPort {
				t.Helper()
				if !tc.pcp {
					return l.mustPMP(c, pcp.PMPOpMapTCP, port, time.Hour)
				}
				r, err := do(c, req)
				if err != nil || r.Result != pcp.Success {
					t.Fatalf("MAP renewal: %v %v", r, err)
				}
				return netip.AddrPortFrom(r.Map.ExternalAddr.Unmap(), r.Map.ExternalPort)
			}
			if got := renew(); got.Port() != port {
				t.Fatalf("first mapping: granted %v, want port %d", got, port)
			}
			f.forward(tc.prio)
			time.Sleep(2500 * time.Millisecond) // past hostPortsTTL: the next allocation reads the rules again
			l.mustPMP(c, pcp.PMPOpMapTCP, other, time.Hour)

			got := renew()
			kernel := l.kernel()
			for _, e := range kernel {
				if e.Pinhole.ExternalAddr == pub && e.Pinhole.ExternalPort == port {
					t.Errorf("kernel still maps the admin's forwarded port: %v", e.Pinhole)
				}
			}
			if got.Port() == port {
				t.Fatalf("the renewal kept the admin's forwarded port: granted %v again", got)
			}
			if err := l.topo.Internet.DialTCP(netip.AddrPortFrom(pub, port).String(), time.Second); err != nil || admin.Load() != 1 || client.Load() != 0 {
				t.Fatalf("a connection to the forwarded %d: %v; admin backend accepted %d (want 1), the client %d (want 0)", port, err, admin.Load(), client.Load())
			}
			if err := l.topo.Internet.DialTCP(got.String(), time.Second); err != nil || client.Load() != 1 {
				t.Fatalf("the renewal's mapping %v: %v; the client accepted %d (want 1)", got, err, client.Load())
			}
			t.Logf("renewal moved the mapping to %v; 40080 reaches the admin's backend", got)
		})
	}
}

// TestWireGuardDeviceSwapFirstMapping (h/hunt2, MEDIUM availability;
// fixed by h/fresh): the admin replaces a client's device, as one does:
// the old peer removed, a new key with the same AllowedIPs, and the
// client asks for its NAT-PMP mapping. pcpd's WireGuard view is read
// every 5 s, and a source it found was never judged by a fresher one
// (only a miss or a THIRD_PARTY target re-read): the request, sent
// through the new peer, was granted in the old peer's name, and the read
// that found the swap revoked it as the old peer's loss (LIFE-05): 'the
// new device's mapping, answered SUCCESS after the swap, is gone 7 s
// later: kernel element false, lease owner ""'. The client was told
// SUCCESS and had no pinhole until its next renewal. Now every request
// that opens or extends a pinhole is judged by a view whose read began
// no more than --wireguard-fresh before it arrived. So, judged by the
// kernel's element and the lease list (the new key's) 7 s after:
//   - with --wireguard-fresh 0, the first request at once after the swap
//     is judged by a read begun after it (on main: the view of pcpd's
//     start, as THIRD_PARTY targets alone were re-read);
//   - with the default 1 s, a first request more than 1 s after the swap
//     is judged by a read begun after the swap (on main: the view of
//     pcpd's start, whose next periodic read is 5 s after it).
//
// A first request within the bound of the swap may still be judged by a
// view read before it, and is then revoked by the next read (within half
// the bound while requests come, WireGuard.keepFresh): the window this
// leaves is the bound's (RELIABILITY.md, h/fresh).
func TestWireGuardDeviceSwapFirstMapping(t *testing.T) {
	for _, tc := range []struct {
		name  string
		fresh string
		after time.Duration // from the swap to the new device's first request
	}{
		{"fresh 0, at once", "0", 0},
		{"fresh 1s, 1.3 s after", "1s", 1300 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t, labOptions{wireGuard: true, extra: []string{"--wireguard-fresh", tc.fresh}})
			l.start()
			cli4 := l.topo.ClientV4
			l.mustPMP(l.pcpClient(cli4), pcp.PMPOpMapTCP, 9300, time.Hour) // the old device's
			newKey := l.swapDevice()
			swapped := time.Now()
			time.Sleep(tc.after)
			ext := l.mustPMP(l.pcpClient(cli4), pcp.PMPOpMapTCP, 9301, time.Hour) // the new device's first request
			t.Logf("the new device's NAT-PMP mapping %v granted %v after the swap", ext, time.Since(swapped).Round(time.Millisecond))
			time.Sleep(7 * time.Second) // past pcpd's next WireGuard read and its sweep
			owner := ""
			for _, ls := range l.leases() {
				if ls.InternalAddress == cli4 && ls.InternalPort == 9301 {
					owner = ls.Client
				}
			}
			if want := "wg:" + newKey.PublicKey().String(); !l.kernelHas(cli4, pcp.ProtoTCP, 9301) || owner != want {
				t.Fatalf("the new device's mapping, answered SUCCESS after the swap, 7 s later: kernel element %v, lease owner %q, want true, %q; log:\n%s",
					l.kernelHas(cli4, pcp.ProtoTCP, 9301), owner, want, l.log.tail(8))
			}
		})
	}
}

// swapDevice replaces the WireGuard lab's client device as an admin does:
// the old peer removed from the host, a new key with the same AllowedIPs,
// the client's interface given the new private key. It returns the key.
func (l *lab) swapDevice() wgtypes.Key {
	l.t.Helper()
	wg, err := wgctrl.New()
	if err != nil {
		l.t.Fatal(err)
	}
	defer wg.Close()
	newKey, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		l.t.Fatal(err)
	}
	if err := wg.ConfigureDevice(l.topo.HostLANIf, wgtypes.Config{Peers: []wgtypes.PeerConfig{
		{PublicKey: l.topo.ClientKey.PublicKey(), Remove: true},
		{PublicKey: newKey.PublicKey(), AllowedIPs: []net.IPNet{ipnet(l.topo.ClientPrefix6), ipnet(l.topo.ClientPrefix4)}},
	}}); err != nil {
		l.t.Fatal(err)
	}
	if err := wg.ConfigureDevice(l.topo.ClientIf, wgtypes.Config{PrivateKey: &newKey}); err != nil {
		l.t.Fatal(err)
	}
	return newKey
}
