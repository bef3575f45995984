package server

import (
	"errors"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/policy"
)

// TestE2EHoleStaysGuarded: when a client's prefix becomes a hole in the
// WireGuard ownership (the same AllowedIPs on a peer of another served
// interface, policy.Holes: "owned by nobody", e.g. while an admin moves the
// client from one interface to another), its leases go (LIFE-05), but the
// prefix must stay behind the guard: WireGuard still routes it to the
// client, so dropping it from the protected sets would let the whole
// Internet reach every port of every host in it with no pinhole at all.
// Checked with real TCP from the Internet namespace, before and after the
// second interface's peer appears.
func TestE2EHoleStaysGuarded(t *testing.T) {
	l := newLab(t)
	c := netip.AddrPortFrom(l.topo.ClientV6, 2222)
	l.topo.Client.ServeTCP(t, c.String())
	if l.reach(c) {
		t.Fatal("open before any MAP")
	}

	second := l.serveSecondWG(t, 51899)
	if l.reach(c) {
		t.Fatal("open with two interfaces, before any overlap")
	}

	// Another peer on the second interface is given the client's /64.
	other, _ := wgtypes.GeneratePrivateKey()
	pfx := l.topo.ClientPrefix6
	err := l.wgc.ConfigureDevice(second, wgtypes.Config{Peers: []wgtypes.PeerConfig{{
		PublicKey:  other.PublicKey(),
		AllowedIPs: []net.IPNet{{IP: pfx.Addr().AsSlice(), Mask: net.CIDRMask(pfx.Bits(), 128)}},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := netlab.Eventually(5*time.Second, func() error {
		if !slices.Contains(l.wg.Holes(), pfx) {
			return errors.New("overlap not seen yet")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// Give the engine its sweep (ownership change, then updateProtected).
	time.Sleep(time.Second)
	if l.reach(c) {
		t.Fatalf("%v is reachable from the Internet without any pinhole once %v became a hole (kernel pinholes: %v)", c, pfx, l.kernelHoles())
	}
}

// serveSecondWG adds a second userspace WireGuard interface to the lab's
// host, listening on port, and restarts the engine serving both
// interfaces with WireGuard ownership read from both (as `pcpd serve
// --interface A --interface B`). It returns the new interface's name.
func (l *lab) serveSecondWG(t *testing.T, port int) string {
	t.Helper()
	return l.serveSecondWGAs(t, "rvq", port, 200*time.Millisecond)
}

// serveSecondWGAs is serveSecondWG with the interface named after tag and
// the ownership re-read every refresh.
func (l *lab) serveSecondWGAs(t *testing.T, tag string, port int, refresh time.Duration) string {
	t.Helper()
	return l.serveSecondWGWith(t, tag, port, refresh, nil)
}

// serveSecondWGWith is serveSecondWGAs with peers configured on the new
// interface and opts given to its WireGuard ownership.
func (l *lab) serveSecondWGWith(t *testing.T, tag string, port int, refresh time.Duration, peers []wgtypes.PeerConfig, opts ...policy.WireGuardOption) string {
	t.Helper()
	second := netlab.UniqueIfName(tag)
	cmd, err := netlab.DefaultWGCommand()
	if err != nil {
		t.Fatal(err)
	}
	if err := netlab.StartWireGuardDevice(l.topo.Host, second, cmd); err != nil {
		t.Fatal(err)
	}
	key, _ := wgtypes.GeneratePrivateKey()
	if err := l.wgc.ConfigureDevice(second, wgtypes.Config{PrivateKey: &key, ListenPort: &port, Peers: peers}); err != nil {
		t.Fatal(err)
	}
	l.topo.Host.MustRun(t, "ip", "link", "set", second, "up")
	l.useWireGuard(t, []string{l.topo.HostLANIf, second}, refresh, opts...)
	return second
}

// fullTunnelAttacker gives the host's WireGuard interface second
// (listening on port) a full-tunnel peer (AllowedIPs ::/0) in a namespace
// of its own, tag+"att", linked to the host by a veth (tag+"0" on the
// host) over ul's first two addresses (the host's, the attacker's). The
// host gets serverAddr on second; the attacker gets the client's IPv6
// address on its WireGuard interface and a route to serverAddr through
// it, so that what it sends from the client's address reaches pcpd over
// second.
func (l *lab) fullTunnelAttacker(t *testing.T, tag, second string, port int, ul netip.Prefix, serverAddr netip.Addr) *netlab.NS {
	t.Helper()
	hostUL, attUL := ul.Addr().Next(), ul.Addr().Next().Next()
	att := netlab.NewNS(t, tag+"att")
	if err := netlab.Veth(l.topo.Host, tag+"0", att, "ul0"); err != nil {
		t.Fatal(err)
	}
	l.topo.Host.MustRun(t, "ip", "addr", "add", netip.PrefixFrom(hostUL, ul.Bits()).String(), "dev", tag+"0")
	att.MustRun(t, "ip", "addr", "add", netip.PrefixFrom(attUL, ul.Bits()).String(), "dev", "ul0")
	l.topo.Host.MustRun(t, "ip", "addr", "add", serverAddr.String()+"/128", "dev", second, "nodad")
	attIf := netlab.UniqueIfName(tag + "a")
	cmd, err := netlab.DefaultWGCommand()
	if err != nil {
		t.Fatal(err)
	}
	if err := netlab.StartWireGuardDevice(att, attIf, cmd); err != nil {
		t.Fatal(err)
	}
	attKey, _ := wgtypes.GeneratePrivateKey()
	dev, err := l.wgc.Device(second)
	if err != nil {
		t.Fatal(err)
	}
	all := []net.IPNet{{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}}
	if err := l.wgc.ConfigureDevice(second, wgtypes.Config{Peers: []wgtypes.PeerConfig{{
		PublicKey: attKey.PublicKey(), ReplaceAllowedIPs: true, AllowedIPs: all,
	}}}); err != nil {
		t.Fatal(err)
	}
	keepalive := time.Second
	if err := l.wgc.ConfigureDevice(attIf, wgtypes.Config{PrivateKey: &attKey, Peers: []wgtypes.PeerConfig{{
		PublicKey: dev.PublicKey, Endpoint: net.UDPAddrFromAddrPort(netip.AddrPortFrom(hostUL, uint16(port))),
		PersistentKeepaliveInterval: &keepalive, ReplaceAllowedIPs: true, AllowedIPs: all,
	}}}); err != nil {
		t.Fatal(err)
	}
	att.MustRun(t, "ip", "link", "set", attIf, "mtu", "1420", "up")
	att.MustRun(t, "ip", "addr", "add", l.topo.ClientV6.String()+"/128", "dev", attIf, "nodad")
	att.MustRun(t, "ip", "-6", "route", "add", serverAddr.String()+"/128", "dev", attIf)
	return att
}

// TestProtectedHoles: the prefixes given to the firewall's guard are the
// owners' and the holes' (policy.Holes), at a full sweep and at the start
// of a periodic pass, and a hole that goes is no longer given (unless an
// owner has it). Fails with the holes left out of updateProtected.
func TestProtectedHoles(t *testing.T) {
	for _, sweep := range ownershipSweeps {
		t.Run(sweep.name, func(t *testing.T) {
			h := newHarness(t)
			own := &mutableOwnership{owners: map[policy.OwnerID][]netip.Prefix{
				"wg:A": {netip.MustParsePrefix("2001:db8:a::/48")},
			}}
			h.own = own
			h.start()
			for _, step := range []struct {
				holes []string
				want  []string
			}{
				{nil, []string{"2001:db8:a::/48"}},
				{[]string{"2001:db8:b::/64", "10.0.9.0/24"}, []string{"10.0.9.0/24", "2001:db8:a::/48", "2001:db8:b::/64"}},
				{[]string{"2001:db8:a:1::/64"}, []string{"2001:db8:a::/48", "2001:db8:a:1::/64"}},
				{nil, []string{"2001:db8:a::/48"}},
			} {
				own.mu.Lock()
				own.holes = nil
				for _, p := range step.holes {
					own.holes = append(own.holes, netip.MustParsePrefix(p))
				}
				own.mu.Unlock()
				h.s.sweepAt = 0 // a periodic step starts a pass
				sweep.run(h.s)
				got := slices.Clone(h.fw.Protected) // sweeps run here, synchronously
				if !slices.Equal(got, step.want) {
					t.Errorf("holes %v: protected %v, want %v", step.holes, got, step.want)
				}
			}
		})
	}
}
