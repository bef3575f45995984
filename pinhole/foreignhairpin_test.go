package pinhole_test

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pinhole"
)

// TestForeignForwardOnLANTakesHairpin (root; review h/revpr of h/prio):
// a port forward of the admin's limited to a LAN interface ("iifname
// "lan1" ip daddr P udp dport 15000 dnat to ..." at dstnat, before pcpd's
// chain) takes the hairpinned connections of the hosts behind lan1 to
// P:15000, a NAPT mapping's external endpoint: judged where a datagram
// from lan1's host lands. ForeignDNAT must keep 15000 reserved, as it did
// before h/prio: lan1 holds no external address, and h/prio left such a
// rule out ("takes none of pcpd's connections"), so 15000 could be
// granted beside it, two owners of one port.
func TestForeignForwardOnLANTakesHairpin(t *testing.T) {
	topo, peer, peerAddr, b := servedLAN1(t, "rprhair", false, []netip.Prefix{netip.MustParsePrefix("10.100.1.2/32")})
	pub := netip.AddrPortFrom(topo.HostPublicV4, 15000)
	mapped := netip.AddrPortFrom(topo.ClientV4, 5000)
	fwdTo := netip.AddrPortFrom(topo.ClientV4, 5001)
	apply(t, b, install(pinhole.Pinhole{Protocol: udp, InternalAddr: mapped.Addr(), InternalPort: mapped.Port(),
		ExternalAddr: pub.Addr(), ExternalPort: pub.Port()}, time.Minute))
	if got, err := seenVia(t, peer, netip.AddrPortFrom(peerAddr, 6000), pub, topo.Client, mapped); err != nil {
		t.Fatalf("before the forward: lan1's host → %v: nothing reached the mapping's client %v: %v", pub, mapped, err)
	} else {
		t.Logf("before the forward: lan1's host → %v reached %v from %v", pub, mapped, got)
	}
	loadNft(t, topo.Host, fmt.Sprintf("table ip admin {\n chain pre {\n  type nat hook prerouting priority dstnat;\n  iifname \"lan1\" ip daddr %s udp dport %d dnat to %s\n }\n}\n",
		pub.Addr(), pub.Port(), fwdTo))
	if _, err := seenVia(t, peer, netip.AddrPortFrom(peerAddr, 6001), pub, topo.Client, fwdTo); err != nil {
		t.Fatalf("the premise: lan1's host → %v did not reach the forward's target %v: %v", pub, fwdTo, err)
	}
	f, err := b.ForeignDNAT(pub.Addr(), 1024, 65535)
	if err != nil {
		t.Fatal(err)
	}
	if !f.UDP.Has(pub.Port()) {
		t.Errorf("ForeignDNAT: UDP reserved %q, want %d: lan1's hairpinned datagrams to %v land on %v, not on a mapping's client", f.UDP.String(), pub.Port(), pub, fwdTo)
	}
}
