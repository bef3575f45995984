package pinhole_test

import (
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// seenVia sends UDP datagrams from ns, bound to from, to dial, and returns
// the source address and port a reflector in rns listening on listen saw
// (dial is DNAT-ed to listen on the way, or equals it). Only receiving is
// checked: the reflector's side may have no route back.
func seenVia(t *testing.T, ns *netlab.NS, from, dial netip.AddrPort, rns *netlab.NS, listen netip.AddrPort) (netip.AddrPort, error) {
	t.Helper()
	var refl *net.UDPConn
	if err := rns.Do(func() (err error) {
		refl, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(listen))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer refl.Close()
	var c *net.UDPConn
	if err := ns.Do(func() (err error) {
		c, err = net.DialUDP("udp4", net.UDPAddrFromAddrPort(from), net.UDPAddrFromAddrPort(dial))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 64)
	for range 3 {
		c.Write([]byte("where am I from"))
		refl.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		if _, src, err := refl.ReadFromUDPAddrPort(buf); err == nil {
			return netip.AddrPortFrom(src.Addr().Unmap(), src.Port()), nil
		}
	}
	return netip.AddrPort{}, errors.New("reflector saw nothing")
}

// seenFrom is seenVia from the Client namespace to a reflector in the
// Internet namespace on port reflPort.
func seenFrom(t *testing.T, topo *netlab.Topology, from netip.AddrPort, reflPort uint16) (netip.AddrPort, error) {
	t.Helper()
	to := netip.AddrPortFrom(topo.InternetV4, reflPort)
	return seenVia(t, topo.Client, from, to, topo.Internet, to)
}

// TestNAPT4TwoWay_6886_3_9: an IPv4 NAPT mapping is two-way (RFC 6886
// §3.9 MUST, PROTOCOL.md PMP-11, MAP-12): a datagram from the client's
// internal address and port reaches the internet from the host's public
// IPv4 and the mapping's external port, unfiltered and filtered (then
// only towards the filter's remote), standalone and attached; after the
// delete a new flow is no longer translated.
func TestNAPT4TwoWay_6886_3_9(t *testing.T) {
	for _, attached := range []bool{false, true} {
		name := "standalone"
		if attached {
			name = "attached"
		}
		t.Run(name, func(t *testing.T) {
			topo := netlab.NewTopology(t, netlab.TopologyOptions{})
			cfg := pinhole.Config{}
			if attached {
				loadNft(t, topo.Host, adminRuleset)
				cfg = pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd"}
			}
			b := newBackend(t, topo.Host, cfg)
			if err := b.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
				t.Fatal(err)
			}
			in := netip.AddrPortFrom(topo.ClientV4, 5000)
			pub := netip.AddrPortFrom(topo.HostPublicV4, 15000)
			p := pinhole.Pinhole{Protocol: udp, InternalAddr: in.Addr(), InternalPort: in.Port(),
				ExternalAddr: pub.Addr(), ExternalPort: pub.Port()}
			apply(t, b, install(p, time.Minute))
			if got, err := seenFrom(t, topo, in, 7001); err != nil || got != pub {
				t.Fatalf("mapped %s → %s: outbound seen as %v (%v)", in, pub, got, err)
			}
			apply(t, b, del(p))
			// A new flow (another reflector port: the old flow keeps its
			// conntrack binding until idle) leaves untranslated.
			if got, err := seenFrom(t, topo, in, 7002); err != nil || got != in {
				t.Fatalf("after delete: outbound seen as %v (%v), want %s", got, err, in)
			}

			// Filtered (and PEER-shaped): translated towards the remote
			// the filter admits only.
			inF := netip.AddrPortFrom(topo.ClientV4, 5001)
			pubF := netip.AddrPortFrom(topo.HostPublicV4, 15001)
			f := pinhole.Pinhole{Protocol: udp, InternalAddr: inF.Addr(), InternalPort: inF.Port(),
				ExternalAddr: pubF.Addr(), ExternalPort: pubF.Port(),
				RemotePrefix: netip.PrefixFrom(topo.InternetV4, 32), RemotePort: 7003}
			apply(t, b, install(f, time.Minute))
			if got, err := seenFrom(t, topo, inF, 7003); err != nil || got != pubF {
				t.Fatalf("filtered %s → %s: outbound to the filter's remote seen as %v (%v)", inF, pubF, got, err)
			}
			if got, err := seenFrom(t, topo, inF, 7004); err != nil || got != inF {
				t.Fatalf("filtered: outbound to another remote port seen as %v (%v), want %s", got, err, inF)
			}
			apply(t, b, del(f))
			if err := b.Healthy(); err != nil {
				t.Fatal(err)
			}
			if attached {
				if err := b.Teardown(); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}
