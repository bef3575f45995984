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
// requests (UDP to 5351 on an address it serves) and its answers from
// 5351 leave no conntrack entry, so spoofed requests cannot fill the
// table. Traffic to another port of the host, to 5351 on an address of
// the host pcpd does not serve (no socket of pcpd's gets it), a client's
// request to an upstream PCP server (forwarded, masqueraded: it needs its
// entry) and a local client's request from an ephemeral port stay
// tracked, and the guard still guards.
func TestControlTrafficUntracked(t *testing.T) {
	topo, b := guardedTopology(t, pinhole.Config{}) // serving on the tunnel addresses
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
		"udp dport 5351 ip6 daddr @served6 iifname @serving_ifs goto control_local",
		"udp dport 5351 ip daddr @served4 iifname @serving_ifs goto control_local",
		"chain control_local {\n\t\tip6 saddr @served6 ip6 saddr != fe80::/10 iif != \"lo\" counter packets 0 bytes 0 drop\n" +
			"\t\tip6 saddr @served6 iif != \"lo\" fib saddr . iif type local counter packets 0 bytes 0 drop\n" +
			"\t\tip saddr @served4 iif != \"lo\" counter packets 0 bytes 0 drop\n\t\tnotrack\n\t}",
		"type filter hook output priority raw; policy accept;",
		"udp sport 5351 notrack",
	} {
		if !strings.Contains(ruleset, want) {
			t.Errorf("pcpd's table lacks %q:\n%s", want, ruleset)
		}
	}

	for _, fam := range []struct {
		name                      string
		host, wan, client, remote netip.Addr
	}{
		{"ipv6", topo.HostTunnelV6, topo.HostWANV6, topo.ClientV6, topo.InternetV6},
		{"ipv4", topo.HostTunnelV4, topo.HostPublicV4, topo.ClientV4, topo.InternetV4},
	} {
		t.Run(fam.name, func(t *testing.T) {
			pcp := netip.AddrPortFrom(fam.host, 5351)
			other := netip.AddrPortFrom(fam.host, 5352)
			unserved := netip.AddrPortFrom(fam.wan, 5351)
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
			topo.Host.ServeUDPEcho(t, unserved.String())
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
				// Local, but not served: as any closed port of the host
				// (under "fib daddr type local" it was untracked).
				{"pcpd's port on an address it does not serve", topo.Client, netip.AddrPortFrom(fam.client, 40004), unserved, true},
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
	// default router): the listener serves it like the others (without
	// its zone in the set).
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
		setServed(t, b, []string{topo.HostLANIf}, topo.HostTunnelV6, topo.HostTunnelV4, ll.WithZone(topo.HostLANIf))
		topo.Host.ServeUDPEcho(t, netip.AddrPortFrom(ll.WithZone(topo.Host.Zone(t, topo.HostLANIf)), 5351).String())
		flushConntrack(t, topo.Host)
		if err := netlab.Eventually(okWait, func() error {
			return exchange(topo.Client, netip.AddrPort{}, netip.AddrPortFrom(ll.WithZone(topo.Client.Zone(t, topo.ClientIf)), 5351))
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
			[]string{"ip6 daddr @served6 iifname @serving_ifs goto control_local", "ip daddr @served4 iifname @serving_ifs goto control_local", "update @meter6", "update @meter4"},
			[]string{"notrack", "fib daddr"}},
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

// TestControlChainsUpgrade: a table an older pcpd made is still pcpd's,
// and Setup replaces its control layout in one step: no datagram is
// metered or untracked twice, and nothing of the old layout is left for
// Healthy to miss. Layouts: the meter in an input chain of its own and
// the notrack rule in notrack_in (before the control chains); control_in
// matching "fib daddr type local", without the served sets (before
// 2026-12-03).
func TestControlChainsUpgrade(t *testing.T) {
	cfg := pinhole.Config{Meter: pinhole.Meter{Rate: 20, Burst: 40}}
	for _, tc := range []struct {
		name string
		old  func(t *testing.T, ns *netlab.NS) // turns a current table into the old layout
		gone []string
	}{
		{"input and notrack_in chains", func(t *testing.T, ns *netlab.NS) {
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
		}, []string{"chain input", "notrack_in", "hook input", "fib daddr"}},
		{"fib daddr type local, no served sets", func(t *testing.T, ns *netlab.NS) {
			// (control_local's rules that use the sets go too: Setup
			// writes them again.)
			ns.MustRun(t, "nft", "flush chain inet pcpd control_in; flush chain inet pcpd control_local; "+
				"delete set inet pcpd served6; delete set inet pcpd served4; "+
				"add rule inet pcpd control_in udp dport 5351 fib daddr type local goto control_local")
		}, []string{"fib daddr"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := netlab.NewNS(t, "upgrade")
			newBackend(t, ns, cfg)
			tc.old(t, ns)
			if got := nftList(t, ns, "table", "inet", "pcpd"); !strings.Contains(got, tc.gone[0]) {
				t.Fatalf("the old layout lacks %q:\n%s", tc.gone[0], got)
			}
			b := newBackend(t, ns, cfg) // a fresh Backend: ownership must accept the old layout
			got := nftList(t, ns, "table", "inet", "pcpd")
			for _, gone := range tc.gone {
				if strings.Contains(got, gone) {
					t.Errorf("after Setup the old layout's %q is left:\n%s", gone, got)
				}
			}
			for _, want := range []string{"set served6 {", "set served4 {", "udp dport 5351 ip6 daddr @served6 iifname @serving_ifs goto control_local",
				"udp dport 5351 ip daddr @served4 iifname @serving_ifs goto control_local", "update @meter6", "notrack"} {
				if !strings.Contains(got, want) {
					t.Errorf("after Setup the table lacks %q:\n%s", want, got)
				}
			}
			if err := b.Healthy(); err != nil {
				t.Errorf("Healthy after the upgrade: %v", err)
			}
			setServed(t, b, []string{"wg0"}, netip.MustParseAddr("2001:db8::1"))
			if err := b.Healthy(); err != nil {
				t.Errorf("Healthy after SetServed: %v", err)
			}
			if err := b.Teardown(); err != nil {
				t.Fatalf("Teardown: %v", err)
			}
			if got := nftList(t, ns, "ruleset"); strings.Contains(got, "pcpd") {
				t.Errorf("Teardown left:\n%s", got)
			}
		})
	}
}

// TestServedSets: the served sets hold exactly the last SetServed (zones
// and IPv4-mapped forms folded, duplicates once), follow additions and
// removals, survive a restart's Setup until the new process gives its
// own, and tampering with them is noticed by Healthy and repaired by
// Setup: a flushed set would leave pcpd's requests tracked and unmetered,
// an added address would untrack datagrams the host may forward.
func TestServedSets(t *testing.T) {
	ns := netlab.NewNS(t, "served")
	cfg := pinhole.Config{Meter: pinhole.Meter{Rate: 200}}
	b := newBackend(t, ns, cfg)
	a6, b6 := netip.MustParseAddr("2001:db8:1::1"), netip.MustParseAddr("2001:db8:2::1")
	a4, b4 := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("198.51.100.1")
	ll := netip.MustParseAddr("fe80::1")
	steps := []struct {
		name  string
		given []netip.Addr
		want  []netip.Addr // sorted
	}{
		{"first", []netip.Addr{a6, a4}, []netip.Addr{a4, a6}},
		{"address added", []netip.Addr{a6, a4, b6, ll.WithZone("wg0")}, []netip.Addr{a4, a6, b6, ll}},
		{"address removed", []netip.Addr{b6, ll.WithZone("wg0"), a4}, []netip.Addr{a4, b6, ll}},
		{"duplicates and mapped", []netip.Addr{b4, netip.AddrFrom16(b4.As16()), a6, a6}, []netip.Addr{b4, a6}},
		{"interface gone", nil, nil},
		{"back", []netip.Addr{a6, b4}, []netip.Addr{b4, a6}},
	}
	for _, st := range steps {
		setServed(t, b, []string{"wg0", "lan0"}, st.given...)
		if got := mustServed(t, b); fmt.Sprint(got) != fmt.Sprint(st.want) {
			t.Errorf("%s: served sets hold %v, want %v", st.name, got, st.want)
		}
		if err := b.Healthy(); err != nil {
			t.Errorf("%s: Healthy: %v", st.name, err)
		}
	}
	want := mustServed(t, b)
	if err := b.SetServed([]netip.Addr{{}}, nil); !errors.Is(err, pinhole.ErrInvalid) {
		t.Errorf("SetServed of the zero Addr: %v, want ErrInvalid", err)
	}

	// A restart: the new Backend's Setup keeps what the sets hold.
	b = newBackend(t, ns, cfg)
	if got := mustServed(t, b); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("after a restart's Setup: %v, want %v kept", got, want)
	}
	setServed(t, b, []string{"wg0", "lan0"}, want...)

	cmd := func(c string) func() string { return func() string { return c } }
	for _, tamperCmd := range []func() string{
		cmd("flush set inet pcpd served6"),
		cmd("flush set inet pcpd served4"),
		cmd("delete element inet pcpd served6 { 2001:db8:1::1 }"),
		cmd("add element inet pcpd served4 { 203.0.113.9 }"),
		cmd("flush chain inet pcpd control_in"),
		// The handle as of now: each repair rewrites the rules.
		func() string {
			return "delete rule inet pcpd control_in handle " + ruleHandle(t, ns, "control_in", "@served4")
		},
	} {
		tamper := tamperCmd()
		ns.MustRun(t, "nft", tamper)
		if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
			t.Errorf("nft %s: Healthy %v, want ErrUnhealthy (served %v)", tamper, err, mustServed(t, b))
			continue
		}
		if err := b.Setup(); err != nil {
			t.Fatalf("Setup after nft %s: %v", tamper, err)
		}
		if err := b.Healthy(); err != nil {
			t.Errorf("Healthy after repairing nft %s: %v", tamper, err)
		}
		if got := mustServed(t, b); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("after repairing nft %s: served %v, want %v", tamper, got, want)
		}
	}

	// Attached: no served address sets (SetServed records the addresses),
	// but the guards' serving interfaces, pcpd_serving_ifs, written and
	// checked as standalone.
	loadNft(t, ns, "table inet filter {\n\tchain pcpd {\n\t}\n}\n")
	att := newBackend(t, ns, pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd", Meter: cfg.Meter})
	setServed(t, att, []string{"wg0"}, a6, a4)
	if err := att.Healthy(); err != nil {
		t.Errorf("attached Healthy after SetServed: %v", err)
	}
	if got := nftList(t, ns, "table", "inet", "filter"); strings.Contains(got, "served6") || strings.Contains(got, "served4") {
		t.Errorf("attached: served address sets in the admin's table:\n%s", got)
	}
	ifsHeld := func() string { return nftList(t, ns, "set", "inet", "filter", "pcpd_serving_ifs") }
	if got := ifsHeld(); !strings.Contains(got, `"lo"`) || !strings.Contains(got, `"wg0"`) {
		t.Errorf("attached: pcpd_serving_ifs lacks lo or wg0:\n%s", got)
	}
	ns.MustRun(t, "nft", "flush set inet filter pcpd_serving_ifs")
	if err := att.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
		t.Errorf("attached, pcpd_serving_ifs flushed: Healthy %v, want ErrUnhealthy", err)
	}
	if err := att.Setup(); err != nil {
		t.Fatalf("attached Setup: %v", err)
	}
	if got := ifsHeld(); !strings.Contains(got, `"wg0"`) {
		t.Errorf("attached: pcpd_serving_ifs not repaired:\n%s", got)
	}
}

func mustServed(t *testing.T, b *pinhole.Backend) []netip.Addr {
	t.Helper()
	got, err := b.Served()
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// ruleHandle is the handle of the first rule of chain containing what, as
// "nft -a" lists it ("" when none: the delete then fails).
func ruleHandle(t *testing.T, ns *netlab.NS, chain, what string) string {
	t.Helper()
	out, err := ns.Run("nft", "-a", "list", "chain", "inet", "pcpd", chain)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(out, "\n") {
		if i := strings.LastIndex(line, "# handle "); i >= 0 && strings.Contains(line, what) {
			return strings.TrimSpace(line[i+len("# handle "):])
		}
	}
	return ""
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
