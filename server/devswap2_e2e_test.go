package server

import (
	"errors"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestE2EWireGuardTwoSwapsInOnePass (issue 9, h/swap2; h/swapev left it
// untried): the served WireGuard interface is deleted and created again
// twice, the second swap landing inside one listener pass: after the
// pass read the middle device's index (want) and reported it
// (DevicesChanged, which the ownership answers with a read of the middle
// device), before the pass opens its sockets. Each device gives the
// client's addresses to another key: the first to the client's own, the
// middle one to a second key, the newest one to a third, a full tunnel
// that owns nothing (the client's device now has that key). The pass is
// held at those two points by the listener's test hook (the window is
// microseconds wide), everything else is real: wireguard-go, netlink,
// nftables, the client's requests through the tunnel.
//
// What must hold, judged by the kernel's pinholes and the lease list:
//   - a PCP MAP from the client's address sent right after that pass
//     opened its sockets (before the pass that reports the newest
//     device) is not granted: no view of the middle device, gone by
//     then, judges it;
//   - once served, the newest device's full-tunnel peer is refused MAP
//     and NAT-PMP (NOT_AUTHORIZED, no pinhole): pcpd serves the newest
//     device, no restart;
//   - the client's lease of before the swaps (its first key's) loses its
//     pinhole (the reads after the swaps find its key gone).
func TestE2EWireGuardTwoSwapsInOnePass(t *testing.T) {
	l := newLab(t)
	host := l.topo.HostLANIf
	first := hostIndex(t, l, host)
	var (
		mu               sync.Mutex
		armed, held      bool
		atOpen, atOpened = make(chan struct{}), make(chan struct{})
		goOpen, goOpened = make(chan struct{}), make(chan struct{})
	)
	wait := func(c chan struct{}) {
		select {
		case <-c:
		case <-t.Context().Done():
		}
	}
	l.tweak = func(s *Server) {
		s.lis.hook = func(stage string, want map[netip.AddrPort]link) {
			mu.Lock()
			hold := false
			switch {
			case stage == "open" && armed && !held:
				for ap, w := range want {
					if w.kname == host && w.index != first && ap.Addr() == l.topo.HostTunnelV6 {
						held, hold = true, true
						break
					}
				}
				if hold {
					t.Logf("pass held with %v", want)
					close(atOpen)
					mu.Unlock()
					wait(goOpen)
					return
				}
			case stage == "opened" && held && atOpened != nil:
				close(atOpened)
				atOpened = nil
				mu.Unlock()
				wait(goOpened)
				return
			}
			mu.Unlock()
		}
	}
	l.useWireGuard(t, []string{host}, time.Hour, policy.WithMissInterval(time.Hour), policy.WithFreshBound(time.Hour))
	opened := atOpened

	// The client's lease before the swaps, in its first key's name.
	cli6 := l.topo.ClientV6
	if r := l.pcp(mapReq(cli6, pcp.ProtoTCP, 8181, 0, time.Hour, 2)); r.Result != pcp.Success {
		t.Fatalf("MAP before the swaps: %v", r.Result)
	}
	before := netip.AddrPortFrom(cli6, 8181)

	// First swap: the middle device gives the client's prefixes to k2.
	k2, _ := wgtypes.GeneratePrivateKey()
	k3, _ := wgtypes.GeneratePrivateKey()
	mu.Lock()
	armed = true
	mu.Unlock()
	l.recreateHostWireGuard(t, wgtypes.PeerConfig{PublicKey: k2.PublicKey(), ReplaceAllowedIPs: true,
		AllowedIPs: []net.IPNet{ipnet(l.topo.ClientPrefix6), ipnet(l.topo.ClientPrefix4)}})
	select {
	case <-atOpen:
	case <-time.After(20 * time.Second):
		t.Fatal("no listener pass served the middle device")
	}
	if err := netlab.Eventually(10*time.Second, func() error {
		for _, o := range l.wg.Owners() {
			if o.ID == policy.OwnerID("wg:"+k2.PublicKey().String()) {
				return nil
			}
		}
		return errNotYet
	}); err != nil {
		t.Fatal("the ownership did not read the middle device after the pass reported it")
	}

	// Second swap, inside the held pass: the newest device gives k3 a
	// full tunnel; the client's device takes k3.
	l.topo.Host.MustRun(t, "ip", "link", "del", host)
	port := l.topo.HostWGPort + 2
	if err := l.topo.RecreateHostWireGuard(wgtypes.PeerConfig{PublicKey: k3.PublicKey(), ReplaceAllowedIPs: true,
		AllowedIPs: []net.IPNet{ipnet(netip.MustParsePrefix("::/0")), ipnet(netip.MustParsePrefix("0.0.0.0/0"))}}, port); err != nil {
		t.Fatal(err)
	}
	if err := l.wgc.ConfigureDevice(l.topo.ClientIf, wgtypes.Config{PrivateKey: &k3, Peers: []wgtypes.PeerConfig{{
		PublicKey: l.topo.HostKey.PublicKey(), UpdateOnly: true,
		Endpoint: &net.UDPAddr{IP: net.ParseIP("10.99.0.1"), Port: port},
	}}}); err != nil {
		t.Fatal(err)
	}
	close(goOpen)
	wait(opened)

	// The held pass has opened what it opens: a request now.
	out, err := l.exchangeTries(netip.AddrPortFrom(cli6, 0), l.server6(), pcp.AppendRequest(nil, mapReq(cli6, pcp.ProtoTCP, 8080, 0, time.Hour, 1)), 4)
	got := "no answer"
	if err == nil {
		var resp pcp.Response
		if perr := pcp.ParseResponse(out, &resp); perr != nil {
			t.Fatalf("reply % x: %v", out, perr)
		}
		got = resp.Result.String()
	}
	ap := netip.AddrPortFrom(cli6, 8080)
	holes, owner := l.holesAt(ap), l.ownerAt(ap)
	close(goOpened)
	t.Logf("in the window: %s (%v), kernel pinholes %d, lease owner %q", got, err, holes, owner)
	if got == pcp.Success.String() || holes != 0 || owner != "" {
		t.Errorf("PCP MAP of %v right after the pass that reported the middle device opened its sockets (the newest device there): %s, kernel pinholes %d, lease owner %q; want no answer or NOT_AUTHORIZED, 0, \"\"",
			ap, got, holes, owner)
	}
	l.checkNewDevice(t, "from the newest device's full-tunnel peer", "")
	l.waitHoleGone(t, "the client's lease of before the swaps (its first key, on no device now)", before)
}

// errNotYet is an Eventually condition's "not yet".
var errNotYet = errors.New("not yet")

// hostIndex is the index of the host's interface name.
func hostIndex(t *testing.T, l *lab, name string) int {
	t.Helper()
	ns, err := l.topo.Host.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	lnk, err := h.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	return lnk.Attrs().Index
}

// holesAt counts the kernel's pinholes to ap; ownerAt is the owner of
// the lease of ap ("" none).
func (l *lab) holesAt(ap netip.AddrPort) int {
	n := 0
	for _, e := range l.kernelHoles() {
		if netip.AddrPortFrom(e.Pinhole.InternalAddr, e.Pinhole.InternalPort) == ap {
			n++
		}
	}
	return n
}

func (l *lab) ownerAt(ap netip.AddrPort) string {
	for _, le := range l.srv.Leases() {
		if netip.AddrPortFrom(le.InternalAddr, le.InternalPort) == ap {
			return le.Owner
		}
	}
	return ""
}

// waitHoleGone waits (up to 15 s: not a bound, a test's patience) for
// the kernel's pinholes and the lease of ap to go, and logs how long it
// took.
func (l *lab) waitHoleGone(t *testing.T, what string, ap netip.AddrPort) {
	t.Helper()
	start := time.Now()
	if err := netlab.Eventually(15*time.Second, func() error {
		if l.holesAt(ap) > 0 || l.ownerAt(ap) != "" {
			return errNotYet
		}
		return nil
	}); err != nil {
		t.Errorf("%s: %v still has %d kernel pinholes, lease owner %q, 15 s on", what, ap, l.holesAt(ap), l.ownerAt(ap))
		return
	}
	t.Logf("%s: pinholes of %v gone %v after the check began", what, ap, time.Since(start).Round(time.Millisecond))
}

// TestE2EWireGuardLinkLocalServedAfterSwap (h/swap2): the served
// WireGuard interface created again under its name (wg-quick down/up)
// has a new link-local address; the first listener pass that wants it
// must serve it. Its socket was bound with the address's zone as the
// interface name, which Go resolves in a process-wide cache refreshed
// at most once a minute while the name is in it: the old device's
// index, gone, so the bind failed (ENODEV) at every pass until the
// cache's minute was over, and clients reaching pcpd at the link-local
// address (an IPv6 default router's) got nothing meanwhile. Judged in
// the listener's own sockets at the end of each pass (its test hook).
func TestE2EWireGuardLinkLocalServedAfterSwap(t *testing.T) {
	l := newLab(t)
	host := l.topo.HostLANIf
	first := hostIndex(t, l, host)
	var (
		mu     sync.Mutex
		passes []string // per pass wanting the new link-local address: "served" or "not served"
	)
	l.restartWith(func(s *Server) {
		s.lis.hook = func(stage string, want map[netip.AddrPort]link) {
			if stage != "opened" {
				return
			}
			for ap, w := range want {
				if w.kname != host || w.index == first || !ap.Addr().IsLinkLocalUnicast() {
					continue
				}
				c, ok := s.lis.conns[ap] // the hook runs under the listener's mu
				mu.Lock()
				if ok && c.index == w.index {
					passes = append(passes, "served")
				} else {
					passes = append(passes, "not served")
				}
				mu.Unlock()
			}
		}
	})
	l.swapHostWireGuard(t, false)
	if err := netlab.Eventually(10*time.Second, func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(passes) == 0 {
			return errNotYet
		}
		return nil
	}); err != nil {
		t.Fatal("no pass wanted the new device's link-local address")
	}
	mu.Lock()
	defer mu.Unlock()
	if passes[0] != "served" {
		t.Errorf("the first pass that wanted the new device's link-local address: %s (passes so far: %v)", passes[0], passes)
	}
}
