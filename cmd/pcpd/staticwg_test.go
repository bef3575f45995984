package main

import (
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/internal/pcpdtest"
	"github.com/pcpd/pcpd/pcp"
)

// TestServeStaticOnWireGuardWarns (h/putback; issue 9): pcpd serve with
// --client on a (userspace) WireGuard interface, configured by an
// alternative name, says once at start that the peers' AllowedIPs there
// are not consulted, naming the interface as configured; on a plain
// interface (veth) it says nothing of the kind. Before, nothing was said
// ('0 warnings naming ..., want 1').
func TestServeStaticOnWireGuardWarns(t *testing.T) {
	const warning = "the peers' AllowedIPs on these WireGuard interfaces are not consulted"
	for _, tc := range []struct {
		name string
		wg   bool
	}{{"wireguard", true}, {"veth", false}} {
		t.Run(tc.name, func(t *testing.T) {
			netlab.RequireRoot(t)
			topo := netlab.NewTopology(t, netlab.TopologyOptions{WireGuard: tc.wg})
			iface := topo.HostLANIf
			if tc.wg {
				iface = "pcpd-static-" + netlab.Rand(8)
				topo.Host.MustRun(t, "ip", "link", "property", "add", "dev", topo.HostLANIf, "altname", iface)
			}
			dir := t.TempDir()
			d := pcpdtest.Start(t, pcpdtest.Config{
				NS: topo.Host,
				Args: []string{"serve", "--interface", iface,
					"--client", "home=" + topo.ClientPrefix6.String(),
					"--state-dir", filepath.Join(dir, "state"), "--socket", filepath.Join(dir, "pcpd.sock")},
				Ready: pcpdtest.Announce(topo.Client, topo.ClientV6, netip.AddrPortFrom(topo.HostTunnelV6, pcp.Port)),
			})
			defer d.Stop()
			// Said before serving: Ready has seen it, if at all.
			var lines []string
			for l := range strings.SplitSeq(d.Log().String(), "\n") {
				if strings.Contains(l, warning) {
					lines = append(lines, l)
				}
			}
			want := 0
			if tc.wg {
				want = 1
			}
			if len(lines) != want {
				t.Fatalf("%d warnings that AllowedIPs are not consulted, want %d:\n%s", len(lines), want, d.Log().Tail(30))
			}
			if want == 1 {
				t.Logf("start-up warning: %s", lines[0])
			}
			if want == 1 && !strings.Contains(lines[0], `"interfaces": ["`+iface+`"]`) {
				t.Errorf("the warning does not name the interface %q as configured: %s", iface, lines[0])
			}
		})
	}
}
