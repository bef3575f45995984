package server

import (
	"fmt"
	"net/netip"
	"strconv"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
)

// BenchmarkCtAllProtoWalk (root; BENCHMARKS.md, h/allproto): one
// kernel-filtered walk (walkCt) ending an IPv6 all-protocols mapping's
// flows (the group of protocol 0: the kernel cannot filter it, so its dump
// is the family's whole table) as the flusher runs it (live: every matched
// flow asked of the live leases), in a namespace whose table holds 100 000
// unrelated IPv6 UDP entries and `ended` entries (TCP and UDP, alternate)
// to the mapping's address, which the walk deletes (remade before each
// walk, untimed). Reported: ms a walk, bytes and allocations a walk, and
// flows ended a walk.
func BenchmarkCtAllProtoWalk(b *testing.B) {
	const unrelated = 100000
	for _, ended := range []int{0, 1000} {
		b.Run(fmt.Sprintf("unrelated=%d/ended=%d", unrelated, ended), func(b *testing.B) {
			netlab.RequireRoot(b)
			ns := netlab.NewNS(b, "ctallb")
			ns.MustRun(b, "sysctl", "-qw", "net.netfilter.nf_conntrack_max="+strconv.Itoa(2*(unrelated+ended)))
			fillUnrelated6(b, ns, unrelated)
			h, err := ns.Handle()
			if err != nil {
				b.Fatal(err)
			}
			defer h.Close()
			s := walkBenchServer(b, Config{NetNS: h}, "2001:db8:1::/48")
			defer s.ctSock.close()
			addr := netip.MustParseAddr("2001:db8:1::7")
			fs := []ctFilter{{t: ctTarget{addr: addr}}} // all protocols, all ports
			fill := func() { fillFlowsTo(b, ns, addr, ended) }
			timeWalks(b, ns, ended, fill, func() ([]ctFilter, error) { return s.walkLive(slicesClone(fs)) })
		})
	}
}
