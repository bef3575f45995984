package pinhole_test

import (
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestSetupMovesDNATChainPriority (h/natprio): a table laid out by a pcpd
// before h/natprio hooks its DNAT chain at dstnat (-100), where an
// admin's DNAT registered earlier lost to it (backend.go, dnatPriority).
// A Setup over it (a new pcpd starting) re-makes the chain at dstnat + 1
// in its one transaction with its four DNAT rules and their map
// references intact: the connections DNAT-ed before (IPv4 NAPT TCP and
// UDP, an IPv6 port redirect) keep passing, new ones through the same
// elements pass, and Healthy holds. Without the move (the chain check
// ignoring the priority) the kernel refuses the second Setup's chain
// (EOPNOTSUPP: a base chain's priority cannot change) and Setup fails:
// "Setup: pinhole: inet table "pcpd" exists and pcpd did not create it
// (it holds chain "natcut")" (its retry without labels). Attached mode's
// pcpd_prerouting, in the admin's table, the same.
func TestSetupMovesDNATChainPriority(t *testing.T) {
	t.Run("standalone", func(t *testing.T) { setupMovesDNATChain(t, pinhole.Config{}, "pcpd", "prerouting") })
	t.Run("attached", func(t *testing.T) {
		setupMovesDNATChain(t, pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd"}, "filter", "pcpd_prerouting")
	})
}

// setupMovesDNATChain is TestSetupMovesDNATChainPriority for cfg, whose
// DNAT chain is table's chain (attached: beneath README's adminRuleset).
func setupMovesDNATChain(t *testing.T, cfg pinhole.Config, table, chain string) {
	restore := pinhole.SetDNATPriority(*nftables.ChainPriorityNATDest)
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	if cfg.Attached {
		loadNft(t, topo.Host, adminRuleset)
	}
	old := newBackend(t, topo.Host, cfg)
	restore()
	if err := old.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
		t.Fatal(err)
	}
	list := func() string { return nftList(t, topo.Host, "chain", "inet", table, chain) }
	if l := list(); !strings.Contains(l, "priority dstnat;") {
		t.Fatalf("the old layout is not at dstnat:\n%s", l)
	}
	type mapped struct {
		proto     uint8
		svc, pub  netip.AddrPort
		flow      *echoFlow
		redirect6 bool
	}
	ms := []*mapped{
		{proto: tcp, svc: netip.AddrPortFrom(topo.ClientV4, 8400), pub: netip.AddrPortFrom(topo.HostPublicV4, 18400)},
		{proto: udp, svc: netip.AddrPortFrom(topo.ClientV4, 8401), pub: netip.AddrPortFrom(topo.HostPublicV4, 18401)},
		{proto: tcp, svc: netip.AddrPortFrom(topo.ClientV6, 8402), pub: netip.AddrPortFrom(topo.ClientV6, 18402), redirect6: true},
	}
	for _, m := range ms {
		p := pinhole.Pinhole{Protocol: m.proto, InternalAddr: m.svc.Addr(), InternalPort: m.svc.Port(),
			ExternalAddr: m.pub.Addr(), ExternalPort: m.pub.Port()}
		apply(t, old, install(p, time.Minute))
		src := netip.AddrPortFrom(topo.InternetV4, 0)
		if m.redirect6 {
			src = netip.AddrPortFrom(topo.InternetV6, 0)
		}
		m.flow = openEchoVia(t, m.proto, topo.Client, m.svc, topo.Internet, src, m.pub)
	}

	b := newBackend(t, topo.Host, cfg) // Setup over the old layout
	l := list()
	if !strings.Contains(l, "priority dstnat + 1;") || strings.Count(l, " dnat ") != 4 {
		t.Fatalf("Setup did not re-make the DNAT chain at dstnat + 1 with its 4 rules:\n%s", l)
	}
	for _, m := range ms {
		if err := m.flow.echo(okWait); err != nil {
			t.Fatalf("%s %v → %v: the connection DNAT-ed before the move no longer passes: %v", protoName(m.proto), m.pub, m.svc, err)
		}
		if m.proto != tcp {
			continue
		}
		nf := &echoFlow{}
		if err := topo.Internet.Do(func() (err error) {
			nf.c, err = net.DialTimeout("tcp", m.pub.String(), okWait)
			return err
		}); err != nil {
			t.Fatalf("tcp %v: new connection after the move: %v", m.pub, err)
		}
		err := nf.echo(okWait)
		nf.c.Close()
		if err != nil {
			t.Fatalf("tcp %v: new connection after the move: no echo: %v", m.pub, err)
		}
	}
	if err := b.Healthy(); err != nil {
		t.Fatalf("Healthy after the move: %v", err)
	}
	t.Logf("moved:\n%s", l)
}
