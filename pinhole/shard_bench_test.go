package pinhole_test

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pinhole"
)

// BenchmarkShardLookup (BENCHMARKS.md item 76): what spreading pin6 over S
// sets would cost a new flow's packet. BenchmarkFlowedAdmit's one-way UDP
// stream (every datagram in state new, admitted by pin6) with, at guard6's
// head, lookups that miss in sets of pin6's type holding 7 500 elements
// each: "miss xN" is N rules of one lookup each (a packet whose pinhole is
// in the last of N+1 shards, or a packet of no pinhole in N shards);
// "jhash vmap" is one rule hashing the key to a verdict map of 16 chains,
// each of one lookup (a shard chosen by the kernel's jhash, as pcpd would
// compute it): its cost does not grow with S. cpu-ns/datagram as in
// BenchmarkGuardNewFlow.
func BenchmarkShardLookup(b *testing.B) {
	const key = `ip6 daddr . meta l4proto . th dport`
	for _, tc := range []struct {
		name  string
		miss  int
		jhash bool
	}{
		{"layout", 0, false},
		{"miss x7", 7, false},
		{"miss x15", 15, false},
		{"jhash vmap", 0, true},
	} {
		b.Run(tc.name, func(b *testing.B) {
			topo, be := guardedTopology(b, pinhole.Config{})
			dst := netip.AddrPortFrom(topo.ClientV6, 7000)
			apply(b, be, install(pinhole.Pinhole{Protocol: udp, InternalAddr: dst.Addr(), InternalPort: dst.Port()}, time.Hour))
			var sb strings.Builder
			sets := tc.miss
			if tc.jhash {
				sets = 16
			}
			for i := range sets {
				fmt.Fprintf(&sb, "add set inet pcpd px%d { type ipv6_addr . inet_proto . inet_service; flags timeout; }\n", i)
				for j := range 15 {
					fmt.Fprintf(&sb, "add element inet pcpd px%d { ", i)
					for k := range 500 {
						if k > 0 {
							sb.WriteString(", ")
						}
						fmt.Fprintf(&sb, "2001:db8:%x::%x . udp . %d timeout 1h", i, j*500+k, 1024+k)
					}
					sb.WriteString(" }\n")
				}
			}
			if tc.jhash {
				for i := range 16 {
					fmt.Fprintf(&sb, "add chain inet pcpd cx%d\nadd rule inet pcpd cx%d %s @px%d counter accept\n", i, i, key, i)
				}
				fmt.Fprintf(&sb, "insert rule inet pcpd guard6 meta nfproto ipv6 jhash %s mod 16 seed 0x1 vmap { ", key)
				for i := range 16 {
					if i > 0 {
						sb.WriteString(", ")
					}
					fmt.Fprintf(&sb, "%d : jump cx%d", i, i)
				}
				sb.WriteString(" }\n")
			}
			for i := range tc.miss {
				fmt.Fprintf(&sb, "insert rule inet pcpd guard6 meta nfproto ipv6 %s @px%d counter accept\n", key, i)
			}
			if sets > 0 {
				f := filepath.Join(b.TempDir(), "shards.nft")
				if err := os.WriteFile(f, []byte(sb.String()), 0o600); err != nil {
					b.Fatal(err)
				}
				topo.Host.MustRun(b, "nft", "-f", f)
			}
			rx := listenUDP(b, topo.Client, dst)
			rx.SetReadBuffer(1 << 20)
			burstsFrom(b, topo.Internet, dst, rx)
		})
	}
}
