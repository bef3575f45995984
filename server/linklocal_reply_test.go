package server

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/internal/netlab"
)

// TestLinkLocalReplyLeavesItsInterfaceR11 (review11, 4d14e5c): a reply to
// a link-local client is sent without a zone (scope 0) and relies on the
// socket's SO_BINDTODEVICE. Two served interfaces with the same
// link-local addresses on both sides (and a global address on each): a
// reply sent alone from each socket, link-local or global, to the
// link-local client must reach the client on that socket's interface and
// never the other.
func TestLinkLocalReplyLeavesItsInterfaceR11(t *testing.T) {
	srvNS := netlab.NewNS(t, "srv11")
	cli := map[string]*netlab.NS{"pcpa": netlab.NewNS(t, "cla11"), "pcpb": netlab.NewNS(t, "clb11")}
	srvLL, cliLL := netip.MustParseAddr("fe80::7:1"), netip.MustParseAddr("fe80::7:2")
	global := map[string]string{"pcpa": "2001:db8:a::1/64", "pcpb": "2001:db8:b::1/64"}
	rcs := map[string]*net.UDPConn{}
	for ifc, ns := range cli {
		if err := netlab.Veth(ns, "eth0", srvNS, ifc); err != nil {
			t.Fatal(err)
		}
		srvNS.MustRun(t, "ip", "addr", "add", srvLL.String()+"/64", "dev", ifc, "nodad")
		srvNS.MustRun(t, "ip", "addr", "add", global[ifc], "dev", ifc, "nodad")
		ns.MustRun(t, "ip", "addr", "add", cliLL.String()+"/64", "dev", "eth0", "nodad")
		if err := ns.Do(func() error {
			rc, err := net.ListenUDP("udp6", &net.UDPAddr{IP: net.IPv6zero, Port: 5350})
			rcs[ifc] = rc
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer rcs[ifc].Close()
	}
	h, nh := nsHandles(t, srvNS)
	l := &listener{log: zap.NewNop(), ifaces: []string{"pcpa", "pcpb"}, port: Port, ns: h, out: make(chan packet, 64)}
	l.resync(nh)
	defer l.closeAll()
	n := 0
	for _, c := range l.sockets() {
		if !c.local.Addr().Is6() {
			continue
		}
		n++
		msg := "from " + c.local.String()
		for _, to := range []netip.AddrPort{netip.AddrPortFrom(cliLL.WithZone(c.iface), 5350),
			netip.AddrPortFrom(cliLL.WithZone("99"), 5350),          // a scope not the socket's (sockaddrPort)
			netip.AddrPortFrom(allHosts6.WithZone(c.iface), 5350)} { // the multicast ANNOUNCE
			if err := srvNS.Do(func() error { return c.send([]byte(msg), to) }); err != nil {
				t.Errorf("%v: send to %v: %v", c.local, to, err)
				continue
			}
			for ifc, rc := range rcs {
				_ = rc.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
				buf := make([]byte, 128)
				k, _, err := rc.ReadFromUDPAddrPort(buf)
				got := err == nil && string(buf[:k]) == msg
				if want := ifc == c.kname; got != want {
					t.Errorf("%v (socket bound to %s) to %v: client on %s got it: %v, want %v", c.local, c.kname, to, ifc, got, want)
				}
			}
		}
	}
	// The host's own request from its link-local address on pcpa: the
	// reply comes back to the host (through lo) from pcpa's socket.
	var own *net.UDPConn
	if err := srvNS.Do(func() error {
		var err error
		own, err = net.ListenUDP("udp6", &net.UDPAddr{IP: srvLL.AsSlice(), Port: 5350, Zone: "pcpa"})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer own.Close()
	for _, c := range l.sockets() {
		if c.local.Addr().WithZone("") != srvLL || c.kname != "pcpa" {
			continue
		}
		if err := srvNS.Do(func() error { return c.send([]byte("own"), netip.AddrPortFrom(srvLL.WithZone("pcpa"), 5350)) }); err != nil {
			t.Errorf("reply to the host's own link-local address: %v", err)
		}
		_ = own.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		buf := make([]byte, 16)
		if k, _, err := own.ReadFromUDPAddrPort(buf); err != nil || string(buf[:k]) != "own" {
			t.Errorf("the host's own request got no reply: %q %v", buf[:k], err)
		}
	}
	if n < 4 {
		t.Fatalf("%d IPv6 sockets, want 4: %v", n, l.addrs())
	}
}
