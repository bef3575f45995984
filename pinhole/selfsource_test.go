package pinhole_test

import (
	"context"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestServedSourceDropped (RELIABILITY.md, the leftover of the review of
// the interface comparisons): a request to pcpd whose source is one of the
// addresses pcpd serves, arriving on any interface but loopback, is
// dropped in control_local, before the owner rules. The host's own address
// inside an owner's prefix (here the LAN address, inside the client's
// /64) passed the owner chain unlooked from the owner's interface (the
// reverse-path rule's interfaces skip the route lookup, which would have
// dropped it), was charged to the owner, and pcpd's answer went to the
// host itself, at a port the sender chose: a datagram to the host's own
// services from the host's own address and pcpd's port. No such request
// is real: the answer can never reach its sender. The host's own requests
// (over loopback) still arrive.
func TestServedSourceDropped(t *testing.T) {
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	b := meteredTunnel(t, topo, nil)
	owners := []pinhole.Owner{{ID: "static:client", Prefixes: []netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}}}
	if err := b.SetOwners(owners, nil); err != nil {
		t.Fatal(err)
	}
	if !topo.ClientPrefix6.Contains(topo.HostTunnelV6) {
		t.Fatalf("the host's %v is not inside the owner's %v", topo.HostTunnelV6, topo.ClientPrefix6)
	}
	chain := pinhole.OwnerChains(owners)["static:client"]
	if out := nftList(t, topo.Host, "chain", "inet", "pcpd", chain); !strings.Contains(out, `iif != "`+topo.HostLANIf+`" fib saddr . iif oif 0`) {
		t.Fatalf("the owner chain does not pass %s unlooked:\n%s", topo.HostLANIf, out)
	}
	dst := netip.AddrPortFrom(topo.HostTunnelV6, 5351)
	srv := countUDP(t, topo.Host, dst)

	// The client spoofs the host's address (bound with IPV6_FREEBIND: the
	// address is not the client's).
	send := func(ns *netlab.NS, src netip.Addr, n int, freebind bool) int64 {
		t.Helper()
		before := srv.settle()
		if err := ns.Do(func() error {
			lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
				var serr error
				if err := rc.Control(func(fd uintptr) {
					if freebind {
						serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_FREEBIND, 1)
					}
				}); err != nil {
					return err
				}
				return serr
			}}
			pc, err := lc.ListenPacket(context.Background(), "udp6", netip.AddrPortFrom(src, 0).String())
			if err != nil {
				return err
			}
			defer pc.Close()
			for range n {
				if _, err := pc.WriteTo(make([]byte, 60), net.UDPAddrFromAddrPort(dst)); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			t.Fatalf("send from %v: %v", src, err)
		}
		return srv.settle() - before
	}
	if n := send(topo.Client, topo.HostTunnelV6, 20, true); n != 0 {
		t.Errorf("20 from the host's own %v, spoofed on %s: socket got %d, want none", topo.HostTunnelV6, topo.HostLANIf, n)
	}
	if out := nftList(t, topo.Host, "chain", "inet", "pcpd", "control_local"); !strings.Contains(out, "ip6 saddr @served6 ip6 saddr != fe80::/10 iif != \"lo\" counter packets 20 ") {
		t.Errorf("control_local should have counted 20 drops:\n%s", out)
	}
	// The client's own requests still arrive, and so do the host's own,
	// over loopback, from the same served address.
	if n := send(topo.Client, topo.ClientV6, 20, false); n != 20 {
		t.Errorf("20 from the client's %v: socket got %d, want all", topo.ClientV6, n)
	}
	if n := send(topo.Host, topo.HostTunnelV6, 5, false); n != 5 {
		t.Errorf("5 from the host itself, from %v over loopback: socket got %d, want all", topo.HostTunnelV6, n)
	}
	// A link-local address another link's host may share with one of
	// ours (here: served as if the host had the client's own): still
	// answered, through the interface it came in on.
	var ll netip.Addr
	if err := topo.Client.Do(func() error {
		ifi, err := net.InterfaceByName(topo.ClientIf)
		if err != nil {
			return err
		}
		addrs, err := ifi.Addrs()
		if err != nil {
			return err
		}
		for _, a := range addrs {
			if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().IsLinkLocalUnicast() {
				// By index: net's zone cache is the process's, not the
				// namespace's.
				ll = p.Addr().WithZone(strconv.Itoa(ifi.Index))
			}
		}
		return nil
	}); err != nil || !ll.IsValid() {
		t.Fatalf("the client's link-local address: %v, %v", ll, err)
	}
	setServed(t, b, []string{topo.HostLANIf}, topo.HostTunnelV6, topo.HostTunnelV4, ll.WithZone(""))
	if n := send(topo.Client, ll, 5, false); n != 5 {
		t.Errorf("5 from the link-local %v, served on the host too: socket got %d, want all", ll, n)
	}
	if err := b.Healthy(); err != nil {
		t.Fatalf("Healthy: %v", err)
	}
}
