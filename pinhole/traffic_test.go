package pinhole_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pinhole"
)

// TestPinholeLifecycle is the headline: for TCP and UDP, a
// connection from the internet to the client's address fails before the
// pinhole, works with it, fails after delete, and fails again once the
// kernel's element timeout has run out, with nothing of pcpd running.
func TestPinholeLifecycle(t *testing.T) {
	topo, b := guardedTopology(t, pinhole.Config{})
	for _, proto := range []uint8{tcp, udp} {
		t.Run(protoName(proto), func(t *testing.T) {
			dst := netip.AddrPortFrom(topo.ClientV6, 8000+uint16(proto))
			serve(t, topo.Client, proto, dst)
			// The client reaching out is not protected traffic.
			mustReach(t, "host to client (sanity, unguarded from inside)", topo.Client, proto, netip.Addr{}, netip.AddrPortFrom(topo.ClientV6, dst.Port()))
			mustNotReach(t, "before install", topo.Internet, proto, netip.Addr{}, dst)

			p := pinhole.Pinhole{Protocol: proto, InternalAddr: topo.ClientV6, InternalPort: dst.Port()}
			apply(t, b, install(p, time.Minute))
			mustReach(t, "after install", topo.Internet, proto, netip.Addr{}, dst)

			apply(t, b, del(p))
			mustNotReach(t, "after delete", topo.Internet, proto, netip.Addr{}, dst)

			// Kernel expiry: install with a short timeout, then drop every
			// reference to pcpd's side; only the kernel acts from here.
			apply(t, b, install(p, 2*time.Second))
			mustReach(t, "after re-install", topo.Internet, proto, netip.Addr{}, dst)
			time.Sleep(2500 * time.Millisecond)
			mustNotReach(t, "after kernel expiry", topo.Internet, proto, netip.Addr{}, dst)
		})
	}
}
