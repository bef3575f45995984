package server

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestE2EThirdPartyDeleteWhileHeld (review rev3p of fa5083f): the lab's
// client peer is also a peer of a second served WireGuard interface,
// holding 2001:db8:77::/48 there, and maps a THIRD_PARTY target in it
// from its own address on the first interface (the same peer on several
// interfaces is one owner). The second interface is then deleted and
// held for --wireguard-gone-grace: the lease, its pinhole and Lookup
// stay. While held, a new THIRD_PARTY MAP toward the held prefix is
// refused (NOT_AUTHORIZED: fa5083f, table.ownsOnSome), but the client's
// delete of its own lease (lifetime 0) must succeed and close the
// pinhole: it opens nothing, and the lease it ends is keyed by the
// requester's own owner. With fa5083f alone the delete is refused
// (NOT_AUTHORIZED) and the pinhole stays open until the grace ends, or,
// if the interface comes back with the same peers, until the lease
// expires.
func TestE2EThirdPartyDeleteWhileHeld(t *testing.T) {
	l := newLab(t)
	pfx := netip.MustParsePrefix("2001:db8:77::/48")
	second := l.serveSecondWGWith(t, "rv3h", 51893, 200*time.Millisecond, []wgtypes.PeerConfig{{
		PublicKey:  l.topo.ClientKey.PublicKey(),
		AllowedIPs: []net.IPNet{{IP: pfx.Addr().AsSlice(), Mask: net.CIDRMask(pfx.Bits(), 128)}},
	}}, policy.WithGoneGrace(time.Hour))

	c := l.topo.ClientV6
	target := netip.MustParseAddr("2001:db8:77::5")
	tpReq := func(port uint16, lifetime time.Duration) *pcp.Request {
		r := mapReq(c, pcp.ProtoTCP, port, 0, lifetime, 1)
		r.Options.ThirdParty = target
		return r
	}
	pinholes := func(port uint16) int {
		n := 0
		for _, e := range l.kernelHoles() {
			if e.Pinhole.InternalAddr == target && e.Pinhole.InternalPort == port {
				n++
			}
		}
		return n
	}
	leases := func(port uint16) int {
		n := 0
		for _, le := range l.srv.Leases() {
			if le.InternalAddr == target && le.InternalPort == port {
				n++
			}
		}
		return n
	}
	if resp := l.pcp(tpReq(8443, time.Hour)); resp.Result != pcp.Success {
		t.Fatalf("THIRD_PARTY MAP of %v with %s there: %v, want SUCCESS", target, second, resp.Result)
	}
	if n, k := leases(8443), pinholes(8443); n != 1 || k != 1 {
		t.Fatalf("after the MAP: %d leases, %d pinholes of %v:8443, want 1 and 1", n, k, target)
	}

	l.topo.Host.MustRun(t, "ip", "link", "del", second)
	held := policy.Request{Source: c, Iface: l.topo.HostLANIf, Target: target, ThirdParty: true, Protocol: 6, InternalPort: 8443}
	if err := netlab.Eventually(10*time.Second, func() error {
		if _, r := l.pol.Authorize(held); r != policy.NotOwned {
			return fmt.Errorf("THIRD_PARTY %v: %v, want not-owned once %s is held", target, r, second)
		}
		if _, ok := l.wg.Lookup(target); !ok {
			return errors.New("the held prefix owns nothing in Lookup: not held but gone")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if n, k := leases(8443), pinholes(8443); n != 1 || k != 1 {
		t.Fatalf("%s held: %d leases, %d pinholes of %v:8443, want 1 and 1 (kept for the grace)", second, n, k, target)
	}
	for _, s := range []struct {
		name     string
		port     uint16
		lifetime time.Duration
		want     pcp.ResultCode
		leases   int // of target:port after the request
	}{
		{"new MAP toward the held prefix", 9443, time.Hour, pcp.NotAuthorized, 0},
		{"delete of the client's own lease", 8443, 0, pcp.Success, 0},
	} {
		resp := l.pcp(tpReq(s.port, s.lifetime))
		if resp.Result != s.want {
			t.Errorf("%s (THIRD_PARTY %v:%d, lifetime %v, %s held): %v, want %v", s.name, target, s.port, s.lifetime, second, resp.Result, s.want)
		}
		if n, k := leases(s.port), pinholes(s.port); n != s.leases || k != s.leases {
			t.Errorf("%s: %d leases, %d pinholes of %v:%d left, want %d", s.name, n, k, target, s.port, s.leases)
		}
	}
}
