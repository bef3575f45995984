package pinhole_test

import (
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestLoopbackHostBucket (issue 9, h/local9's finding): the datagrams a
// process of the host sends to a served address come in over loopback
// and are charged to a bucket of the host's own in control_local
// (loopbackRules), never to an owner's chain, the unowned bucket or the
// per-source sets. The host's served address lies in the client's /64
// (and here its IPv4 in the client's 10.100.0.0/30), so before, the owner
// map sent a local user's flood from it to the client's chain, whose
// reverse-path rule passes loopback (nft_fib answers lo for a packet that
// arrived on it): the client's limit and its /64's meter6 element counted
// it, and the client's own requests, sent right after, were dropped in
// the kernel. A local user may claim any IPv6 address (IPV6_FREEBIND),
// the client's own too (IPv4 with IP_FREEBIND binds, but sendto fails:
// ENETUNREACH), and the host's other addresses are nobody's (the unowned
// bucket). Both families; with TrackControl too
// (the rule accepts without notrack). The flood itself is held to the
// host's bucket: what the socket did not get, the loopback rule counted.
func TestLoopbackHostBucket(t *testing.T) {
	const (
		rate, burst           = 20, 40
		ownerRate, ownerBurst = 20, 100
		flood                 = 400 // over loopback, paced: more than every bucket's burst
		client                = 20  // the client's own, right after: within its per-source and owner bursts
	)
	lan4 := netip.MustParsePrefix("10.100.0.0/30") // the client's, holding the host's 10.100.0.1
	for _, tc := range []struct {
		name     string
		track    bool                              // TrackControl: no notrack
		src      func(*netlab.Topology) netip.Addr // the flood's source, sent from Host over loopback
		freebind bool                              // src is not Host's: bound with IPV6_FREEBIND
		v4       bool                              // to the served IPv4 address (NAT-PMP), the client's IPv4 after
		metered  string                            // the meter set element the flood's source would be
	}{
		{"IPv6 from the served address", false, func(tp *netlab.Topology) netip.Addr { return tp.HostTunnelV6 }, false, false, "2001:db8:1:2::"},
		{"IPv4 from the served address", false, func(tp *netlab.Topology) netip.Addr { return tp.HostTunnelV4 }, false, true, "10.100.0.1"},
		{"IPv6 claiming the client's address", false, func(tp *netlab.Topology) netip.Addr { return tp.ClientV6 }, true, false, "2001:db8:1:2::"},
		{"IPv4 from 127.0.0.2 (nobody's)", false, func(*netlab.Topology) netip.Addr { return netip.MustParseAddr("127.0.0.2") }, false, true, "127.0.0.2"},
		{"IPv6 from the host's WAN address (nobody's)", false, func(tp *netlab.Topology) netip.Addr { return tp.HostWANV6 }, false, false, "2001:db8:ffff::"},
		{"IPv6 from the served address, TrackControl", true, func(tp *netlab.Topology) netip.Addr { return tp.HostTunnelV6 }, false, false, "2001:db8:1:2::"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			topo := netlab.NewTopology(t, netlab.TopologyOptions{})
			b := newBackend(t, topo.Host, pinhole.Config{TrackControl: tc.track, Meter: pinhole.Meter{Rate: rate, Burst: burst, Ports: []uint16{5351},
				OwnerRate: ownerRate, OwnerBurst: ownerBurst, UnownedRate: ownerRate, UnownedBurst: ownerBurst}})
			serveTunnel(t, b, topo)
			owners := []pinhole.Owner{{ID: "static:client", Prefixes: []netip.Prefix{topo.ClientPrefix6, lan4}}}
			if err := b.SetOwners(owners, nil); err != nil {
				t.Fatalf("SetOwners: %v", err)
			}
			if !topo.ClientPrefix6.Contains(topo.HostTunnelV6) || !lan4.Contains(topo.HostTunnelV4) {
				t.Fatalf("the host's %v, %v are not in the client's %v, %v", topo.HostTunnelV6, topo.HostTunnelV4, topo.ClientPrefix6, lan4)
			}
			pass := "notrack accept"
			if tc.track {
				pass = "accept"
			}
			if got, want := nftList(t, topo.Host, "chain", "inet", "pcpd", "control_local"),
				fmt.Sprintf("\t\tip saddr @served4 iif != \"lo\" counter packets 0 bytes 0 drop\n"+
					"\t\tiif \"lo\" limit rate over %d/second burst %d packets counter packets 0 bytes 0 drop\n"+
					"\t\tiif \"lo\" %s\n\t\tip6 saddr vmap @owners6\n", rate, burst, pass); !strings.Contains(got, want) {
				t.Errorf("control_local lacks\n%s\n%s", want, got)
			}
			dst := netip.AddrPortFrom(topo.HostTunnelV6, 5351)
			clientSrc := topo.ClientV6
			if tc.v4 {
				dst, clientSrc = netip.AddrPortFrom(topo.HostTunnelV4, 5351), topo.ClientV4
			}
			srv := countUDP(t, topo.Host, dst)
			src := tc.src(topo)

			got := sentFrom(t, topo.Host, src, dst, flood, tc.freebind, srv)
			t.Logf("%d from %v over loopback: socket got %d", flood, src, got)
			if got == 0 || got == flood {
				t.Errorf("%d from %v over loopback: socket got %d, want some, not all (the host's bucket: burst %d)", flood, src, got, burst)
			}
			owner := pinhole.OwnerChains(owners)["static:client"]
			if n := chainCounter(t, topo.Host, owner, "limit rate over"); n != 0 {
				t.Errorf("after %d from %v over loopback, the client's owner chain counted %d drops, want none:\n%s",
					flood, src, n, nftList(t, topo.Host, "chain", "inet", "pcpd", owner))
			}
			if n := chainCounter(t, topo.Host, "unowned", "limit rate over"); n != 0 {
				t.Errorf("after %d from %v over loopback, the unowned bucket counted %d drops, want none", flood, src, n)
			}
			for _, set := range []string{"meter6", "meter4"} {
				if out := nftList(t, topo.Host, "set", "inet", "pcpd", set); strings.Contains(out, tc.metered+" ") || strings.Contains(out, tc.metered+",") {
					t.Errorf("after %d from %v over loopback, %s holds %s:\n%s", flood, src, set, tc.metered, out)
				}
			}
			// The client's own requests, from its address on the LAN, right
			// after: all of them (its buckets are untouched).
			if n, _ := sendRoundRobin(t, topo.Client, []netip.Addr{clientSrc}, dst, client, srv); n != client {
				t.Errorf("after %d from %v over loopback, %d from the client's %v: socket got %d, want all (owner chain %s)",
					flood, src, client, clientSrc, n, nftList(t, topo.Host, "chain", "inet", "pcpd", owner))
			}
			if n := chainCounter(t, topo.Host, "control_local", `iif "lo" limit`); n != flood-got {
				t.Errorf("the loopback rule counted %d drops, want the %d the socket did not get", n, flood-got)
			}
			if err := b.Healthy(); err != nil {
				t.Fatalf("Healthy: %v", err)
			}
			// Its drops are the meter's (pcpd_kernel_requests_dropped_total
			// {reason="loopback-rate-limit"}), apart from the owner
			// chains' (h/lodrop): read by Healthy, and by a Setup before
			// it writes control_local again (its counter from 0), which
			// neither loses nor repeats them.
			want := pinhole.MeterDrops{Loopback: uint64(flood - got)}
			if d := b.MeterDrops(); d != want {
				t.Errorf("after %d from %v over loopback (socket got %d), MeterDrops %+v, want %+v", flood, src, got, d, want)
			}
			got2 := sentFrom(t, topo.Host, src, dst, flood, tc.freebind, srv)
			want.Loopback += uint64(flood - got2)
			if err := b.Setup(); err != nil {
				t.Fatalf("Setup again: %v", err)
			}
			if n := chainCounter(t, topo.Host, "control_local", `iif "lo" limit`); n != 0 {
				t.Fatalf("control_local written again, its loopback counter is %d, not 0: nothing to check", n)
			}
			for _, when := range []string{"after a second flood (socket got %d) and a Setup", "after another Healthy (second flood: socket got %d)"} {
				if err := b.Healthy(); err != nil {
					t.Fatalf("Healthy: %v", err)
				}
				if d := b.MeterDrops(); d != want {
					t.Errorf(when+": MeterDrops %+v, want %+v", got2, d, want)
				}
			}
		})
	}
}

// chainCounter is the packets counter of the first rule of chain whose
// listing holds match.
func chainCounter(t *testing.T, ns *netlab.NS, chain, match string) int64 {
	t.Helper()
	out := nftList(t, ns, "chain", "inet", "pcpd", chain)
	for _, line := range strings.Split(out, "\n") {
		if !strings.Contains(line, match) {
			continue
		}
		m := regexp.MustCompile(`counter packets (\d+) `).FindStringSubmatch(line)
		if m == nil {
			t.Fatalf("chain %s: no counter in %q", chain, line)
		}
		n, _ := strconv.ParseInt(m[1], 10, 64)
		return n
	}
	t.Fatalf("chain %s has no rule with %q:\n%s", chain, match, out)
	return 0
}
