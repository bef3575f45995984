package reliability

import (
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// TestUnmovableLeaseOffForwardedPort (h/fwd4): a client holds an IPv4
// mapping that cannot move to another port, a PCP MAP made with
// PREFER_FAILURE (RFC 6887 §13.2) or a PEER (§12: its remote peer knows
// its port); then the admin forwards that public port with a DNAT rule of
// their own (one pcpd reads: h/adminports). Which of the two DNATs a new
// connection gets is the kernel's order of the nat chains at prerouting:
// the first chain that translates it wins, so with the admin's chain at
// dstnat (-100) the admin's, with it at dstnat + 2 pcpd's (dstnat + 1):
// there every connection to the port (PREFER_FAILURE MAP), or the remote
// peer's (PEER), reached the client and never the admin's new forward,
// until the lease expired (a PEER for as long as its client renewed it).
// Now pcpd's read of the rules (every 2 s while an IPv4 lease is held)
// ends such a lease: judged by the kernel (no element of pcpd's on the
// port within 8 s of the forward), the lease list, a real connection
// from the internet (the admin's backend accepts it, the client not) and
// the client's renewal (CANNOT_PROVIDE_EXTERNAL, and still no element).
//
// On main (6a2ba29) all three rows failed: 'kernel still maps the
// forwarded port 8 s after the admin's forward', and at dstnat + 2 the
// connection reached the client ('admin backend accepted 0 (want 1), the
// client 1 (want 0)').
func TestUnmovableLeaseOffForwardedPort(t *testing.T) {
	for _, tc := range []struct {
		name string
		prio string
		peer bool
	}{
		{"PREFER_FAILURE MAP, admin at dstnat + 2", "dstnat + 2", false},
		{"PREFER_FAILURE MAP, admin at dstnat", "dstnat", false},
		{"PEER, admin at dstnat + 2", "dstnat + 2", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const port = 40080
			f := newForwardLab(t, port)
			l, pub, admin, client, c := f.lab, f.lab.topo.HostPublicV4, f.admin, f.client, f.c
			remote := netip.AddrPortFrom(l.topo.InternetV4, 45000)
			req := pcp.NewMap(l.topo.ClientV4, pcp.ProtoTCP, port, time.Hour)
			req.Options.PreferFailure = true
			if tc.peer {
				req = pcp.NewPeer(l.topo.ClientV4, pcp.ProtoTCP, port, remote, time.Hour)
			}
			req.Map.ExternalAddr, req.Map.ExternalPort = pub, port
			if r, err := do(c, req); err != nil || r.Result != pcp.Success || r.Map.ExternalPort != port {
				t.Fatalf("first request: %v %v", r, err)
			}
			f.forward(tc.prio)
			forwarded := time.Now()

			onPort := func() bool {
				for _, e := range l.kernel() {
					if e.Pinhole.ExternalAddr == pub && e.Pinhole.ExternalPort == port {
						return true
					}
				}
				return false
			}
			for onPort() && time.Since(forwarded) < 8*time.Second {
				time.Sleep(100 * time.Millisecond)
			}
			held := onPort()
			took := time.Since(forwarded)
			from := netip.AddrPort{}
			if tc.peer {
				from = remote // the one remote the PEER admits
			}
			err := l.topo.Internet.Probe("tcp", from, netip.AddrPortFrom(pub, port).String(), time.Second)
			if held || err != nil || admin.Load() != 1 || client.Load() != 0 {
				t.Fatalf("kernel still maps the forwarded port %v after the admin's forward: %v; a connection to it: %v; admin backend accepted %d (want 1), the client %d (want 0)",
					took.Round(100*time.Millisecond), held, err, admin.Load(), client.Load())
			}
			for _, ls := range l.leases() {
				if ls.InternalAddress == l.topo.ClientV4 && ls.InternalPort == port {
					t.Errorf("lease still listed: %+v", ls)
				}
			}
			r, err := do(c, req) // the client's renewal
			if err != nil || r.Result != pcp.CannotProvideExternal {
				t.Errorf("renewal after the forward: %v %v, want CANNOT_PROVIDE_EXTERNAL", r, err)
			}
			if onPort() {
				t.Errorf("kernel maps the forwarded port again after the renewal")
			}
			t.Logf("pcpd's element on %d gone %v after the admin's forward; the port reaches the admin's backend", port, took.Round(100*time.Millisecond))
		})
	}
}

// forwardLab is a started lab for a test of the admin forwarding a public
// IPv4 port a client holds: the admin's backend and the client's
// listener on port count the connections each accepts.
type forwardLab struct {
	lab           *lab
	port          uint16
	backend       netip.AddrPort
	admin, client *atomic.Int64
	c             *pcp.Client // the client's PCP/NAT-PMP client
}

func newForwardLab(t *testing.T, port uint16) *forwardLab {
	t.Helper()
	l := newLab(t, labOptions{})
	l.start()
	f := &forwardLab{lab: l, port: port, backend: netip.AddrPortFrom(netip.MustParseAddr("10.100.2.7"), 80)} // nobody's address, answered in the client namespace
	f.admin = acceptCounter(t, l.topo.Client, f.backend.String())
	f.client = acceptCounter(t, l.topo.Client, netip.AddrPortFrom(l.topo.ClientV4, port).String())
	f.c = l.pcpClient(l.topo.ClientV4)
	return f
}

// forward adds the admin's forward of TCP port to the backend, in a chain
// of their own hooked at prerouting priority prio.
func (f *forwardLab) forward(prio string) {
	l := f.lab
	l.topo.Host.MustRun(l.t, "nft", "add table ip admin")
	l.topo.Host.MustRun(l.t, "nft", "add chain ip admin pre { type nat hook prerouting priority "+prio+"; }")
	l.topo.Host.MustRun(l.t, "nft", adminForward(l.topo.HostPublicV4, f.port, f.backend, false))
}
