package reliability

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"

	"github.com/pcpd/pcpd/pcp"
)

// TestNAPTBesideAdminPortForward: the host's admin forwards a public IPv4
// port with a DNAT rule of their own (a port forward, a container runtime
// publishing a port without a proxy socket, CNI hostPort): no socket on
// the host holds the port, so pcpd's host port scan cannot see it, and a
// client asking NAT-PMP for that port is granted it (SUCCESS: pcpd cannot
// read other tables' rules; README's --reserved-ports says to list such
// ports). The admin's forward must keep its traffic whatever the load
// order: a connection from the internet to the public port still reaches
// the admin's backend, never the client. pcpd's own mapping of another
// port still passes its traffic to the client (h/attack found, h/natprio
// fixed: pcpd's DNAT chain hooks at dstnat + 1, after the admin's).
//
// Before the fix (pcpd's chain at dstnat, run before an equal-priority
// chain registered earlier), "admin first" failed with: the client took
// the admin's forwarded port 40080: granted 198.51.100.1:40080;
// connections after the mapping: admin backend 0, client 1.
func TestNAPTBesideAdminPortForward(t *testing.T) {
	for _, first := range []string{"admin", "pcpd"} {
		t.Run(first+" first", func(t *testing.T) { naptBesideAdminForward(t, first == "admin") })
	}
}

// naptBesideAdminForward is TestNAPTBesideAdminPortForward with the
// admin's table made before pcpd starts (adminFirst: the usual boot
// order, the firewall before the daemons) or after.
func naptBesideAdminForward(t *testing.T, adminFirst bool) {
	l := newLab(t, labOptions{})
	const port, own = 40080, 40081
	public := netip.AddrPortFrom(l.topo.HostPublicV4, port).String()
	backend := netip.AddrPortFrom(netip.MustParseAddr("10.100.2.7"), 80) // nobody's address, answered in the client namespace
	forward := func() {
		l.topo.Host.MustRun(t, "nft", "add table ip admin")
		l.topo.Host.MustRun(t, "nft", "add chain ip admin pre { type nat hook prerouting priority dstnat; }")
		l.topo.Host.MustRun(t, "nft", "add rule ip admin pre ip daddr "+l.topo.HostPublicV4.String()+" tcp dport "+fmt.Sprint(port)+" dnat to "+backend.String())
	}
	if adminFirst {
		forward()
		l.start()
	} else {
		l.start()
		forward()
	}
	admin := acceptCounter(t, l.topo.Client, backend.String())
	client := acceptCounter(t, l.topo.Client, netip.AddrPortFrom(l.topo.ClientV4, port).String())
	ownSvc := acceptCounter(t, l.topo.Client, netip.AddrPortFrom(l.topo.ClientV4, own).String())
	if err := l.topo.Internet.DialTCP(public, time.Second); err != nil {
		t.Fatalf("the admin's port forward does not work before any mapping: %v", err)
	}
	if admin.Load() != 1 {
		t.Fatalf("before: admin backend accepted %d", admin.Load())
	}
	pmpc := l.pcpClient(l.topo.ClientV4)
	got := l.mustPMP(pmpc, pcp.PMPOpMapTCP, port, time.Hour)
	t.Logf("NAT-PMP TCP %d suggesting %d: granted %v (SUCCESS: pcpd cannot see the admin's rule)", port, port, got)
	l.topo.Internet.DialTCP(public, time.Second)
	t.Logf("after: admin backend accepted %d, the client %d; kernel: %v", admin.Load(), client.Load(), l.kernel())
	if client.Load() != 0 || admin.Load() != 2 {
		t.Fatalf("the client took the admin's forwarded port %d: granted %v; connections after the mapping: admin backend %d, client %d",
			port, got, admin.Load()-1, client.Load())
	}
	// pcpd's own mapping of a port nobody forwards: DNAT-ed by pcpd's
	// chain, after the admin's found nothing to bind.
	ext := l.mustPMP(pmpc, pcp.PMPOpMapTCP, own, time.Hour)
	if err := l.topo.Internet.DialTCP(ext.String(), time.Second); err != nil || ownSvc.Load() != 1 {
		t.Fatalf("pcpd's own mapping %v of the client's %d: %v, the client's service accepted %d", ext, own, err, ownSvc.Load())
	}
	if admin.Load() != 2 || client.Load() != 0 {
		t.Fatalf("pcpd's own mapping's connection reached the admin backend (%d) or the forwarded port's (%d)", admin.Load(), client.Load())
	}
}

// TestNAPTDNATChainPriorityUpgrade: a table laid out by a pcpd before
// h/natprio has its DNAT chain (prerouting) at dstnat. The new pcpd's
// Setup re-makes it at dstnat + 1 in its one transaction (the chain's
// shape differs: queueMisshapenChainRemoval), its rules and map references
// intact: connections DNAT-ed before (IPv4 NAPT and IPv6 port redirect,
// TCP and UDP) keep passing, and new ones through the same mappings pass.
// (Without the fix there is nothing to move: the test fails at once,
// "pcpd's prerouting chain is not at dstnat + 1".)
func TestNAPTDNATChainPriorityUpgrade(t *testing.T) {
	l := newLab(t, labOptions{})
	l.start()
	flows := l.openLifeFlows(t, l.pcpClient(l.topo.ClientV4), 40200, time.Hour)
	l.kill9()

	// The old layout: the same chain and rules, at dstnat (-100), in one
	// nft transaction, as the older pcpd made it.
	chain := l.topo.Host.MustRun(t, "nft", "list", "chain", "inet", "pcpd", "prerouting")
	if !strings.Contains(chain, "priority dstnat + 1;") {
		t.Fatalf("pcpd's prerouting chain is not at dstnat + 1:\n%s", chain)
	}
	// (Through netlink: nft cannot read its own listing of the DNAT
	// rules back, "transport protocol mapping is only valid after
	// transport protocol match".)
	conn, err := l.topo.Host.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	table := &nftables.Table{Family: nftables.TableFamilyINet, Name: "pcpd"}
	pre := &nftables.Chain{Table: table, Name: "prerouting"}
	rules, err := conn.GetRules(table, pre)
	if err != nil || len(rules) != 4 {
		t.Fatalf("pcpd's DNAT rules: %d, %v", len(rules), err)
	}
	conn.FlushChain(pre)
	conn.DelChain(pre)
	accept := nftables.ChainPolicyAccept
	oldChain := conn.AddChain(&nftables.Chain{Table: table, Name: "prerouting", Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest, Policy: &accept})
	for _, r := range rules {
		conn.AddRule(&nftables.Rule{Table: table, Chain: oldChain, Exprs: r.Exprs})
	}
	if err := conn.Flush(); err != nil {
		t.Fatalf("laying the old DNAT chain out: %v", err)
	}
	if c := l.topo.Host.MustRun(t, "nft", "list", "chain", "inet", "pcpd", "prerouting"); !strings.Contains(c, "priority dstnat;") || strings.Count(c, " dnat ") != 4 {
		t.Fatalf("old layout not made:\n%s", c)
	}
	for i, f := range flows {
		if err := echoRound(f.c, byte(10+i), time.Second); err != nil {
			t.Fatalf("%s: no echo over the old layout: %v", f.name, err)
		}
	}

	l.start()
	c := l.topo.Host.MustRun(t, "nft", "list", "chain", "inet", "pcpd", "prerouting")
	if !strings.Contains(c, "priority dstnat + 1;") || strings.Count(c, " dnat ") != 4 {
		t.Fatalf("prerouting not moved:\n%s", c)
	}
	for i, f := range flows {
		if err := echoRound(f.c, byte(20+i), time.Second); err != nil {
			t.Fatalf("%s: the connection DNAT-ed before the upgrade no longer passes: %v", f.name, err)
		}
	}
	// New connections through the same mappings (TCP ones: a new UDP
	// socket to the same endpoint would need a reply path of its own).
	for _, f := range flows {
		if f.c.RemoteAddr().Network() != "tcp" {
			continue
		}
		dst := f.c.RemoteAddr().String()
		var nc net.Conn
		if err := l.topo.Internet.Do(func() (err error) {
			nc, err = net.DialTimeout("tcp", dst, time.Second)
			return err
		}); err != nil {
			t.Fatalf("%s: new connection to %s after the upgrade: %v", f.name, dst, err)
		}
		err := echoRound(nc, 1, time.Second)
		nc.Close()
		if err != nil {
			t.Fatalf("%s: new connection to %s after the upgrade: no echo: %v", f.name, dst, err)
		}
	}
	t.Logf("prerouting re-made at dstnat + 1; %d connections DNAT-ed before the upgrade and new TCP ones pass:\n%s", len(flows), c)
}
