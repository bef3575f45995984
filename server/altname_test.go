package server

import (
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/zap/zaptest"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// altnameKernel is the altname tests' serving interface's kernel name.
const altnameKernel = "pcp0"

// altnameBed builds the altname tests' bed: a server namespace whose
// interface altnameKernel (a veth to the client namespace's eth0) holds
// srv and also answers to altnames, and the client's eth0 holding cli
// (each a /64, without duplicate address detection). It returns both
// namespaces, the server namespace's handle (a listener's ns) and a
// netlink handle in it, both closed when the test ends.
func altnameBed(t *testing.T, srv, cli []netip.Addr, altnames ...string) (srvNS, cliNS *netlab.NS, h netns.NsHandle, nh *netlink.Handle) {
	t.Helper()
	srvNS, cliNS = netlab.NewNS(t, "srv"), netlab.NewNS(t, "cli")
	if err := netlab.Veth(cliNS, "eth0", srvNS, altnameKernel); err != nil {
		t.Fatal(err)
	}
	for _, a := range srv {
		srvNS.MustRun(t, "ip", "addr", "add", a.String()+"/64", "dev", altnameKernel, "nodad")
	}
	for _, a := range cli {
		cliNS.MustRun(t, "ip", "addr", "add", a.String()+"/64", "dev", "eth0", "nodad")
	}
	for _, n := range altnames {
		srvNS.MustRun(t, "ip", "link", "property", "add", "dev", altnameKernel, "altname", n)
	}
	h, nh = nsHandles(t, srvNS)
	return srvNS, cliNS, h, nh
}

// nsHandles opens ns's namespace handle (a listener's ns) and a netlink
// handle in it, both closed when the test ends.
func nsHandles(t *testing.T, ns *netlab.NS) (netns.NsHandle, *netlink.Handle) {
	t.Helper()
	h, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	nh, err := netlink.NewHandleAt(h)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nh.Close)
	return h, nh
}

// TestServedInterfaceKernelName (review8 A1): the listener finds a
// configured interface by any of its names (LinkByName resolves an
// alternative name, "ip link property add ... altname", as systemd gives
// every NIC on Debian 12), but the firewall's serving_ifs set is matched
// with "meta iifname", the interface's one kernel name. Handed the
// configured name, serving_ifs held the altname: every datagram from the
// serving interface skipped control_local (no kernel meter, no
// reverse-path or served-source drop, conntrack entries for each) while
// Healthy reported the table healthy; an altname of 16 characters or more
// made every SetServed fail (ErrInvalid), so the served sets stayed empty.
// The names onServe hands over must be the kernel's, and a datagram from
// the client must then reach control_local (the per-source meter holds
// its /64).
func TestServedInterfaceKernelName(t *testing.T) {
	const kernelName = altnameKernel
	srvAddr, cliAddr := netip.MustParseAddr("2001:db8:7::1"), netip.MustParseAddr("2001:db8:7::2")
	srvNS, cliNS, h, nh := altnameBed(t, []netip.Addr{srvAddr}, []netip.Addr{cliAddr}, "pcpalt", "pcp-serving-interface")
	conn, err := srvNS.NftConn()
	if err != nil {
		t.Fatal(err)
	}
	fw, err := pinhole.New(conn, pinhole.Config{Meter: pinhole.Meter{Rate: 200, Burst: 400, Ports: []uint16{Port}}})
	if err != nil {
		t.Fatal(err)
	}
	defer fw.Close()
	if err := fw.Setup(); err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct{ name, configured string }{
		{"kernel name", kernelName},
		{"altname", "pcpalt"},
		{"altname of IFNAMSIZ or more", "pcp-serving-interface"},
	} {
		t.Run(c.name, func(t *testing.T) {
			srvNS.MustRun(t, "nft", "flush", "set", "inet", "pcpd", "meter6")
			var addrs []netip.Addr
			var ifaces []string
			l := &listener{log: zaptest.NewLogger(t), ifaces: []string{c.configured}, port: Port, ns: h,
				out: make(chan packet, 64), onServe: func(aps []netip.AddrPort, ifs []string) {
					for _, ap := range aps {
						addrs = append(addrs, ap.Addr().WithZone(""))
					}
					ifaces = ifs
				}}
			l.resync(nh)
			defer l.closeAll()
			if !slices.Contains(addrs, srvAddr) {
				t.Fatalf("interface %q: serving %v, want %v among them", c.configured, addrs, srvAddr)
			}
			for _, n := range ifaces {
				if n != kernelName {
					t.Errorf("interface %q: onServe names %q, want the kernel's name %q (what meta iifname matches)", c.configured, ifaces, kernelName)
					break
				}
			}
			if err := fw.SetServed(addrs, ifaces); err != nil {
				t.Fatalf("SetServed(%v, %q): %v", addrs, ifaces, err)
			}
			if err := fw.Healthy(); err != nil {
				t.Fatalf("Healthy: %v", err)
			}
			if err := cliNS.Do(func() error {
				uc, err := net.DialUDP("udp6", &net.UDPAddr{IP: cliAddr.AsSlice()}, net.UDPAddrFromAddrPort(netip.AddrPortFrom(srvAddr, Port)))
				if err != nil {
					return err
				}
				defer uc.Close()
				_, err = uc.Write([]byte("request"))
				return err
			}); err != nil {
				t.Fatal(err)
			}
			if out := srvNS.MustRun(t, "nft", "list", "set", "inet", "pcpd", "meter6"); !strings.Contains(out, "2001:db8:7::") {
				t.Errorf("interface %q: the client's datagram skipped control_local (meter6 lacks its /64):\n%s", c.configured, out)
			}
		})
	}
}
