package reliability

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// TestPeerKeptBesideLANOnlyForward (review h/revf4 of h/fwd4): the admin
// forwards public TCP 40080 only for connections that come in on the LAN
// interface (NAT reflection: 'iifname "lan0" ip daddr PUB tcp dport 40080
// dnat'), in a chain at dstnat, before pcpd's. A remote peer on the
// internet comes in on wan0: that rule never sees its connections, so a
// client's PEER to it on 40080 takes nothing from the admin and must be
// kept. pcpd's reader reserves the port (an interface condition is not
// read: "reserve rather than miss"), and since h/fwd4 a reserved-by-forward
// port ENDS the PEER. Judged by the kernel (pcpd's element on 40080), the
// lease list, and a real connection from the remote peer to the client.
func TestPeerKeptBesideLANOnlyForward(t *testing.T) {
	const port = 40080
	f := newForwardLab(t, port)
	l, pub, client, c := f.lab, f.lab.topo.HostPublicV4, f.client, f.c
	remote := netip.AddrPortFrom(l.topo.InternetV4, 45000)
	req := pcp.NewPeer(l.topo.ClientV4, pcp.ProtoTCP, port, remote, time.Hour)
	req.Map.ExternalAddr, req.Map.ExternalPort = pub, port
	if r, err := do(c, req); err != nil || r.Result != pcp.Success || r.Map.ExternalPort != port {
		t.Fatalf("PEER: %v %v", r, err)
	}
	h := l.topo.Host
	h.MustRun(t, "nft", "add table ip admin")
	h.MustRun(t, "nft", "add chain ip admin pre { type nat hook prerouting priority dstnat; }")
	h.MustRun(t, "nft", "add rule ip admin pre iifname \""+l.topo.HostLANIf+"\" ip daddr "+pub.String()+
		" tcp dport 40080 dnat to "+f.backend.String())
	time.Sleep(6 * time.Second) // three of pcpd's reads of the rules (every 2 s while an IPv4 lease is held)

	onPort := false
	for _, e := range l.kernel() {
		if e.Pinhole.ExternalAddr == pub && e.Pinhole.ExternalPort == port {
			onPort = true
		}
	}
	listed := false
	for _, ls := range l.leases() {
		if ls.InternalAddress == l.topo.ClientV4 && ls.InternalPort == port {
			listed = true
		}
	}
	err := l.topo.Internet.Probe("tcp", remote, netip.AddrPortFrom(pub, port).String(), time.Second)
	if !onPort || !listed || err != nil || client.Load() != 1 {
		t.Errorf("PEER beside a forward for LAN-side connections only: kernel element %v, lease listed %v (want true, true); the remote peer's connection: %v, the client accepted %d (want 1)",
			onPort, listed, err, client.Load())
	}
	if r, err := do(c, req); err != nil || r.Result != pcp.Success || r.Map.ExternalPort != port {
		t.Errorf("PEER renewal: %v %v, want SUCCESS on %d", r, err, port)
	}
}
