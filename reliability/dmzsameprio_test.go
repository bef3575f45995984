package reliability

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// TestNAPTDMZAtPcpdPriority (h/prio, issue 9, left of h/left9): the
// admin's DMZ rule in a base chain at exactly pcpd's DNAT priority
// (dstnat + 1). The kernel keeps the NAT chains of one hook in a list
// sorted by priority, a chain registered later going before those of its
// priority (nf_hook_entries_grow, through nf_nat_register_fn); it runs
// them in order and stops at the first that binds a connection. A chain
// is registered when it is made, or when its table wakes from dormant.
// So the same rules give either answer, by the order they were made:
//
//   - the admin's chain made before pcpd's (pcpd started after it):
//     pcpd's chain runs first, the held mapping's connection reaches the
//     client;
//   - the admin's chain made again after pcpd's (a reload, "nft -f" of
//     the admin's file): it runs first, the connection goes to the DMZ
//     host.
//
// No listing tells the order (handles are per table, a wake re-registers
// without a trace, nfnetlink_hook is not built here and shows the nat
// core's hook, not its chains), so pcpd counts such a chain as before its
// own and refuses new IPv4 mappings in both cases: the first refusal is
// needless (documented, RELIABILITY.md), the second is needed. Shown here
// by where the Internet's connections land.
func TestNAPTDMZAtPcpdPriority(t *testing.T) {
	l := newLab(t, labOptions{})
	const held = 40481
	pub := l.topo.HostPublicV4
	dmzAddr := "10.100.2.7"
	l.topo.Host.MustRun(t, "nft", "add table ip admin")
	l.topo.Host.MustRun(t, "nft", "add chain ip admin pre { type nat hook prerouting priority dstnat + 1; }")
	l.start()
	c := l.pcpClient(l.topo.ClientV4)
	dmzHeld := acceptCounter(t, l.topo.Client, dmzAddr+":40481")
	cliHeld := acceptCounter(t, l.topo.Client, l.topo.ClientV4.String()+":40481")
	extHeld := l.mustPMP(c, pcp.PMPOpMapTCP, held, time.Hour)
	refused := func(what string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var r pcp.PMPResponse
		if err := c.DoPMP(ctx, &pcp.PMPRequest{Opcode: pcp.PMPOpMapTCP, InternalPort: 40482, SuggestedExternalPort: 40482, Lifetime: time.Hour}, &r); err != nil || r.Result != pcp.PMPOutOfResources {
			t.Fatalf("%s: NAT-PMP TCP 40482: %v, %v; want OUT_OF_RESOURCES (the chain at pcpd's priority counts as before)", what, r.Result, err)
		}
	}
	land := func(what string, wantDMZ bool) {
		t.Helper()
		d, c0 := dmzHeld.Load(), cliHeld.Load()
		l.topo.Internet.DialTCP(extHeld.String(), time.Second)
		gotDMZ, gotCli := dmzHeld.Load()-d, cliHeld.Load()-c0
		t.Logf("%s: the held mapping's connection reached the DMZ host %d, the client %d", what, gotDMZ, gotCli)
		if (gotDMZ == 1) != wantDMZ || (gotCli == 1) == wantDMZ {
			t.Fatalf("%s: DMZ host %d, client %d; want the DMZ host: %v", what, gotDMZ, gotCli, wantDMZ)
		}
	}
	off := l.log.len()
	// The rule added to the admin's chain, made before pcpd's.
	l.topo.Host.MustRun(t, "nft", "add rule ip admin pre ip daddr "+pub.String()+" dnat to "+dmzAddr)
	if _, ok := waitFor(10*time.Second, func() bool { return strings.Contains(l.log.since(off), "before pcpd's chain") }); !ok {
		t.Fatalf("pcpd logged no catch-all before its chain; log:\n%s", l.log.since(off))
	}
	land("the admin's chain made before pcpd's", false)
	refused("the admin's chain made before pcpd's")
	// The admin reloads its table: its chain is registered anew.
	l.topo.Host.MustRun(t, "nft", "delete table ip admin")
	l.topo.Host.MustRun(t, "nft", "add table ip admin")
	l.topo.Host.MustRun(t, "nft", "add chain ip admin pre { type nat hook prerouting priority dstnat + 1; }")
	l.topo.Host.MustRun(t, "nft", "add rule ip admin pre ip daddr "+pub.String()+" dnat to "+dmzAddr)
	land("the admin's chain made again after pcpd's", true)
	refused("the admin's chain made again after pcpd's")
}
