package pinhole_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestNAPT4MoveExternalPort: one transaction that deletes a NAPT mapping
// and installs the same internal endpoint on another external port (what
// the engine sends when a new nonce replaces a MAP and the replacement
// gets another port, PROTOCOL.md choice (c)) works, in the kernel: the
// new public port forwards, the old one no longer does, and outbound
// leaves from the new port. The two NAPT elements differ, but their SNAT
// companions share a key (internal address . protocol . port), so the
// same phase adds the companion twice with different data.
func TestNAPT4MoveExternalPort(t *testing.T) {
	for _, tc := range []struct {
		name string
		ops  func(old, neu pinhole.Pinhole) []pinhole.Op
	}{
		{"delete then install", func(old, neu pinhole.Pinhole) []pinhole.Op {
			return []pinhole.Op{del(old), install(neu, time.Minute)}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			topo := netlab.NewTopology(t, netlab.TopologyOptions{})
			b := newBackend(t, topo.Host, pinhole.Config{})
			if err := b.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
				t.Fatal(err)
			}
			in := netip.AddrPortFrom(topo.ClientV4, 5000)
			echo, err := topo.Client.StartUDPEcho(in.String())
			if err != nil {
				t.Fatal(err)
			}
			defer echo.Close()
			oldPub := netip.AddrPortFrom(topo.HostPublicV4, 15000)
			newPub := netip.AddrPortFrom(topo.HostPublicV4, 15001)
			old := pinhole.Pinhole{Protocol: udp, InternalAddr: in.Addr(), InternalPort: in.Port(),
				ExternalAddr: oldPub.Addr(), ExternalPort: oldPub.Port()}
			neu := old
			neu.ExternalPort = newPub.Port()
			apply(t, b, install(old, time.Minute))
			mustReach(t, "before the move", topo.Internet, udp, netip.Addr{}, oldPub)

			if err := b.Apply(tc.ops(old, neu)); err != nil {
				t.Fatalf("moving %s from %s to %s: %v", in, oldPub, newPub, err)
			}
			mustReach(t, "new port after the move", topo.Internet, udp, netip.Addr{}, newPub)
			mustNotReach(t, "old port after the move", topo.Internet, udp, netip.Addr{}, oldPub)
			echo.Close() // seenFrom binds the internal endpoint itself
			if got, err := seenFrom(t, topo, in, 7001); err != nil || got != newPub {
				t.Fatalf("outbound from %s seen as %v (%v), want %s", in, got, err, newPub)
			}
			if err := b.Healthy(); err != nil {
				t.Fatal(err)
			}
		})
	}
}
