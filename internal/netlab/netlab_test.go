package netlab

import (
	"net"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Without any firewall, the topology must route: Internet reaches Client's
// IPv6 address, Client reaches Host's tunnel addresses. Every pinhole test
// relies on this baseline, so it is checked here once.
func TestTopologyRoutes(t *testing.T) {
	for _, wg := range []bool{false, true} {
		t.Run("wireguard="+strconv.FormatBool(wg), func(t *testing.T) {
			topo := NewTopology(t, TopologyOptions{WireGuard: wg})
			cl6 := net.JoinHostPort(topo.ClientV6.String(), "8080")
			topo.Client.ServeTCP(t, cl6)
			topo.Client.ServeUDPEcho(t, cl6)
			if err := Eventually(5*time.Second, func() error { return topo.Internet.DialTCP(cl6, time.Second) }); err != nil {
				t.Fatalf("internet -> client TCP: %v", err)
			}
			if err := topo.Internet.ProbeUDP(cl6, time.Second); err != nil {
				t.Fatalf("internet -> client UDP: %v", err)
			}
			for _, a := range []string{topo.HostTunnelV6.String(), topo.HostTunnelV4.String()} {
				addr := net.JoinHostPort(a, "9090")
				topo.Host.ServeTCP(t, addr)
				if err := Eventually(5*time.Second, func() error { return topo.Client.DialTCP(addr, time.Second) }); err != nil {
					t.Fatalf("client -> host %s: %v", addr, err)
				}
			}
		})
	}
}

func TestNamespaceCleanup(t *testing.T) {
	RequireRoot(t)
	ns, err := New("clean")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ns.Start(nil, "sleep", "60"); err != nil {
		t.Fatal(err)
	}
	if err := ns.Close(); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(out), ns.Name) {
		t.Fatalf("namespace %s still listed after Close", ns.Name)
	}
}

func TestUniqueIfName(t *testing.T) {
	seen := map[string]bool{}
	for i := 0; i < 100; i++ {
		n := UniqueIfName("wgtest")
		if len(n) > 15 || seen[n] {
			t.Fatalf("bad or repeated name %q", n)
		}
		seen[n] = true
	}
}
