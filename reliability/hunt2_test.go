package reliability

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// TestNAPTAdminForwardAddedAfterMapping (h/hunt2): a client holds an IPv4
// mapping of public port 40080; then the admin forwards 40080 with a DNAT
// rule of their own (one pcpd reads: h/adminports), and pcpd reads it
// (a NAT-PMP mapping of another port asks for a fresh read). The client's
// renewal, same request, must not keep 40080: the admin's forward, at
// dstnat, takes every connection to it (the client's mapping is dead,
// yet renewed with SUCCESS), and one hooked after pcpd's (dstnat + 2) is
// never reached while the client renews. Judged by the kernel (no
// element of pcpd's on 40080 after the renewal) and by connections from
// the internet: 40080 reaches the admin's backend, the renewal's port the
// client.
//
// Before the fix both rows failed: "the renewal kept the admin's
// forwarded port: granted 198.51.100.1:40080 again".
func TestNAPTAdminForwardAddedAfterMapping(t *testing.T) {
	for _, tc := range []struct {
		name string
		prio string
		pcp  bool // a PCP MAP renewed with its nonce, else NAT-PMP
	}{
		{"NAT-PMP, admin at dstnat", "dstnat", false},
		{"PCP MAP, admin at dstnat + 2", "dstnat + 2", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			l := newLab(t, labOptions{})
			l.start()
			const port, other = 40080, 40090
			pub := l.topo.HostPublicV4
			backend := netip.AddrPortFrom(netip.MustParseAddr("10.100.2.7"), 80)
			admin := acceptCounter(t, l.topo.Client, backend.String())
			client := acceptCounter(t, l.topo.Client, netip.AddrPortFrom(l.topo.ClientV4, port).String())
			c := l.pcpClient(l.topo.ClientV4)
			req := pcp.NewMap(l.topo.ClientV4, pcp.ProtoTCP, port, time.Hour)
			req.Map.ExternalPort = port
			renew := func() netip.AddrPort {
				t.Helper()
				if !tc.pcp {
					return l.mustPMP(c, pcp.PMPOpMapTCP, port, time.Hour)
				}
				r, err := do(c, req)
				if err != nil || r.Result != pcp.Success {
					t.Fatalf("MAP renewal: %v %v", r, err)
				}
				return netip.AddrPortFrom(r.Map.ExternalAddr.Unmap(), r.Map.ExternalPort)
			}
			if got := renew(); got.Port() != port {
				t.Fatalf("first mapping: granted %v, want port %d", got, port)
			}
			l.topo.Host.MustRun(t, "nft", "add table ip admin")
			l.topo.Host.MustRun(t, "nft", "add chain ip admin pre { type nat hook prerouting priority "+tc.prio+"; }")
			l.topo.Host.MustRun(t, "nft", adminForward(pub, port, backend, false))
			time.Sleep(2500 * time.Millisecond) // past hostPortsTTL: the next allocation reads the rules again
			l.mustPMP(c, pcp.PMPOpMapTCP, other, time.Hour)

			got := renew()
			kernel := l.kernel()
			for _, e := range kernel {
				if e.Pinhole.ExternalAddr == pub && e.Pinhole.ExternalPort == port {
					t.Errorf("kernel still maps the admin's forwarded port: %v", e.Pinhole)
				}
			}
			if got.Port() == port {
				t.Fatalf("the renewal kept the admin's forwarded port: granted %v again", got)
			}
			if err := l.topo.Internet.DialTCP(netip.AddrPortFrom(pub, port).String(), time.Second); err != nil || admin.Load() != 1 || client.Load() != 0 {
				t.Fatalf("a connection to the forwarded %d: %v; admin backend accepted %d (want 1), the client %d (want 0)", port, err, admin.Load(), client.Load())
			}
			if err := l.topo.Internet.DialTCP(got.String(), time.Second); err != nil || client.Load() != 1 {
				t.Fatalf("the renewal's mapping %v: %v; the client accepted %d (want 1)", got, err, client.Load())
			}
			t.Logf("renewal moved the mapping to %v; 40080 reaches the admin's backend", got)
		})
	}
}
