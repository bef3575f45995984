package main

import (
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/pinhole"
)

// TestLoadPrefixRoutedThroughLAN: in the bench's lab the host routes the
// whole prefix pcpd's static client "load" owns through the LAN, as a
// tunnel host routes a client's delegated prefix, so pcpd's route check
// (pinhole.NetlinkRoutes, the owner chain's interface comparison) finds
// the LAN for it and the owner chain passes the load's requests without a
// fib lookup. Before, only pieces of the /48 were routed, every lookup
// of the whole prefix answered none, and each request of the malformed,
// renewal and new-MAP rows paid a route lookup that a real client's would
// not (BENCHMARKS.md "What changed" 28).
func TestLoadPrefixRoutedThroughLAN(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces)")
	}
	b := &bench{o: options{out: t.TempDir()}}
	if err := b.setup(); err != nil {
		t.Fatal(err)
	}
	defer b.topo.Close()
	defer b.log.Close()
	out, err := b.topo.Host.Run("cat", "/sys/class/net/"+b.topo.HostLANIf+"/ifindex")
	if err != nil {
		t.Fatal(err)
	}
	lan, err := strconv.Atoi(strings.TrimSpace(out))
	if err != nil {
		t.Fatal(err)
	}
	h, err := b.topo.Host.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	routes, err := pinhole.NetlinkRoutesAt(h)
	if err != nil {
		t.Fatal(err)
	}
	defer routes.Close()
	for _, c := range []struct {
		name string
		p    netip.Prefix
	}{
		{"the owned prefix (--client load=)", ownedPrefix},
		{"the load's sources", srcPrefix},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := c.p
			ifs, err := routes.Interfaces(p)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(ifs, []int{lan}) {
				t.Fatalf("Interfaces(%s) = %v, want [%d] (%s): the owner chain would look every request up", p, ifs, lan, b.topo.HostLANIf)
			}
		})
	}
}
