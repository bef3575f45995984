package pinhole_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pinhole"
)

// TestSetupSeesFlowLetInAfterItsRead (root; issue 9, review h/revleft9's
// left item): a Setup on its own (a start) read conntrack for flows a
// damaged layout let in unlabelled right before it took the Backend's
// lock, and wrote the layout after: a connection let in between (here
// right before the layout transaction, through guard6 flushed while no
// pcpd ran: the forward chain's accept) was not in the read. Setup said
// CutsFlows true and marked recheck6 checked (a later start trusts the
// mark), yet the ruleset never cuts that connection (no label): after its
// pinhole's delete it carried data. Now a Setup on its own reads once the
// layout is written (VerifySetup, without the lock): every such flow came
// before. Fails without the fix: "CutsFlows true after the start, yet the
// connection let in unlabelled before its layout carries data after its
// pinhole's delete", "recheck6 marked checked".
func TestSetupSeesFlowLetInAfterItsRead(t *testing.T) {
	for _, proto := range []uint8{tcp, udp} {
		t.Run(protoName(proto), func(t *testing.T) {
			topo, b := guardedTopology(t, pinhole.Config{})
			client := netip.AddrPortFrom(topo.ClientV6, 7401)
			p := pinhole.Pinhole{Protocol: proto, InternalAddr: client.Addr(), InternalPort: client.Port()}
			apply(t, b, install(p, time.Hour))
			b.Close() // a stop: the table stays
			topo.Host.MustRun(t, "nft", "flush", "chain", "inet", "pcpd", "guard6")
			var f *echoFlow
			restore := pinhole.OnSetupLayout(func() {
				if f == nil {
					f = openEcho(t, proto, topo.Client, topo.Internet, netip.AddrPortFrom(topo.InternetV6, 47401), client)
				}
			})
			nb := newBackend(t, topo.Host, pinhole.Config{}) // the start
			restore()
			if f == nil {
				t.Fatal("no connection opened during the start's Setup")
			}
			checkUnlabelledCut(t, topo.Host, nb, p, f, "after the start, yet the connection let in unlabelled before its layout")
		})
	}
}
