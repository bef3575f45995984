package reliability

import (
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// TestNAPTBesideAdminPortForward: the host's admin forwards a public IPv4
// port with a DNAT rule of their own (a port forward, a container runtime
// publishing a port without a proxy socket, CNI hostPort): no socket on
// the host holds the port, so pcpd's host port scan cannot see it. pcpd
// reads the rule (h/adminports) and grants a client asking NAT-PMP for
// that port another one, but not a rule it cannot read (here a
// concatenation, "unread": logged; README's --reserved-ports says to list
// such ports), nor one made in the 2 s since its last read ("pcpd
// first"): the client is granted the port. The admin's forward must keep
// its traffic whatever the load order: a connection from the internet to
// the public port still reaches the admin's backend, never the client.
// pcpd's own mapping of another port still passes its traffic to the
// client (h/attack found, h/natprio fixed: pcpd's DNAT chain hooks at
// dstnat + 1, after the admin's).
//
// Before the fix (pcpd's chain at dstnat, run before an equal-priority
// chain registered earlier), "admin first" failed with: the client took
// the admin's forwarded port 40080: granted 198.51.100.1:40080;
// connections after the mapping: admin backend 0, client 1.
func TestNAPTBesideAdminPortForward(t *testing.T) {
	for _, first := range []string{"admin", "pcpd"} {
		for _, rule := range []string{"read", "unread"} {
			t.Run(first+" first, "+rule, func(t *testing.T) { naptBesideAdminForward(t, first == "admin", rule == "unread") })
		}
	}
}

// adminForward is the nft rule of the admin's forward of TCP port on
// public to backend: "ip daddr P tcp dport N", or (unread) the same as a
// concatenation, which pcpd does not decode.
func adminForward(public netip.Addr, port uint16, backend netip.AddrPort, unread bool) string {
	match := "ip daddr " + public.String() + " tcp dport " + fmt.Sprint(port)
	if unread {
		match = "ip daddr . tcp dport { " + public.String() + " . " + fmt.Sprint(port) + " }"
	}
	return "add rule ip admin pre " + match + " dnat to " + backend.String()
}

// naptBesideAdminForward is TestNAPTBesideAdminPortForward with the
// admin's table made before pcpd starts (adminFirst: the usual boot
// order, the firewall before the daemons) or after, its rule in a form
// pcpd reads or not (unread).
func naptBesideAdminForward(t *testing.T, adminFirst, unread bool) {
	l := newLab(t, labOptions{})
	const port, own = 40080, 40081
	public := netip.AddrPortFrom(l.topo.HostPublicV4, port).String()
	backend := netip.AddrPortFrom(netip.MustParseAddr("10.100.2.7"), 80) // nobody's address, answered in the client namespace
	forward := func() {
		l.topo.Host.MustRun(t, "nft", "add table ip admin")
		l.topo.Host.MustRun(t, "nft", "add chain ip admin pre { type nat hook prerouting priority dstnat; }")
		l.topo.Host.MustRun(t, "nft", adminForward(l.topo.HostPublicV4, port, backend, unread))
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
	t.Logf("NAT-PMP TCP %d suggesting %d: granted %v", port, port, got)
	if adminFirst && !unread && got.Port() == port {
		t.Fatalf("the client was granted %v, which the admin's rule read at start forwards", got)
	}
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

// TestNAPTBesideAdminPortForwardEndKeepsAdminFlows: a client's mapping of
// a port the admin forwards (granted: the forward is a rule pcpd cannot
// read, a concatenation) ends; the conntrack walk that ends its
// connections (PMP-12) must spare the admin's forwarded connection to the
// same public endpoint, which the mapping never translated.
func TestNAPTBesideAdminPortForwardEndKeepsAdminFlows(t *testing.T) {
	l := newLab(t, labOptions{})
	const port = 40080
	public := netip.AddrPortFrom(l.topo.HostPublicV4, port)
	backend := netip.AddrPortFrom(netip.MustParseAddr("10.100.2.7"), 80)
	l.topo.Host.MustRun(t, "nft", "add table ip admin")
	l.topo.Host.MustRun(t, "nft", "add chain ip admin pre { type nat hook prerouting priority dstnat; }")
	l.topo.Host.MustRun(t, "nft", adminForward(l.topo.HostPublicV4, port, backend, true))
	// A flushed entry is not picked up again mid-stream: the
	// connection then breaks, and the test sees the flush.
	l.topo.Host.MustRun(t, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0")
	l.start()
	l.topo.Client.ServeTCPEcho(t, backend.String())
	var c net.Conn
	if err := l.topo.Internet.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", public.String(), time.Second)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := echoRound(c, 1, time.Second); err != nil {
		t.Fatalf("the admin's forward: %v", err)
	}
	pmpc := l.pcpClient(l.topo.ClientV4)
	got := l.mustPMP(pmpc, pcp.PMPOpMapTCP, port, time.Hour)
	if got.Port() != port {
		t.Fatalf("granted %v: the test needs the forwarded port mapped (a rule pcpd reads?)", got)
	}
	if err := echoRound(c, 2, time.Second); err != nil {
		t.Fatalf("the admin's forwarded connection after the client's mapping %v: %v", got, err)
	}
	l.mustPMP(pmpc, pcp.PMPOpMapTCP, port, 0) // delete: its connections are ended before the reply
	if err := echoRound(c, 3, time.Second); err != nil {
		t.Fatalf("the admin's forwarded connection after the client's mapping %v ended: %v", got, err)
	}
}

// TestNAPTBesideAdminPortForwardSeen (h/adminports): the admin forwards
// public TCP ports to a LAN host with DNAT rules of their own, read by
// pcpd: 443 by an equal port, 8440-8450 by a range, 9443 and 9444 by a
// named set. A client's MAP suggesting one of them (its internal port,
// MAP-09's fallback, too) gets another external port, with
// PREFER_FAILURE CANNOT_PROVIDE_EXTERNAL (PF-04); a connection from the
// internet to the forwarded port reaches the admin's host, one to the
// port granted reaches the client. The kernel holds no element on the
// forwarded ports. Before h/adminports (pcpd read no other table): "the
// client was granted 443, which the admin forwards (tcp dport 443)".
func TestNAPTBesideAdminPortForwardSeen(t *testing.T) {
	l := newLab(t, labOptions{extra: []string{"--ipv4-port-range", "400-65535"}})
	pub := l.topo.HostPublicV4
	lanHost := netip.AddrPortFrom(netip.MustParseAddr("10.100.2.7"), 80) // answered in the client namespace
	for _, cmd := range []string{
		"add table ip admin",
		"add set ip admin fwdports { type inet_service; elements = { 9443, 9444 }; }",
		"add chain ip admin pre { type nat hook prerouting priority dstnat; }",
		"add rule ip admin pre ip daddr " + pub.String() + " tcp dport 443 dnat to " + lanHost.String(),
		"add rule ip admin pre ip daddr " + pub.String() + " tcp dport 8440-8450 dnat to " + lanHost.String(),
		"add rule ip admin pre ip daddr " + pub.String() + " tcp dport @fwdports dnat to " + lanHost.String(),
	} {
		l.topo.Host.MustRun(t, "nft", cmd)
	}
	l.start() // after the admin's table, as at boot
	admin := acceptCounter(t, l.topo.Client, lanHost.String())
	c := l.pcpClient(l.topo.ClientV4)
	for i, tc := range []struct {
		form string
		port uint16
	}{{"tcp dport 443", 443}, {"tcp dport 8440-8450", 8443}, {"tcp dport @fwdports", 9443}} {
		svc := acceptCounter(t, l.topo.Client, netip.AddrPortFrom(l.topo.ClientV4, tc.port).String())
		got := l.mustMapTo(c, l.topo.ClientV4, pcp.ProtoTCP, tc.port, tc.port, time.Hour).Map.ExternalPort
		if got == tc.port {
			t.Fatalf("the client was granted %d, which the admin forwards (%s)", got, tc.form)
		}
		pf := pcp.NewMap(l.topo.ClientV4, pcp.ProtoTCP, tc.port+1, time.Hour)
		pf.Map.ExternalPort, pf.Options.PreferFailure = tc.port, true
		if r, err := do(c, pf); err != nil || r.Result != pcp.CannotProvideExternal {
			t.Fatalf("MAP + PREFER_FAILURE suggesting the forwarded %d: %v, %v", tc.port, r, err)
		}
		if err := l.topo.Internet.DialTCP(netip.AddrPortFrom(pub, tc.port).String(), time.Second); err != nil || admin.Load() != int64(i+1) {
			t.Fatalf("the admin's forward of %d after the client's mapping: %v, its host accepted %d (want %d)", tc.port, err, admin.Load(), i+1)
		}
		if err := l.topo.Internet.DialTCP(netip.AddrPortFrom(pub, got).String(), time.Second); err != nil || svc.Load() != 1 {
			t.Fatalf("the client's mapping %d -> %d: %v, its service accepted %d", got, tc.port, err, svc.Load())
		}
		t.Logf("%s: MAP suggesting %d granted %d; the forward and the mapping each reached their host", tc.form, tc.port, got)
	}
	for _, e := range l.kernel() {
		if p := e.Pinhole.ExternalPort; e.Pinhole.ExternalAddr == pub && (p == 443 || (p >= 8440 && p <= 8450) || p == 9443 || p == 9444) {
			t.Fatalf("kernel maps a forwarded port: %v", e.Pinhole)
		}
	}
}

// TestNAPTBesideAdminDMZHost (review h/revprio): a catch-all DNAT of the
// admin's (a router's "DMZ" or exposed host: every inbound connection
// nothing else claims) at the standard dstnat runs before pcpd's chain
// (dstnat + 1) and takes every port it matches, the clients' mappings'
// too (granted SUCCESS: pcpd reads the rule, warns, and reserves none of
// its ports, which would leave none to map: h/adminports); README's --reserved-ports
// says to hook it after pcpd's, at dstnat + 2 or later, as here: the
// client's mapping then gets its connections, and the DMZ host the rest.
// With the rule at dstnat the mapping received none: "the client's
// NAT-PMP mapping 198.51.100.1:40081 (SUCCESS) received 0 connections,
// the DMZ host 1" (/tmp/revprio-dmz-test.go.txt).
func TestNAPTBesideAdminDMZHost(t *testing.T) {
	l := newLab(t, labOptions{})
	const port, other = 40081, 40082
	dmz := netip.MustParseAddr("10.100.2.7")
	l.topo.Host.MustRun(t, "nft", "add table ip admin")
	l.topo.Host.MustRun(t, "nft", "add chain ip admin pre { type nat hook prerouting priority dstnat + 2; }")
	l.topo.Host.MustRun(t, "nft", "add rule ip admin pre ip daddr "+l.topo.HostPublicV4.String()+" tcp dport 1024-65535 dnat to "+dmz.String())
	l.start()
	dmzN := acceptCounter(t, l.topo.Client, netip.AddrPortFrom(dmz, other).String())
	client := acceptCounter(t, l.topo.Client, netip.AddrPortFrom(l.topo.ClientV4, port).String())
	ext := l.mustPMP(l.pcpClient(l.topo.ClientV4), pcp.PMPOpMapTCP, port, time.Hour)
	l.topo.Internet.DialTCP(ext.String(), time.Second)
	l.topo.Internet.DialTCP(netip.AddrPortFrom(l.topo.HostPublicV4, other).String(), time.Second)
	if client.Load() != 1 || dmzN.Load() != 1 {
		t.Fatalf("the client's NAT-PMP mapping %v received %d connections (want 1), the DMZ host %d of an unmapped port (want 1)", ext, client.Load(), dmzN.Load())
	}
}
