package server

import (
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netns"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/policy"
)

// loopbackSrv is the server's address in a loopbackNS namespace.
var loopbackSrv = netip.MustParseAddr("2001:db8::1")

// loopbackNS makes a namespace of its own (netlab.NewNS's role name) for
// a server on its loopback: loopbackSrv and addrA on lo, the namespace's
// handle (closed at cleanup), and the static ownership of addrA's owner
// "a" (2001:db8:a::/48).
func loopbackNS(t *testing.T, name string) (*netlab.NS, netns.NsHandle, policy.Ownership) {
	t.Helper()
	ns := netlab.NewNS(t, name)
	for _, x := range []netip.Addr{loopbackSrv, addrA} {
		ns.MustRun(t, "ip", "addr", "add", x.String()+"/128", "dev", "lo")
	}
	h, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	own, err := policy.NewStatic(map[string][]netip.Prefix{"a": {netip.MustParsePrefix("2001:db8:a::/48")}})
	if err != nil {
		t.Fatal(err)
	}
	return ns, h, own
}

// dialLoopback is a client socket in ns from addrA to the server's PCP
// port on loopbackSrv, closed at cleanup.
func dialLoopback(t *testing.T, ns *netlab.NS) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	if err := ns.Do(func() (err error) {
		c, err = net.DialUDP("udp6", &net.UDPAddr{IP: addrA.AsSlice()}, net.UDPAddrFromAddrPort(netip.AddrPortFrom(loopbackSrv, Port)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
