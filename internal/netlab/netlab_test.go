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

// TestRunInNamespace: Run's commands see the namespace's links (forked
// from a thread switched into it), a command reading /sys/class/net the
// namespace's interfaces too (through `ip netns exec`'s remount), and the
// calling goroutine's own thread is back where it was.
func TestRunInNamespace(t *testing.T) {
	a, b := NewNS(t, "runa"), NewNS(t, "runb")
	if err := Veth(a, "rt0", b, "rt1"); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		out := a.MustRun(t, "ip", "-o", "link", "show")
		if !strings.Contains(out, "rt0@") || strings.Contains(out, "rt1@") {
			t.Fatalf("run %d: links seen in %s:\n%s", i, a.Name, out)
		}
		out = b.MustRun(t, "sh", "-c", "ls /sys/class/net; echo 1 > /proc/sys/net/ipv6/conf/all/forwarding")
		if !strings.Contains(out, "rt1") || strings.Contains(out, "rt0") {
			t.Fatalf("run %d: /sys/class/net in %s:\n%s", i, b.Name, out)
		}
		if fwd := strings.TrimSpace(b.MustRun(t, "cat", "/proc/sys/net/ipv6/conf/all/forwarding")); fwd != "1" {
			t.Fatalf("run %d: forwarding %q in %s", i, fwd, b.Name)
		}
	}
	if out, err := exec.Command("ip", "-o", "link", "show").CombinedOutput(); err != nil || strings.Contains(string(out), "rt0@") || strings.Contains(string(out), "rt1@") {
		t.Fatalf("the test's own namespace sees the namespaces' links (%v):\n%s", err, out)
	}
}

func TestNeedsSysfs(t *testing.T) {
	for _, c := range []struct {
		args []string
		want bool
	}{
		{[]string{"ip", "link", "show"}, false},
		{[]string{"sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/forwarding; echo 1 > /proc/sys/net/ipv4/ip_forward"}, false},
		{[]string{"cat", "/sys/class/net/lan0/ifindex"}, true},
		{[]string{"sh", "-c", "for q in /sys/class/net/eth0/queues/rx-*; do echo 1 > $q/rps_cpus; done"}, true},
		{[]string{"sh", "-c", "cat /proc/sys/net/x /sys/class/net/y"}, true},
	} {
		if got := needsSysfs(c.args); got != c.want {
			t.Errorf("needsSysfs(%q) = %v, want %v", c.args, got, c.want)
		}
	}
}
