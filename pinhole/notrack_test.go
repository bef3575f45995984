package pinhole_test

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/vishvananda/netlink"
)

// ctFlows lists the UDP conntrack entries of ns, both families.
func ctFlows(t *testing.T, ns *netlab.NS) []*netlink.ConntrackFlow {
	t.Helper()
	nh := nsNetlink(t, ns)
	defer nh.Close()
	var out []*netlink.ConntrackFlow
	for _, fam := range []netlink.InetFamily{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		flows, err := nh.ConntrackTableList(netlink.ConntrackTable, fam)
		if err != nil {
			t.Fatalf("conntrack list: %v", err)
		}
		for _, f := range flows {
			if f.Forward.Protocol == udp {
				out = append(out, f)
			}
		}
	}
	return out
}

// tracked reports whether ns's conntrack table holds a UDP flow whose
// original direction is src → dst (a zero port, or a zero dst, matches any).
func tracked(t *testing.T, ns *netlab.NS, src, dst netip.AddrPort) bool {
	t.Helper()
	for _, f := range ctFlows(t, ns) {
		s, _ := netip.AddrFromSlice(f.Forward.SrcIP)
		d, _ := netip.AddrFromSlice(f.Forward.DstIP)
		if s.Unmap() == src.Addr() && (!dst.IsValid() || d.Unmap() == dst.Addr()) &&
			(src.Port() == 0 || f.Forward.SrcPort == src.Port()) && (dst.Port() == 0 || f.Forward.DstPort == dst.Port()) {
			return true
		}
	}
	return false
}

// exchange sends one datagram from ns (from src:sport, or any source
// address and port when zero) to dst and waits for the echo.
func exchange(ns *netlab.NS, src netip.AddrPort, dst netip.AddrPort) error {
	return ns.Do(func() error {
		var local *net.UDPAddr
		if src.IsValid() {
			local = net.UDPAddrFromAddrPort(src)
		}
		c, err := net.DialUDP("udp", local, net.UDPAddrFromAddrPort(dst))
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(okWait))
		if _, err := c.Write([]byte("pcp")); err != nil {
			return err
		}
		buf := make([]byte, 64)
		n, err := c.Read(buf)
		if err != nil {
			return err
		}
		if string(buf[:n]) != "echo:pcp" {
			return fmt.Errorf("unexpected answer %q", buf[:n])
		}
		return nil
	})
}

// flushConntrack empties ns's conntrack table, so each case starts clean.
func flushConntrack(t *testing.T, ns *netlab.NS) {
	t.Helper()
	nh := nsNetlink(t, ns)
	defer nh.Close()
	if err := nh.ConntrackTableFlush(netlink.ConntrackTable); err != nil {
		t.Fatalf("conntrack flush: %v", err)
	}
}

// TestControlTrafficUntracked (notrack.go): in standalone mode pcpd's own
// requests (UDP to 5351 on an address of this host) and its answers from
// 5351 leave no conntrack entry, so spoofed requests cannot fill the
// table. Traffic to another port of the host, a client's request to an
// upstream PCP server (forwarded, masqueraded: it needs its entry) and a
// local client's request from an ephemeral port stay tracked, and the
// guard still guards.
func TestControlTrafficUntracked(t *testing.T) {
	topo, _ := guardedTopology(t, pinhole.Config{})
	// The host masquerades its clients' IPv4 towards the Internet, as a
	// router does: only a tracked flow is translated, and its answer only
	// finds its way back through the entry.
	loadNft(t, topo.Host, `table ip masq {
	chain post {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "wan0" masquerade
	}
}
`)
	ruleset := nftList(t, topo.Host, "table", "inet", "pcpd")
	for _, want := range []string{
		"type filter hook prerouting priority raw; policy accept;",
		"udp dport 5351 fib daddr type local goto control_local",
		"chain control_local {\n\t\tnotrack\n\t}",
		"type filter hook output priority raw; policy accept;",
		"udp sport 5351 notrack",
	} {
		if !strings.Contains(ruleset, want) {
			t.Errorf("pcpd's table lacks %q:\n%s", want, ruleset)
		}
	}

	for _, fam := range []struct {
		name                 string
		host, client, remote netip.Addr
	}{
		{"ipv6", topo.HostTunnelV6, topo.ClientV6, topo.InternetV6},
		{"ipv4", topo.HostTunnelV4, topo.ClientV4, topo.InternetV4},
	} {
		t.Run(fam.name, func(t *testing.T) {
			pcp := netip.AddrPortFrom(fam.host, 5351)
			other := netip.AddrPortFrom(fam.host, 5352)
			upstream := netip.AddrPortFrom(fam.remote, 5351)

			// What pcpd sends unsolicited from its port (ANNOUNCE) is not
			// tracked; nor is the client's answer to it, to pcpd's port.
			t.Run("unsolicited from pcpd's port", func(t *testing.T) {
				flushConntrack(t, topo.Host)
				announce := netip.AddrPortFrom(fam.client, 5350)
				topo.Client.ServeUDPEcho(t, announce.String())
				if err := exchange(topo.Host, pcp, announce); err != nil {
					t.Fatalf("%v → %v: %v", pcp, announce, err)
				}
				if tracked(t, topo.Host, pcp, netip.AddrPort{}) || tracked(t, topo.Host, announce, pcp) {
					t.Errorf("datagrams between %v and %v tracked; table:\n%s", pcp, announce, flowList(t, topo.Host))
				}
			})

			topo.Host.ServeUDPEcho(t, pcp.String())
			topo.Host.ServeUDPEcho(t, other.String())
			topo.Internet.ServeUDPEcho(t, upstream.String())
			for _, tc := range []struct {
				name    string
				from    *netlab.NS
				src     netip.AddrPort // zero: any
				dst     netip.AddrPort
				tracked bool
			}{
				{"request to pcpd", topo.Client, netip.AddrPortFrom(fam.client, 40001), pcp, false},
				{"request from pcpd's own port number", topo.Client, netip.AddrPortFrom(fam.client, 5351), pcp, false},
				{"another port of the host", topo.Client, netip.AddrPortFrom(fam.client, 40002), other, true},
				{"client to an upstream PCP server (forwarded)", topo.Client, netip.AddrPortFrom(fam.client, 40003), upstream, true},
				{"local PCP client to upstream", topo.Host, netip.AddrPort{}, upstream, true},
			} {
				t.Run(tc.name, func(t *testing.T) {
					flushConntrack(t, topo.Host)
					if err := exchange(tc.from, tc.src, tc.dst); err != nil {
						t.Fatalf("%v → %v: %v", tc.src, tc.dst, err)
					}
					src := tc.src
					if !src.IsValid() {
						src = netip.AddrPortFrom(fam.host, 0)
						if tc.dst.Addr() == fam.remote {
							src = netip.AddrPortFrom(topo.HostPublicV4, 0)
							if fam.name == "ipv6" {
								src = netip.AddrPortFrom(topo.HostWANV6, 0)
							}
						}
					}
					if got := tracked(t, topo.Host, src, tc.dst); got != tc.tracked {
						t.Errorf("%v → %v tracked: %v, want %v; table:\n%s", src, tc.dst, got, tc.tracked, flowList(t, topo.Host))
					}
					// The answer from 5351 is not tracked as a flow of its own.
					if tc.dst == pcp && tracked(t, topo.Host, pcp, netip.AddrPort{}) {
						t.Errorf("pcpd's answer from %v tracked; table:\n%s", pcp, flowList(t, topo.Host))
					}
				})
			}
		})
	}

	// A client may know its gateway by its link-local address (the IPv6
	// default router): fib counts it as local too.
	t.Run("ipv6 link-local", func(t *testing.T) {
		var ll netip.Addr
		if err := netlab.Eventually(okWait, func() error {
			out, err := topo.Host.Run("ip", "-6", "-o", "addr", "show", "dev", topo.HostLANIf, "scope", "link")
			if err != nil || strings.Contains(out, "tentative") {
				return fmt.Errorf("no usable link-local address yet: %q, %v", out, err)
			}
			f := strings.Fields(out)
			for i := range f[:len(f)-1] {
				if f[i] == "inet6" {
					ll = netip.MustParsePrefix(f[i+1]).Addr()
				}
			}
			if !ll.IsValid() {
				return fmt.Errorf("no link-local address in %q", out)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		pcp := netip.AddrPortFrom(ll, 5351)
		topo.Host.ServeUDPEcho(t, netip.AddrPortFrom(ll.WithZone(topo.HostLANIf), 5351).String())
		flushConntrack(t, topo.Host)
		if err := netlab.Eventually(okWait, func() error {
			return exchange(topo.Client, netip.AddrPort{}, netip.AddrPortFrom(ll.WithZone(topo.ClientIf), 5351))
		}); err != nil {
			t.Fatalf("→ %v: %v", pcp, err)
		}
		for _, f := range ctFlows(t, topo.Host) {
			if d, _ := netip.AddrFromSlice(f.Forward.DstIP); d == ll || f.Forward.SrcPort == 5351 {
				t.Errorf("request to %v or its answer tracked; table:\n%s", pcp, flowList(t, topo.Host))
			}
		}
	})

	// The guard still guards forwarded traffic: an unopened port of the
	// client stays closed, an answer to the client's own flow passes.
	serve(t, topo.Client, udp, netip.AddrPortFrom(topo.ClientV6, 7000))
	mustNotReach(t, "no pinhole", topo.Internet, udp, netip.Addr{}, netip.AddrPortFrom(topo.ClientV6, 7000))
	serve(t, topo.Internet, udp, netip.AddrPortFrom(topo.InternetV6, 7001))
	mustReach(t, "client's own flow", topo.Client, udp, netip.Addr{}, netip.AddrPortFrom(topo.InternetV6, 7001))
}

func flowList(t *testing.T, ns *netlab.NS) string {
	var b strings.Builder
	for _, f := range ctFlows(t, ns) {
		fmt.Fprintf(&b, "\t%s\n", f)
	}
	return b.String()
}

// TestTrackControl: with Config.TrackControl Setup installs no notrack
// rules and removes those an earlier run installed (turning the setting
// off must not leave pcpd's traffic untracked); the meter keeps its chains
// when it is on, and without it there are none; the table stays pcpd's
// either way. Attached mode installs none.
func TestTrackControl(t *testing.T) {
	ns := netlab.NewNS(t, "track")
	meter := pinhole.Meter{Rate: 100, Burst: 200}
	b := newBackend(t, ns, pinhole.Config{})
	if got := nftList(t, ns, "table", "inet", "pcpd"); !strings.Contains(got, "control_in") || !strings.Contains(got, "notrack_out") {
		t.Fatalf("default Setup: no raw chains:\n%s", got)
	}
	for _, tc := range []struct {
		name  string
		cfg   pinhole.Config
		want  []string // in the table
		notIn []string
	}{
		{"no meter", pinhole.Config{TrackControl: true}, nil, []string{"notrack", "control_", "priority raw"}},
		{"meter", pinhole.Config{TrackControl: true, Meter: meter},
			[]string{"fib daddr type local goto control_local", "update @meter6", "update @meter4"}, []string{"notrack"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tracking := newBackend(t, ns, tc.cfg) // a fresh Backend: checks ownership
			got := nftList(t, ns, "table", "inet", "pcpd")
			for _, w := range tc.want {
				if !strings.Contains(got, w) {
					t.Errorf("TrackControl Setup: table lacks %q:\n%s", w, got)
				}
			}
			for _, w := range tc.notIn {
				if strings.Contains(got, w) {
					t.Errorf("TrackControl Setup left %q:\n%s", w, got)
				}
			}
			if err := tracking.Healthy(); err != nil {
				t.Errorf("Healthy with TrackControl: %v", err)
			}
		})
	}
	// The first Backend notices its chains are gone, and puts them back.
	if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
		t.Errorf("Healthy without the raw chains: %v, want ErrUnhealthy", err)
	}
	if err := b.Setup(); err != nil {
		t.Fatalf("Setup after TrackControl: %v", err)
	}
	if err := b.Healthy(); err != nil {
		t.Errorf("Healthy after Setup: %v", err)
	}
	if err := b.Teardown(); err != nil {
		t.Fatalf("Teardown: %v", err)
	}

	// Attached: nothing of it in the admin's table.
	loadNft(t, ns, "table inet filter {\n\tchain pcpd {\n\t}\n}\n")
	newBackend(t, ns, pinhole.Config{Table: "filter", Attached: true, Meter: meter})
	if got := nftList(t, ns, "ruleset"); strings.Contains(got, "notrack") || strings.Contains(got, "priority raw") || strings.Contains(got, "meter") {
		t.Errorf("attached Setup installed raw chains:\n%s", got)
	}
}

// TestControlChainsUpgrade: a table an older pcpd made, with the meter in
// an input chain of its own and the notrack rule in notrack_in, is still
// pcpd's, and Setup replaces both by the control chains in one step: no
// datagram is metered or untracked twice, and nothing of the old layout is
// left for Healthy to miss.
func TestControlChainsUpgrade(t *testing.T) {
	ns := netlab.NewNS(t, "upgrade")
	cfg := pinhole.Config{Meter: pinhole.Meter{Rate: 20, Burst: 40}}
	newBackend(t, ns, cfg)
	// The older layout (pcpd before the control chains), sets as they were.
	ns.MustRun(t, "nft", "delete chain inet pcpd control_in; delete chain inet pcpd control_local")
	loadNft(t, ns, `table inet pcpd {
	chain input {
		type filter hook input priority filter; policy accept;
		udp dport 5351 update @meter6 { ip6 saddr & ffff:ffff:ffff:ffff:: timeout 10s limit rate over 20/second burst 40 packets } drop
		udp dport 5351 update @meter4 { ip saddr timeout 10s limit rate over 20/second burst 40 packets } drop
	}
	chain notrack_in {
		type filter hook prerouting priority raw; policy accept;
		udp dport 5351 fib daddr type local notrack
	}
}
`)
	b := newBackend(t, ns, cfg) // a fresh Backend: ownership must accept the old chains
	got := nftList(t, ns, "table", "inet", "pcpd")
	for _, gone := range []string{"chain input", "notrack_in", "hook input"} {
		if strings.Contains(got, gone) {
			t.Errorf("after Setup the old layout's %q is left:\n%s", gone, got)
		}
	}
	for _, want := range []string{"goto control_local", "update @meter6", "notrack"} {
		if !strings.Contains(got, want) {
			t.Errorf("after Setup the table lacks %q:\n%s", want, got)
		}
	}
	if err := b.Healthy(); err != nil {
		t.Errorf("Healthy after the upgrade: %v", err)
	}
	if err := b.Teardown(); err != nil {
		t.Fatalf("Teardown: %v", err)
	}
	if got := nftList(t, ns, "ruleset"); strings.Contains(got, "pcpd") {
		t.Errorf("Teardown left:\n%s", got)
	}
}

// nsNetlink is a netlink handle in ns (the caller closes it).
func nsNetlink(t *testing.T, ns *netlab.NS) *netlink.Handle {
	t.Helper()
	h, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close() // the netlink handle keeps its own socket in ns
	nh, err := netlink.NewHandleAt(h)
	if err != nil {
		t.Fatal(err)
	}
	return nh
}
