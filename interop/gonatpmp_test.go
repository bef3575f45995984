package interop

import (
	"net"
	"net/netip"
	"testing"
	"time"

	natpmp "github.com/jackpal/go-nat-pmp"
)

// TestGoNatPmp: RFC 6886 §3.2–3.4 with github.com/jackpal/go-nat-pmp as
// the client (the library behind many Go programs' NAT-PMP support).
// The library opens its socket inside each call, so every call runs in
// the Client namespace via Do.
func TestGoNatPmp(t *testing.T) {
	requireRoot(t)
	l := newLab(t)
	topo := l.topo
	client := natpmp.NewClientWithTimeout(net.IP(topo.HostTunnelV4.AsSlice()), 5*time.Second)

	t.Run("PMP-03 external address", func(t *testing.T) {
		var res *natpmp.GetExternalAddressResult
		err := topo.Client.Do(func() (err error) {
			res, err = client.GetExternalAddress()
			return err
		})
		if err != nil {
			t.Fatalf("GetExternalAddress: %v", err)
		}
		if got := netip.AddrFrom4(res.ExternalIPAddress); got != topo.HostPublicV4 {
			t.Fatalf("external address %s, want %s", got, topo.HostPublicV4)
		}
	})

	addMapping := func(proto string, internal, external, lifetime int) (*natpmp.AddPortMappingResult, error) {
		var res *natpmp.AddPortMappingResult
		err := topo.Client.Do(func() (err error) {
			res, err = client.AddPortMapping(proto, internal, external, lifetime)
			return err
		})
		return res, err
	}

	for _, tc := range []struct {
		id    string
		proto string
		port  uint16
	}{
		{"PMP-04 TCP", "tcp", 7070},
		{"PMP-04 UDP", "udp", 7171},
	} {
		t.Run(tc.id, func(t *testing.T) {
			l.checkPMPMapDelete(t, tc.proto, tc.port, func(t *testing.T) {
				res, err := addMapping(tc.proto, int(tc.port), int(tc.port), 3600)
				if err != nil {
					t.Fatalf("AddPortMapping %s %d: %v", tc.proto, tc.port, err)
				}
				if res.InternalPort != tc.port || res.MappedExternalPort != tc.port || res.PortMappingLifetimeInSeconds != 3600 {
					t.Fatalf("AddPortMapping: internal %d external %d lifetime %d, want %d %d 3600",
						res.InternalPort, res.MappedExternalPort, res.PortMappingLifetimeInSeconds, tc.port, tc.port)
				}
			}, func(t *testing.T) {
				// PMP-07: lifetime 0 (external port 0, as the library's
				// documentation asks) deletes.
				res, err := addMapping(tc.proto, int(tc.port), 0, 0)
				if err != nil {
					t.Fatalf("AddPortMapping delete: %v", err)
				}
				if res.InternalPort != tc.port || res.MappedExternalPort != 0 || res.PortMappingLifetimeInSeconds != 0 {
					t.Fatalf("delete reply: internal %d external %d lifetime %d, want %d 0 0",
						res.InternalPort, res.MappedExternalPort, res.PortMappingLifetimeInSeconds, tc.port)
				}
			})
		})
	}
}
