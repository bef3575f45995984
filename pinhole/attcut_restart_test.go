package pinhole_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestCutRestartAfterUpgradePinholeFlow (review h/revattcut, finding 2;
// the pinhole kinds' TestNATCutRestartAfterUpgrade): a flow an IPv6
// pinhole admitted under a layout without labels (main's attached one;
// standalone, one before cutflows.go) outlives the upgrade's first Setup,
// which finds the admission rules unlabelled (CutsFlows false), and then
// a second start: its Setup finds the labelled layout the first wrote,
// and CutsFlows was true again while the unlabelled flow lived, so its
// pinhole's delete was answered without the walk and the flow carried
// data after it (until the walk; with pcpd dead after the lease's end,
// for good). Now the first Setup over a laid-out table also asks
// conntrack (pinFlowsUnlabelled): an IPv6 flow to a protected address,
// not DNAT-ed, not ICMPv6, without the Backend's bit keeps CutsFlows
// false; with no such flow left the next start cuts again. On h/attcut
// both rows' "second start" says true.
func TestCutRestartAfterUpgradePinholeFlow(t *testing.T) {
	for _, attached := range []bool{true, false} {
		name := map[bool]string{true: "attached", false: "standalone"}[attached]
		t.Run(name, func(t *testing.T) {
			topo := netlab.NewTopology(t, netlab.TopologyOptions{})
			cfg := pinhole.Config{}
			if attached {
				loadNft(t, topo.Host, adminRuleset)
				cfg = pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd"}
			}
			pin := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: 7700}
			// The layout before the labels, a pinhole and its flow.
			conn, err := topo.Host.NftConn()
			if err != nil {
				t.Fatal(err)
			}
			ocfg := cfg
			ocfg.Routes = nsRoutes(t, topo.Host)
			old, err := pinhole.New(conn, ocfg)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(old.Close)
			pinhole.RefuseLabels(old)
			if err := old.Setup(); err != nil {
				t.Fatal(err)
			}
			serveTunnel(t, old, topo)
			if err := old.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
				t.Fatal(err)
			}
			apply(t, old, install(pin, time.Hour))
			f := openEcho(t, tcp, topo.Client, topo.Internet, netip.AddrPortFrom(topo.InternetV6, 47700),
				netip.AddrPortFrom(pin.InternalAddr, pin.InternalPort))
			old.Close()

			if got := newBackend(t, topo.Host, cfg).CutsFlows(pin); got {
				t.Errorf("upgrade: CutsFlows = true")
			}
			nb := newBackend(t, topo.Host, cfg)
			if got := nb.CutsFlows(pin); got {
				t.Errorf("second start, the unlabelled flow alive: CutsFlows = true")
			}
			apply(t, nb, del(pin))
			if err := f.echo(okWait); err != nil {
				t.Errorf("the unlabelled flow: %v; want it to go on (only the walk ends it: the server must wait for it)", err)
			}
			if err := topo.Host.Do(func() error { return netlink.ConntrackTableFlush(netlink.ConntrackTable) }); err != nil {
				t.Fatal(err)
			}
			if got := newBackend(t, topo.Host, cfg).CutsFlows(pin); !got {
				t.Errorf("third start, no unlabelled flow left: CutsFlows = false")
			}
		})
	}
}

// TestCutRestartHostOwnFlow: pinFlowsUnlabelled counts flows a guard could
// have admitted, not the host's own: a connection from the host's own
// address to a client (output, never through a guard, never labelled)
// alive at a restart over the labelled layout keeps CutsFlows true. Before
// the local-source check it said false (every pinhole delete waiting for
// the walk for the Backend's life).
func TestCutRestartHostOwnFlow(t *testing.T) {
	topo, b := guardedTopology(t, pinhole.Config{})
	pin := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: 7750}
	apply(t, b, install(pin, time.Hour))
	f := openEcho(t, tcp, topo.Client, topo.Host, netip.AddrPortFrom(topo.HostTunnelV6, 47750),
		netip.AddrPortFrom(topo.ClientV6, 7751))
	if err := f.echo(okWait); err != nil {
		t.Fatal(err)
	}
	if got := newBackend(t, topo.Host, pinhole.Config{}).CutsFlows(pin); !got {
		t.Errorf("restart with the host's own flow to a client: CutsFlows = false")
	}
}
