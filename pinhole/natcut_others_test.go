package pinhole_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pinhole"
)

// TestNATCutSparesOthersLabelledFlows (review h/revnatcut, finding 1):
// natcut's base chain sees every packet the host receives, and before the
// fix it sent every established flow labelled 126 to recheck_nat, which
// dropped what its own four maps do not translate. A second pcpd on the
// host (its own table, its own clients: here the lan1 host, served by
// table "pcpdb") labels its DNAT-ed flows with the same bit, so the first
// pcpd's natcut dropped every NAPT flow of the second after its first
// packet. With the fix (natLabelFor) each table labels and re-checks its
// own bit: B's NAPT flows (TCP, UDP) carry data while both pcpds run,
// and B's own natcut still cuts them at B's delete. On h/dnatcut the
// TCP flow's first round trip times out (A's recheck_nat drops it).
func TestNATCutSparesOthersLabelledFlows(t *testing.T) {
	topo, peer, peerAddr, a := servedLAN1(t, "rnatcutpeer", false, nil)
	_ = a
	pb := newBackend(t, topo.Host, pinhole.Config{Table: "pcpdb"})
	if err := pb.SetProtected([]netip.Prefix{netip.PrefixFrom(peerAddr, 32)}); err != nil {
		t.Fatal(err)
	}
	for _, proto := range []uint8{tcp, udp} {
		m := pinhole.Pinhole{Protocol: proto, InternalAddr: peerAddr, InternalPort: 8100, ExternalAddr: topo.HostPublicV4, ExternalPort: 18100}
		apply(t, pb, install(m, time.Hour))
		f := openEchoVia(t, proto, peer, netip.AddrPortFrom(peerAddr, 8100), topo.Internet,
			netip.AddrPortFrom(topo.InternetV4, 48100), netip.AddrPortFrom(topo.HostPublicV4, 18100))
		for i := range 3 {
			if err := f.echo(okWait); err != nil {
				t.Fatalf("%s: echo %d of B's NAPT flow with A running: %v (dropped by A's natcut?)\n%s", protoName(proto), i, err,
					nftList(t, topo.Host, "chain", "inet", "pcpd", "recheck_nat"))
			}
		}
		apply(t, pb, del(m))
		if err := f.echo(failWait); err == nil {
			t.Errorf("%s: B's flow still carries data after B's delete\n%s\n%s", protoName(proto), nftList(t, topo.Host, "table", "inet", "pcpdb"), topo.Host.MustRun(t, "cat", "/proc/net/nf_conntrack"))
		}
	}

}
