package pinhole_test

import (
	"os"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
)

// openFDs is how many file descriptors this process holds.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestCloseClosesRawSockets: the netlink sockets a Backend dials for
// itself (the raw rule dumps of Setup's learning and of Healthy) are
// closed by Close (review7 L2: nothing closed them, so each Backend left
// up to two sockets, and their namespace, to the garbage collector).
func TestCloseClosesRawSockets(t *testing.T) {
	netlab.RequireRoot(t)
	topo := netlab.NewTopology(t, netlab.TopologyOptions{})
	b := meteredTunnel(t, topo, nsRoutes(t, topo.Host))
	if err := b.Healthy(); err != nil {
		t.Fatalf("Healthy: %v", err)
	}
	// Healthy dialled its raw socket (Setup's learning may have dialled
	// the other).
	before := openFDs(t)
	b.Close()
	after := openFDs(t)
	if after >= before {
		t.Fatalf("Close: %d file descriptors before, %d after; want the raw sockets closed", before, after)
	}
}
