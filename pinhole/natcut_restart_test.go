package pinhole_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/pcpd/pcpd/pinhole"
)

// TestNATCutRestartAfterUpgrade (review h/revnatcut, finding 2): a flow
// DNAT-ed by an unlabelled DNAT rule (a table laid out before natcut)
// outlives the upgrade's first Setup, which finds the rule unlabelled
// (CutsFlows false for the DNAT kinds: the server waits for its walk),
// and then a second pcpd start: its Setup finds the labelled layout the
// first wrote, and on h/dnatcut CutsFlows was true again while the
// unlabelled flow still lived, so its mapping's delete was answered
// without the walk and the flow carried data after it (up to ctWalkGap
// plus a walk; for good with pcpd dead at the lease's end). Now the first
// Setup of a Backend over an existing table also asks conntrack: a flow
// DNAT-ed to a protected address without the table's label keeps
// CutsFlows false; once no such flow is left, the next start cuts again.
// On h/dnatcut the "second start" row says true.
func TestNATCutRestartAfterUpgrade(t *testing.T) {
	topo, b := guardedTopology(t, pinhole.Config{})
	m := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV4, InternalPort: 7810, ExternalAddr: topo.HostPublicV4, ExternalPort: 17810}
	r := pinhole.Pinhole{Protocol: tcp, InternalAddr: topo.ClientV6, InternalPort: 7843, ExternalPort: 7880}
	cuts := func(step string, nb *pinhole.Backend, want bool) {
		t.Helper()
		for _, p := range []pinhole.Pinhole{m, r} {
			if got := nb.CutsFlows(p); got != want {
				t.Errorf("%s: CutsFlows(%v) = %v, want %v", step, p, got, want)
			}
		}
	}
	unlabelDNAT(t, topo.Host, "napt4") // the table as main laid it out
	apply(t, b, install(m, time.Hour))
	f := openEchoVia(t, tcp, topo.Client, netip.AddrPortFrom(m.InternalAddr, m.InternalPort), topo.Internet,
		netip.AddrPortFrom(topo.InternetV4, 47810), netip.AddrPortFrom(m.ExternalAddr, m.ExternalPort))
	cuts("upgrade", newBackend(t, topo.Host, pinhole.Config{}), false)
	nb := newBackend(t, topo.Host, pinhole.Config{})
	cuts("second start, the unlabelled flow alive", nb, false)
	apply(t, nb, del(m))
	if err := f.echo(okWait); err != nil {
		t.Errorf("the unlabelled flow: %v; want it to go on (only the walk ends it: the server must wait for it)", err)
	}
	if err := topo.Host.Do(func() error { return netlink.ConntrackTableFlush(netlink.ConntrackTable) }); err != nil {
		t.Fatal(err)
	}
	cuts("third start, no unlabelled flow left", newBackend(t, topo.Host, pinhole.Config{}), true)
}
