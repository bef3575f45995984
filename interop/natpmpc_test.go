package interop

import (
	"fmt"
	"net/netip"
	"regexp"
	"strings"
	"testing"
)

// natpmpc runs Debian's natpmpc (libnatpmp) inside the Client namespace
// against pcpd's IPv4 LAN address. timeout(1) bounds libnatpmp's own
// retransmissions (up to ~2 min without an answer).
func (l *lab) natpmpc(t *testing.T, args ...string) string {
	t.Helper()
	cmd := append([]string{"timeout", "15", "natpmpc", "-g", l.topo.HostTunnelV4.String()}, args...)
	out, err := l.topo.Client.Run(cmd...)
	if err != nil {
		t.Fatalf("natpmpc %s: %v", strings.Join(args, " "), err)
	}
	t.Logf("natpmpc %s:\n%s", strings.Join(args, " "), out)
	return out
}

// natpmpcMapped matches libnatpmp's success line for a mapping, e.g.
// "Mapped public port 8080 protocol TCP to local port 8080 liftime 3600"
// (sic: "liftime" is natpmpc's spelling).
var natpmpcMapped = regexp.MustCompile(`Mapped public port (\d+) protocol (TCP|UDP) to local port (\d+) lif?e?time (\d+)`)

// TestNatpmpc: RFC 6886 §3.2 (external address, PMP-03), §3.3 (map,
// PMP-04/PMP-11: the mapping carries traffic) and §3.4 (delete with
// lifetime 0, PMP-07) with Debian's natpmpc as the client.
func TestNatpmpc(t *testing.T) {
	requireRoot(t)
	requireTool(t, "natpmpc", "natpmpc")
	l := newLab(t)
	topo := l.topo

	t.Run("PMP-03 public address", func(t *testing.T) {
		out := l.natpmpc(t)
		want := "Public IP address : " + topo.HostPublicV4.String()
		if !strings.Contains(out, want) {
			t.Fatalf("natpmpc output lacks %q:\n%s", want, out)
		}
	})

	for _, tc := range []struct {
		id    string
		proto string
		port  uint16
	}{
		{"PMP-04 TCP", "tcp", 8080},
		{"PMP-04 UDP", "udp", 9090},
	} {
		t.Run(tc.id, func(t *testing.T) {
			port := fmt.Sprint(tc.port)
			l.checkPMPMapDelete(t, tc.proto, tc.port, func(t *testing.T) {
				out := l.natpmpc(t, "-a", port, port, tc.proto, "3600")
				m := natpmpcMapped.FindStringSubmatch(out)
				if m == nil {
					t.Fatalf("natpmpc map: no success line:\n%s", out)
				}
				if m[1] != port || !strings.EqualFold(m[2], tc.proto) || m[3] != port || m[4] != "3600" {
					t.Fatalf("natpmpc map: got public %s %s local %s lifetime %s, want %s %s %s 3600:\n%s",
						m[1], m[2], m[3], m[4], port, tc.proto, port, out)
				}
			}, func(t *testing.T) {
				// PMP-07: lifetime 0 deletes; the reply has external port
				// 0 and lifetime 0, which libnatpmp prints as a success
				// line.
				out := l.natpmpc(t, "-a", port, port, tc.proto, "0")
				if m := natpmpcMapped.FindStringSubmatch(out); m == nil || m[1] != "0" || m[3] != port || m[4] != "0" {
					t.Fatalf("natpmpc delete: want public port 0, local port %s, lifetime 0:\n%s", port, out)
				}
			})
		})
	}

	// PMP-08: natpmpc's "0 as private port and lifetime" deletes every
	// TCP mapping of this client at once.
	t.Run("PMP-08 delete all TCP", func(t *testing.T) {
		ports := []uint16{8181, 8282}
		for _, p := range ports {
			topo.Client.ServeTCP(t, fmt.Sprintf("%s:%d", topo.ClientV4, p))
			l.natpmpc(t, "-a", fmt.Sprint(p), fmt.Sprint(p), "tcp", "3600")
			if err := l.reachTCP(netip.AddrPortFrom(topo.HostPublicV4, p)); err != nil {
				t.Fatalf("tcp %d not reachable after the mapping: %v", p, err)
			}
		}
		out := l.natpmpc(t, "-a", "0", "0", "tcp", "0")
		if m := natpmpcMapped.FindStringSubmatch(out); m == nil || m[3] != "0" || m[4] != "0" {
			t.Fatalf("natpmpc delete-all: want local port 0, lifetime 0:\n%s", out)
		}
		for _, p := range ports {
			if err := l.blocked("tcp", netip.AddrPortFrom(topo.HostPublicV4, p)); err != nil {
				t.Errorf("PMP-08: %v", err)
			}
		}
	})
}
