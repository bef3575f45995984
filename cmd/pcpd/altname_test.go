package main

import (
	"context"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/control"
	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/internal/pcpdtest"
	"github.com/pcpd/pcpd/pcp"
)

// TestServeLongAltname: pcpd serve configured only by a 40-byte
// alternative name of the host's (userspace) WireGuard interface ("ip link
// property add ... altname", up to 127 bytes; the kernel name is at most
// 15) serves it end to end: the config takes the name, the listener binds
// to the interface (SO_BINDTODEVICE by the kernel name), WireGuard
// ownership reads the peers (wgctrl by the kernel name: the userspace
// control socket is /var/run/wireguard/KERNELNAME.sock), a client's MAP
// is answered SUCCESS and opens its port to the internet, and its request
// went through the kernel meter: serving_ifs holds the kernel name (what
// "meta iifname" matches), and control_local's meter6 holds the client's
// /64.
func TestServeLongAltname(t *testing.T) {
	netlab.RequireRoot(t)
	topo := netlab.NewTopology(t, netlab.TopologyOptions{WireGuard: true})
	alt := "pcpd-tunnel-to-the-clients-" + netlab.Rand(13)
	if len(alt) != 40 {
		t.Fatalf("altname %q is %d bytes, want 40", alt, len(alt))
	}
	topo.Host.MustRun(t, "ip", "link", "property", "add", "dev", topo.HostLANIf, "altname", alt)
	dir := t.TempDir()
	sock := filepath.Join(dir, "pcpd.sock")
	d := pcpdtest.Start(t, pcpdtest.Config{
		NS: topo.Host,
		Args: []string{"serve", "--interface", alt,
			"--state-dir", filepath.Join(dir, "state"), "--socket", sock},
		Ready: pcpdtest.Announce(topo.Client, topo.ClientV6, netip.AddrPortFrom(topo.HostTunnelV6, pcp.Port)),
	})

	st, err := (&control.Client{Path: sock}).Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if want := "wireguard:" + alt; st.OwnershipSource != want {
		t.Errorf("ownership source %q, want %q", st.OwnershipSource, want)
	}
	if !slices.ContainsFunc(st.Listen, func(s string) bool { return strings.Contains(s, topo.HostTunnelV6.String()) }) {
		t.Errorf("listening on %q, want %s among them", st.Listen, topo.HostTunnelV6)
	}
	if out := topo.Host.MustRun(t, "nft", "list", "set", "inet", "pcpd", "serving_ifs"); !strings.Contains(out, `"`+topo.HostLANIf+`"`) || strings.Contains(out, alt) {
		t.Errorf("serving_ifs must hold the kernel name %q, not the altname:\n%s", topo.HostLANIf, out)
	}

	target := net.JoinHostPort(topo.ClientV6.String(), "8080")
	topo.Client.ServeTCP(t, target)
	if topo.Internet.DialTCP(target, 700*time.Millisecond) == nil {
		t.Fatal("client's port reachable before the MAP")
	}
	out, err := topo.Client.Run(d.Bin(), "map", "--server", topo.HostTunnelV6.String(), "--port", "8080")
	if err != nil || !strings.Contains(out, "SUCCESS") {
		t.Fatalf("map over the interface configured as %q: %v\n%s", alt, err, out)
	}
	if err := netlab.Eventually(5*time.Second, func() error { return topo.Internet.DialTCP(target, time.Second) }); err != nil {
		t.Errorf("mapped port unreachable: %v", err)
	}
	if log := d.Log().String(); !strings.Contains(log, `"kernel_name": "`+topo.HostLANIf+`"`) {
		t.Errorf("the serving log lines do not name the kernel name %s:\n%s", topo.HostLANIf, d.Log().Tail(20))
	}
	// meter6 keys are the source's /64.
	p64 := netip.PrefixFrom(topo.ClientV6, 64).Masked().Addr().String()
	if out := topo.Host.MustRun(t, "nft", "list", "set", "inet", "pcpd", "meter6"); !strings.Contains(out, p64) {
		t.Errorf("the client's requests skipped control_local (meter6 lacks %s):\n%s", p64, out)
	}
}
