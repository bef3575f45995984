package pinhole_test

import (
	"net/netip"
	"regexp"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestGuardDropsHostOwnSource: the guard's local-source rule (layout:
// "ip6 saddr != @protected6 fib saddr type 2-4 counter drop" in guard6,
// type local among them) drops a datagram from the WAN whose source is
// one of the host's own addresses (one of no protected prefix, which the
// protected-source rules leave alone) through
// a pinhole, standalone and attached, and through an IPv4 NAPT mapping
// (DNAT-ed before the guard) with accept_local=1; the Internet's own
// address passes. With accept_local=0, the default, the kernel's routing
// drops the IPv4 one itself as martian (the last case checks that it
// does, whatever the guard). Then the upgrade: an older pcpd's guard (the
// rule deleted) passes the spoof, Healthy says so, and Setup writes the
// rule back. Without the rule (h/peerend's probe) the spoofed datagram of
// the first three cases arrived on the fresh layout.
func TestGuardDropsHostOwnSource(t *testing.T) {
	own6 := netip.MustParseAddr("2001:db8:1:9::1") // the host's, on lan0, in no protected prefix
	for _, tc := range []struct {
		name        string
		attached    bool
		v4          bool
		acceptLocal bool // net.ipv4.conf.*.accept_local=1 on the host
	}{
		{"standalone ipv6 pinhole", false, false, false},
		{"attached ipv6 pinhole", true, false, false},
		{"standalone ipv4 NAPT, accept_local", false, true, true},
		{"standalone ipv4 NAPT, the kernel drops it", false, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			topo, b, table, guard := guardBed(t, tc.attached, tc.v4)
			serveTunnel(t, b, topo)
			topo.Host.MustRun(t, "ip", "addr", "add", own6.String()+"/128", "dev", topo.HostLANIf, "nodad")
			if err := b.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
				t.Fatal(err)
			}
			// IPv4: the host's LAN address, outside the client's /32.
			dst, real, spoofed, rx := spoofTarget(t, topo, b, tc.v4, own6, topo.HostTunnelV4)
			check := func(step string, spoofPasses bool) {
				t.Helper()
				if err := eventuallyOneWay(t, topo.Internet, real, dst, rx); err != nil {
					t.Fatalf("%s: a datagram from %v through %v: %v", step, real, dst, err)
				}
				if got := oneWay(t, topo.Internet, spoofed, dst, rx); got != spoofPasses {
					t.Fatalf("%s: a datagram from the WAN claiming the host's own %v arrived through %v: %v, want %v\n%s",
						step, spoofed, dst, got, spoofPasses, nftList(t, topo.Host, "chain", "inet", table, guard))
				}
			}
			if tc.acceptLocal {
				topo.Host.MustRun(t, "sh", "-c", "for f in /proc/sys/net/ipv4/conf/*/accept_local; do echo 1 > $f; done")
			}
			check("fresh layout", false)
			if tc.v4 && !tc.acceptLocal {
				return
			}
			ruleRE := regexp.MustCompile(`fib saddr type 2-4 counter packets ([0-9]+) .*# handle (\d+)`)
			out := topo.Host.MustRun(t, "nft", "-a", "list", "chain", "inet", table, guard)
			m := ruleRE.FindStringSubmatch(out)
			if m == nil || m[1] == "0" {
				t.Fatalf("the local-source rule is missing or counted no drop:\n%s", out)
			}
			topo.Host.MustRun(t, "nft", "delete", "rule", "inet", table, guard, "handle", m[2])
			check("older layout", true)
			tamperNoticedAndRepaired(t, topo.Host, b, "the guard without the local-source rule", nil)
			check("after Setup", false)
		})
	}
}

// TestGuardDropsHostAnycastBroadcastSource (review h/revspoof2): the
// local-source rule drops the host's other addresses of its own too, the
// ones a route lookup does not call "local": an IPv6 subnet-router
// anycast address (the kernel joins one for every prefix of a forwarding
// interface; here the WAN's 2001:db8:ffff::, "anycast" in the local
// table) and an IPv4 subnet broadcast address (the tunnel's 10.100.0.255)
// with rp_filter=0, the kernel's default, whose martian check looks for
// the host's interface addresses only. With h/spoofsrc's rule ("fib
// saddr type local") both passed a pinhole (IPv6) or a NAPT mapping
// (IPv4) from the WAN to the client: the client's answer goes to the
// host (its anycast address, its broadcast), which takes it as its own.
// Then h/spoofsrc's layout: its rule passes the spoof, Healthy says so,
// and Setup writes this one back. The last row: a protected source the
// host holds, which the local-source rule skips, is still dropped (by
// the reverse-path rule) with accept_local=1.
func TestGuardDropsHostAnycastBroadcastSource(t *testing.T) {
	for _, tc := range []struct {
		name    string
		v4      bool
		spoofed netip.Addr
		// protected: the spoofed address is in a protected prefix too
		// (and accept_local=1): the reverse-path rule drops it, the
		// local-source rule skips it; no older-layout step.
		protected bool
	}{
		{"ipv6 pinhole, the WAN prefix's subnet-router anycast", false, netip.MustParseAddr("2001:db8:ffff::"), false},
		{"ipv4 NAPT, the tunnel subnet's broadcast, rp_filter=0", true, netip.MustParseAddr("10.100.0.255"), false},
		{"ipv4 NAPT, the host's tunnel address, protected, accept_local", true, netip.MustParseAddr("10.100.0.1"), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			topo := netlab.NewTopology(t, netlab.TopologyOptions{})
			b := newBackend(t, topo.Host, pinhole.Config{})
			serveTunnel(t, b, topo)
			protected := []netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}
			if tc.protected {
				protected = append(protected, netip.PrefixFrom(tc.spoofed, tc.spoofed.BitLen()))
				topo.Host.MustRun(t, "sh", "-c", "for f in /proc/sys/net/ipv4/conf/*/accept_local; do echo 1 > $f; done")
			}
			if err := b.SetProtected(protected); err != nil {
				t.Fatal(err)
			}
			topo.Host.MustRun(t, "sh", "-c", "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done")
			guard := "guard6"
			if tc.v4 {
				guard = "guard4"
			}
			dst, real, spoofed, rx := spoofTarget(t, topo, b, tc.v4, tc.spoofed, tc.spoofed)
			check := func(step string, spoofPasses bool) {
				t.Helper()
				if err := eventuallyOneWay(t, topo.Internet, real, dst, rx); err != nil {
					t.Fatalf("%s: a datagram from %v through %v: %v", step, real, dst, err)
				}
				if got := oneWay(t, topo.Internet, spoofed, dst, rx); got != spoofPasses {
					t.Fatalf("%s: a datagram from the WAN claiming the host's %v arrived through %v: %v, want %v\n%s",
						step, spoofed, dst, got, spoofPasses, nftList(t, topo.Host, "chain", "inet", "pcpd", guard))
				}
			}
			check("fresh layout", false)
			if tc.protected {
				return
			}
			ruleRE := regexp.MustCompile(`fib saddr type 2-4 counter packets ([0-9]+) .*# handle (\d+)`)
			out := topo.Host.MustRun(t, "nft", "-a", "list", "chain", "inet", "pcpd", guard)
			m := ruleRE.FindStringSubmatch(out)
			if m == nil || m[1] == "0" {
				t.Fatalf("the local-source rule is missing or counted no drop:\n%s", out)
			}
			topo.Host.MustRun(t, "nft", "replace", "rule", "inet", "pcpd", guard, "handle", m[2], "fib", "saddr", "type", "local", "counter", "drop")
			check("h/spoofsrc's layout", true)
			tamperNoticedAndRepaired(t, topo.Host, b, "the guard with h/spoofsrc's local-source rule", nil)
			check("after Setup", false)
		})
	}
}

// TestGuardLocalSourceSparesProtected (review h/revspoof2): the
// local-source rule leaves the protected sources to the rules above it,
// which already drop a protected source the host holds (its route is
// local: "fib saddr . iif oif 0"). A route lookup calls a source
// "anycast" when it is the prefix address of a route without a gateway
// (ipv6_anycast_destination), such as 2001:db8:1:4:: of a client prefix
// routed "dev lan1": with the rule applying to every source, a client
// sending from it was dropped (15 of 15 datagrams, counted by the rule),
// where h/spoofsrc's "type local" passed it. The host's own address in
// that prefix is still dropped, whatever rule counts it.
func TestGuardLocalSourceSparesProtected(t *testing.T) {
	for _, tc := range []struct {
		name   string
		src    netip.Addr
		passes bool
	}{
		{"the prefix address of a client prefix routed without a gateway", netip.MustParseAddr("2001:db8:1:4::"), true},
		{"the host's own address in the client prefix", netip.MustParseAddr("2001:db8:1:4::1"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			topo := netlab.NewTopology(t, netlab.TopologyOptions{})
			b := newBackend(t, topo.Host, pinhole.Config{})
			lan2 := netlab.NewNS(t, "rsz")
			if err := netlab.Veth(lan2, "eth0", topo.Host, "lan1"); err != nil {
				t.Fatal(err)
			}
			prefix := netip.MustParsePrefix("2001:db8:1:4::/64")
			topo.Host.MustRun(t, "ip", "-6", "addr", "add", "fe80::1/64", "dev", "lan1", "nodad")
			topo.Host.MustRun(t, "ip", "-6", "addr", "add", "2001:db8:1:4::1/128", "dev", "lan1", "nodad")
			topo.Host.MustRun(t, "ip", "-6", "route", "add", prefix.String(), "dev", "lan1")
			lan2.MustRun(t, "ip", "addr", "add", netip.PrefixFrom(tc.src, 64).String(), "dev", "eth0", "nodad")
			lan2.MustRun(t, "ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
			setServed(t, b, []string{topo.HostLANIf, topo.HostWANIf, "lan1"}, topo.HostTunnelV6, topo.HostTunnelV4)
			if err := b.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4, prefix}); err != nil {
				t.Fatal(err)
			}
			dst := netip.AddrPortFrom(topo.ClientV6, 7000)
			apply(t, b, install(pinhole.Pinhole{Protocol: udp, InternalAddr: dst.Addr(), InternalPort: dst.Port()}, time.Minute))
			rx := listenUDP(t, topo.Client, dst)
			// The Internet's datagram first: the pinhole is in place.
			if err := eventuallyOneWay(t, topo.Internet, topo.InternetV6, dst, rx); err != nil {
				t.Fatal(err)
			}
			var got bool
			if tc.passes {
				got = eventuallyOneWay(t, lan2, tc.src, dst, rx) == nil
			} else {
				got = oneWay(t, lan2, tc.src, dst, rx)
			}
			if got != tc.passes {
				t.Fatalf("a datagram from %v (lan1) through the pinhole to %v arrived: %v, want %v\n%s",
					tc.src, dst, got, tc.passes, nftList(t, topo.Host, "chain", "inet", "pcpd", "guard6"))
			}
		})
	}
}
