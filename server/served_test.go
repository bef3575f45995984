package server

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
)

// TestE2EServedFollowsListener: the firewall's served sets (pinhole's
// notrack.go: the addresses whose datagrams to pcpd's port are metered
// and untracked) hold what the listener serves, follow an address added
// to and removed from the serving interface and the interface going down
// and up, and are restored by the tamper watch when flushed. With them,
// a request to pcpd leaves no conntrack entry (the whole path: listener,
// server, sets, raw chains).
func TestE2EServedFollowsListener(t *testing.T) {
	l := newLab(t)
	t.Run("requests untracked", func(t *testing.T) {
		ns, err := l.topo.Host.Handle()
		if err != nil {
			t.Fatal(err)
		}
		defer ns.Close()
		nh, err := netlink.NewHandleAt(ns)
		if err != nil {
			t.Fatal(err)
		}
		defer nh.Close()
		for _, c := range []netip.Addr{l.topo.ClientV6, l.topo.ClientV4} {
			if resp := l.pcp(pcp.NewAnnounce(c)); resp.Result != pcp.Success {
				t.Fatalf("ANNOUNCE from %v: %v", c, resp.Result)
			}
		}
		for _, fam := range []netlink.InetFamily{netlink.FAMILY_V4, netlink.FAMILY_V6} {
			flows, err := nh.ConntrackTableList(netlink.ConntrackTable, fam)
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range flows {
				if f.Forward.DstPort == Port || f.Forward.SrcPort == Port {
					t.Errorf("pcpd's request or answer tracked: %s", f)
				}
			}
		}
	})
	extra := netip.MustParseAddr("2001:db8:1::7")
	host := l.topo.Host
	for _, step := range []struct {
		name  string
		do    []string // a command in the host namespace
		has   []netip.Addr
		lacks []netip.Addr
	}{
		{"started", nil, []netip.Addr{l.topo.HostTunnelV6, l.topo.HostTunnelV4}, []netip.Addr{l.topo.HostWANV6, l.topo.HostPublicV4}},
		{"address added", []string{"ip", "addr", "add", extra.String() + "/128", "dev", l.topo.HostLANIf, "nodad"}, []netip.Addr{extra}, nil},
		{"address removed", []string{"ip", "addr", "del", extra.String() + "/128", "dev", l.topo.HostLANIf}, nil, []netip.Addr{extra}},
		{"served6 flushed", []string{"nft", "flush", "set", "inet", "pcpd", "served6"}, []netip.Addr{l.topo.HostTunnelV6}, nil},
		{"served4 flushed", []string{"nft", "flush", "set", "inet", "pcpd", "served4"}, []netip.Addr{l.topo.HostTunnelV4}, nil},
		{"interface down", []string{"ip", "link", "set", l.topo.HostLANIf, "down"}, nil, []netip.Addr{l.topo.HostTunnelV6, l.topo.HostTunnelV4}},
		{"interface up", []string{"ip", "link", "set", l.topo.HostLANIf, "up"}, []netip.Addr{l.topo.HostTunnelV4}, nil},
	} {
		if step.do != nil {
			host.MustRun(t, step.do...)
		}
		var got, listening []netip.Addr
		if err := netlab.Eventually(5*time.Second, func() error {
			listening = listening[:0]
			for _, ap := range l.srv.Status().Listen {
				listening = append(listening, ap.Addr().WithZone(""))
			}
			slices.SortFunc(listening, netip.Addr.Compare)
			listening = slices.Compact(listening)
			var err error
			if got, err = l.fw.Served(); err != nil {
				return err
			}
			if !slices.Equal(got, listening) {
				return fmt.Errorf("served sets %v, listening on %v", got, listening)
			}
			for _, a := range step.has {
				if !slices.Contains(got, a) {
					return fmt.Errorf("served sets %v lack %v", got, a)
				}
			}
			for _, a := range step.lacks {
				if slices.Contains(got, a) {
					return fmt.Errorf("served sets %v hold %v", got, a)
				}
			}
			return nil
		}); err != nil {
			t.Fatalf("%s: %v", step.name, err)
		}
		t.Logf("%s: served %v", step.name, got)
	}
	t.Run("tentative address left out until DAD completes", func(t *testing.T) {
		// Served while in duplicate address detection (the socket binds
		// with IP_FREEBIND), but without a local route the kernel would
		// forward datagrams to it: they must stay tracked and unmetered
		// until DAD completes (review of 2026-12-03). DAD here takes
		// dad_transmits x 1 s.
		// WireGuard interfaces (IFF_NOARP) skip DAD: a veth pair of the
		// host's own, served from a restart on.
		const dadIf = "tdad0"
		tent := netip.MustParseAddr("2001:db8:7::9")
		host.MustRun(t, "ip", "link", "add", dadIf, "type", "veth", "peer", "name", "tdad1")
		t.Cleanup(func() { _, _ = host.Run("ip", "link", "del", dadIf) })
		host.MustRun(t, "sysctl", "-qw", "net.ipv6.conf."+dadIf+".accept_dad=1")
		host.MustRun(t, "sysctl", "-qw", "net.ipv6.conf."+dadIf+".dad_transmits=4")
		host.MustRun(t, "ip", "link", "set", "tdad1", "up")
		host.MustRun(t, "ip", "link", "set", dadIf, "up")
		l.stop()
		l.cfg.Interfaces = append(l.cfg.Interfaces, dadIf)
		l.start()
		host.MustRun(t, "ip", "addr", "add", tent.String()+"/64", "dev", dadIf)
		listens := func() bool {
			for _, ap := range l.srv.Status().Listen {
				if ap.Addr().WithZone("") == tent {
					return true
				}
			}
			return false
		}
		if err := netlab.Eventually(2*time.Second, func() error {
			if !listens() {
				return fmt.Errorf("not yet listening on %v", tent)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if got, err := l.fw.Served(); err != nil {
			t.Fatal(err)
		} else if slices.Contains(got, tent) {
			t.Fatalf("served sets %v hold %v while it is tentative", got, tent)
		}
		if err := netlab.Eventually(10*time.Second, func() error {
			got, err := l.fw.Served()
			if err != nil {
				return err
			}
			if !slices.Contains(got, tent) {
				return fmt.Errorf("served sets %v lack %v after DAD", got, tent)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		t.Logf("%v in the served sets %v after pcpd listened on it", tent, time.Since(start).Round(time.Millisecond))
	})
}
