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

// TestE2EWireGuardDeviceSwapWithinBound (issue 9, h/swapev; the window
// h/fresh left): the served WireGuard interface is deleted and created
// again under its name, as wg-quick down/up does, with other peers, and
// the new device's client asks for mappings at once from the addresses
// the old device gave to its peer. Every such request is judged by a
// view read no more than --wireguard-fresh before it arrived (h/fresh),
// and a view read before the swap within that bound judged it by the old
// device: the request from the client's address was the old peer's. Here
// the bound stands for any: the ownership is read once, at the start (no
// periodic, miss or keeping read for an hour), so the requests come
// within the bound of that read whatever the box's speed. The link events
// the listener follows (the interface gone, back on a new index) must
// make that view unusable for any request that opens a pinhole: they
// wait for a read of the new device.
//
// Judged by the kernel's pinholes and the lease list:
//   - the new device's peer has a full tunnel (::/0, 0.0.0.0/0: it owns
//     nothing, but WireGuard takes any source from it): its PCP MAP from
//     the client's IPv6 address and NAT-PMP mapping from its IPv4 address
//     must be refused, NOT_AUTHORIZED, no pinhole;
//   - the new device gives the client's AllowedIPs to a new key (the
//     client's device replaced): granted, in the new key's name.
func TestE2EWireGuardDeviceSwapWithinBound(t *testing.T) {
	for _, tc := range []struct {
		name  string
		full  bool // the new peer's AllowedIPs: a full tunnel, else the old peer's
		owned bool
	}{
		{"new peer with a full tunnel owns nothing", true, false},
		{"new key with the old peer's AllowedIPs", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t)
			l.useWireGuard(t, []string{l.topo.HostLANIf}, time.Hour, policy.WithMissInterval(time.Hour), policy.WithFreshBound(time.Hour))
			newKey := l.swapHostWireGuard(t, tc.full)
			wantOwner := ""
			if tc.owned {
				wantOwner = "wg:" + newKey.PublicKey().String()
			}
			l.checkNewDevice(t, "from the new device, judged by the view read before the swap", wantOwner)
		})
	}
}

// swapHostWireGuard re-creates the host's WireGuard interface
// (recreateHostWireGuard) with one new peer, whose AllowedIPs are a full
// tunnel (full: it owns nothing) or the client's prefixes, and gives the
// client's device the new peer's key, which it returns, and the new
// device's port.
func (l *lab) swapHostWireGuard(t *testing.T, full bool) wgtypes.Key {
	t.Helper()
	newKey, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	allowed := []net.IPNet{ipnet(l.topo.ClientPrefix6), ipnet(l.topo.ClientPrefix4)}
	if full {
		allowed = []net.IPNet{ipnet(netip.MustParsePrefix("::/0")), ipnet(netip.MustParsePrefix("0.0.0.0/0"))}
	}
	port := l.recreateHostWireGuard(t, wgtypes.PeerConfig{PublicKey: newKey.PublicKey(), ReplaceAllowedIPs: true, AllowedIPs: allowed})
	if err := l.wgc.ConfigureDevice(l.topo.ClientIf, wgtypes.Config{PrivateKey: &newKey, Peers: []wgtypes.PeerConfig{{
		PublicKey: l.topo.HostKey.PublicKey(), UpdateOnly: true,
		Endpoint: &net.UDPAddr{IP: net.ParseIP("10.99.0.1"), Port: port},
	}}}); err != nil {
		t.Fatal(err)
	}
	return newKey
}

// checkNewDevice waits until the host's WireGuard interface is served
// and its tunnel up (an ANNOUNCE is answered with no ownership read),
// then asks, from the client, a PCP MAP of [ClientV6]:8080 and a NAT-PMP
// TCP mapping of port 9300 (from ClientV4): with wantOwner "" both must
// be refused, NOT_AUTHORIZED, with no kernel pinhole; else granted, one
// pinhole each, leases in wantOwner's name. what says when.
func (l *lab) checkNewDevice(t *testing.T, what, wantOwner string) {
	t.Helper()
	cli6, cli4 := l.topo.ClientV6, l.topo.ClientV4
	ann := pcp.AppendRequest(nil, pcp.NewAnnounce(cli6))
	if err := netlab.Eventually(20*time.Second, func() error {
		_, err := l.exchangeTries(netip.AddrPortFrom(cli6, 0), l.server6(), ann, 1)
		return err
	}); err != nil {
		t.Fatalf("the device is not served: ANNOUNCE: %v", err)
	}
	resp := l.pcp(mapReq(cli6, pcp.ProtoTCP, 8080, 0, time.Hour, 1))
	out, err := l.exchangeTries(netip.AddrPort{}, l.server4(), pcp.AppendPMPRequest(nil, &pcp.PMPRequest{
		Opcode: pcp.PMPOpMapTCP, InternalPort: 9300, Lifetime: time.Hour,
	}), pcpTries)
	if err != nil {
		t.Fatalf("NAT-PMP: %v", err)
	}
	var pr pcp.PMPResponse
	if err := pcp.ParsePMPResponse(out, &pr); err != nil {
		t.Fatalf("NAT-PMP reply % x: %v", out, err)
	}
	wantPCP, wantPMP, wantHoles := pcp.Success, pcp.PMPSuccess, 1
	if wantOwner == "" {
		wantPCP, wantPMP, wantHoles = pcp.NotAuthorized, pcp.PMPNotAuthorized, 0
	}
	pinholes := map[netip.AddrPort]int{}
	for _, e := range l.kernelHoles() {
		pinholes[netip.AddrPortFrom(e.Pinhole.InternalAddr, e.Pinhole.InternalPort)]++
	}
	owners := map[netip.AddrPort]string{}
	for _, le := range l.srv.Leases() {
		owners[netip.AddrPortFrom(le.InternalAddr, le.InternalPort)] = le.Owner
	}
	for _, c := range []struct {
		what      string
		ap        netip.AddrPort
		got, want string
	}{
		{"PCP MAP", netip.AddrPortFrom(cli6, 8080), resp.Result.String(), wantPCP.String()},
		{"NAT-PMP TCP mapping", netip.AddrPortFrom(cli4, 9300), pr.Result.String(), wantPMP.String()},
	} {
		if c.got != c.want || pinholes[c.ap] != wantHoles || owners[c.ap] != wantOwner {
			t.Errorf("%s of %v %s: %s, kernel pinholes %d, lease owner %q; want %s, %d, %q",
				c.what, c.ap, what, c.got, pinholes[c.ap], owners[c.ap], c.want, wantHoles, wantOwner)
		}
	}
}

// useWireGuard restarts l's server serving ifaces, with an ownership of
// them made with refresh and opts (the lab's own, re-read every 200 ms,
// is left unused).
func (l *lab) useWireGuard(t *testing.T, ifaces []string, refresh time.Duration, opts ...policy.WireGuardOption) {
	t.Helper()
	l.stop()
	wg, err := policy.NewWireGuard(l.wgc, ifaces, refresh, l.log.Named("wgown"), opts...)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	go wg.Run(ctx)
	l.wg = wg
	if l.pol, err = policy.New(policy.Config{}, wg); err != nil {
		t.Fatal(err)
	}
	l.cfg.Interfaces = ifaces
	l.start()
}

// recreateHostWireGuard deletes the host's WireGuard interface and
// creates it again under its name, as wg-quick does (device, key, peers,
// then link up and addresses), with peer as its one peer. The new device
// listens on another port (the old wireguard-go may not have let its port
// go yet), which it returns.
func (l *lab) recreateHostWireGuard(t *testing.T, peer wgtypes.PeerConfig) int {
	t.Helper()
	l.topo.Host.MustRun(t, "ip", "link", "del", l.topo.HostLANIf)
	port := l.topo.HostWGPort + 1
	if err := l.topo.RecreateHostWireGuard(peer, port); err != nil {
		t.Fatal(err)
	}
	return port
}
