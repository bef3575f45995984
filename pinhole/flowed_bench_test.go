package pinhole_test

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// BenchmarkFlowedAdmit: what the record of admitted flows (flowed.go:
// the admission rule's goto admit6, admit6's "add @flowed6 { ip6 daddr }
// accept") costs a new flow's packet. A one-way UDP stream from the
// Internet to the client through a port pinhole: with no reply every
// datagram is in state new, so each one takes the admission rule (as a
// new flow's first packet does) and the record's add (a lookup hit after
// the first). Rows: the layout as Setup writes it; "no record" (the
// admission rule accepting itself, as before flowed.go); "record x9" (8
// more copies of the add, without a verdict, at guard6's head: (x9 -
// record) / 8 is one add's cost out of the noise). cpu-ns/datagram as
// in BenchmarkGuardNewFlow: sender, host forwarding and receiver.
func BenchmarkFlowedAdmit(b *testing.B) {
	for _, tc := range []struct {
		name   string
		record bool
		more   int
	}{
		{"record", true, 0},
		{"no record", false, 0},
		{"record x9", true, 8},
	} {
		b.Run(tc.name, func(b *testing.B) {
			topo, be := guardedTopology(b, pinhole.Config{})
			dst := netip.AddrPortFrom(topo.ClientV6, 7000)
			apply(b, be, install(pinhole.Pinhole{Protocol: udp, InternalAddr: dst.Addr(), InternalPort: dst.Port()}, time.Hour))
			if !tc.record {
				replaceAdmission(b, topo.Host)
			}
			for range tc.more {
				topo.Host.MustRun(b, "nft", "insert", "rule", "inet", "pcpd", "guard6", "meta", "nfproto", "ipv6", "add", "@flowed6", "{", "ip6", "daddr", "}")
			}
			rx := listenUDP(b, topo.Client, dst)
			rx.SetReadBuffer(1 << 20)
			burstsFrom(b, topo.Internet, dst, rx)
		})
	}
}

// replaceAdmission makes guard6's port pinhole admission rule accept
// itself, as the layout before flowed.go.
func replaceAdmission(b testing.TB, host *netlab.NS) {
	b.Helper()
	out := host.MustRun(b, "nft", "-a", "list", "chain", "inet", "pcpd", "guard6")
	m := regexp.MustCompile(`(?m)^\s*(.*@pin6 ct label set \S+) goto admit6 # handle (\d+)$`).FindStringSubmatch(out)
	if m == nil {
		b.Fatalf("no admission rule of pin6 in guard6:\n%s", out)
	}
	host.MustRun(b, "nft", "replace", "rule", "inet", "pcpd", "guard6", "handle", m[2], m[1]+" accept")
}

// BenchmarkFlowedAddrsFull (review h/revflow): FlowedAddrs, read at
// each conntrack walk that may leave filters out (server's
// skipUnflowed), over flowed6 holding n addresses (its size, 65 536, at
// the top): the counter's read and the lookups of the 16 addresses asked,
// given up front as skipUnflowed gives them (one round trip since
// h/flowprune; one each before). ns/op is the flusher's cost per walk
// before it decides to skip.
func BenchmarkFlowedAddrsFull(b *testing.B) {
	for _, n := range []int{0, 4096, 65536} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			topo, be := guardedTopology(b, pinhole.Config{})
			fillFlowed(b, topo.Host, n)
			if _, ok := be.FlowedAddrs(); !ok {
				b.Fatal("FlowedAddrs untrusted")
			}
			// As a walk asks: 16 ended pinholes' addresses, half of
			// them in the set.
			var asked []netip.Addr
			for i := range 16 {
				a := netip.MustParseAddr(fmt.Sprintf("2001:db8:ff00::%x:%x", i>>16, i&0xffff))
				if i%2 == 1 {
					a = netip.MustParseAddr(fmt.Sprintf("2001:db8:fe00::%x", i))
				}
				asked = append(asked, a)
			}
			b.ReportAllocs()
			for b.Loop() {
				flowed, ok := be.FlowedAddrs(asked...)
				if !ok {
					b.Fatal("FlowedAddrs untrusted")
				}
				for i, a := range asked {
					if got, want := flowed(a), i%2 == 0 && i < n; got != want {
						b.Fatalf("flowed(%v) %v, want %v", a, got, want)
					}
				}
			}
		})
	}
}

// fillFlowed adds n addresses of 2001:db8:ff00::/64 to flowed6.
func fillFlowed(b testing.TB, host *netlab.NS, n int) {
	b.Helper()
	fillFlowedFrom(b, host, 0, n)
}

// fillFlowedFrom adds the addresses from to to (not included) of
// 2001:db8:ff00::/64 to flowed6, fillFlowed's numbering.
func fillFlowedFrom(b testing.TB, host *netlab.NS, from, to int) {
	b.Helper()
	if to <= from {
		return
	}
	var sb strings.Builder
	for i := from; i < to; i += 1024 {
		sb.WriteString("add element inet pcpd flowed6 { ")
		for j := i; j < min(i+1024, to); j++ {
			if j > i {
				sb.WriteString(", ")
			}
			fmt.Fprintf(&sb, "2001:db8:ff00::%x:%x", j>>16, j&0xffff)
		}
		sb.WriteString(" }\n")
	}
	f := filepath.Join(b.TempDir(), "flowed.nft")
	if err := os.WriteFile(f, []byte(sb.String()), 0o644); err != nil {
		b.Fatal(err)
	}
	host.MustRun(b, "nft", "-f", f)
}

// BenchmarkFlowedLookups (h/flowprune): FlowedAddrs and 256 addresses
// asked (half of them in flowed6, which holds 4 096), looked up alone
// (each one round trip, as before h/flowprune) or given up front
// (flowedBatch a round trip). ns/op over 256 is one lookup's cost.
func BenchmarkFlowedLookups(b *testing.B) {
	topo, be := guardedTopology(b, pinhole.Config{})
	fillFlowed(b, topo.Host, 4096)
	if _, ok := be.FlowedAddrs(); !ok {
		b.Fatal("FlowedAddrs untrusted")
	}
	var asked []netip.Addr
	for i := range 256 {
		a := netip.MustParseAddr(fmt.Sprintf("2001:db8:ff00::%x:%x", i>>16, i&0xffff))
		if i%2 == 1 {
			a = netip.MustParseAddr(fmt.Sprintf("2001:db8:fe00::%x", i))
		}
		asked = append(asked, a)
	}
	for _, upFront := range []bool{false, true} {
		b.Run(map[bool]string{false: "alone", true: "batched"}[upFront], func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				var flowed func(netip.Addr) bool
				var ok bool
				if upFront {
					flowed, ok = be.FlowedAddrs(asked...)
				} else {
					flowed, ok = be.FlowedAddrs()
				}
				if !ok {
					b.Fatal("FlowedAddrs untrusted")
				}
				for i, a := range asked {
					if got, want := flowed(a), i%2 == 0; got != want {
						b.Fatalf("flowed(%v) %v, want %v", a, got, want)
					}
				}
			}
		})
	}
}

// BenchmarkForgetFlowed (h/flowprune): what a walk's prune costs the
// flusher: ForgetFlowed of 16 addresses of flowed6 (one transaction),
// then Reflowed of them (one more: only when a lease came meanwhile, here
// to put them back for the next op).
func BenchmarkForgetFlowed(b *testing.B) {
	topo, be := guardedTopology(b, pinhole.Config{})
	fillFlowed(b, topo.Host, 16)
	if _, ok := be.FlowedAddrs(); !ok {
		b.Fatal("FlowedAddrs untrusted")
	}
	var as []netip.Addr
	for i := range 16 {
		as = append(as, netip.MustParseAddr(fmt.Sprintf("2001:db8:ff00::%x:%x", i>>16, i&0xffff)))
	}
	b.ReportAllocs()
	for b.Loop() {
		if !be.ForgetFlowed(as) {
			b.Fatal("ForgetFlowed failed")
		}
		be.Reflowed(as)
	}
	if flowed, ok := be.FlowedAddrs(as...); !ok || !flowed(as[0]) {
		b.Fatal("not added back")
	}
}

// BenchmarkRegainFlowed (h/flowedlife): what one rebuild of the record
// costs (RegainFlowed(true): its transaction, flowedSettle's 20 ms wait,
// one dump of conntrack, the adds, the counter's read, the mark's
// delete): conntrack holding n unrelated entries (half IPv6), k IPv6
// flows a pinhole admitted (labelled) to k distinct client addresses
// (added back to flowed6) and e echo requests to e other client
// addresses (unlabelled: left out since h/flowtrust). Until h/flowtrust
// the k flows were unlabelled, which a rebuild since review h/revlife
// refuses ("let in through no guard"): those cases failed.
func BenchmarkRegainFlowed(b *testing.B) {
	label := make([]byte, 16)
	label[15] = 0x80 // flowLabel, bit 127
	for _, tc := range []struct{ n, k, e int }{{1000, 0, 0}, {100000, 0, 0}, {100000, 1000, 0}, {100000, 20000, 0}, {100000, 0, 20000}} {
		b.Run(fmt.Sprintf("unrelated=%d/flows=%d/echo=%d", tc.n, tc.k, tc.e), func(b *testing.B) {
			topo, be := guardedTopology(b, pinhole.Config{AllowEcho: true})
			netlab.FillConntrackUnrelated(b, topo.Host, tc.n+tc.k+tc.e)
			base := topo.ClientPrefix6.Addr().As16()
			src := netip.AddrPortFrom(topo.InternetV6, 40000)
			netlab.FillConntrack(b, topo.Host, tc.k+tc.e, func(i int) netlab.ConntrackEntry {
				a := base
				a[12], a[13], a[14], a[15] = 0, byte(i>>16), byte(i>>8), byte(i)|1
				if i >= tc.k {
					return netlab.ConntrackEntry{Proto: 58, Src: src, Dst: netip.AddrPortFrom(netip.AddrFrom16(a), 0), Status: 2}
				}
				return netlab.ConntrackEntry{Proto: 17, Src: src, Dst: netip.AddrPortFrom(netip.AddrFrom16(a), 7000), Status: 2 | 4, Labels: label}
			})
			b.ResetTimer()
			for range b.N {
				if ok, err := be.RegainFlowed(true); err != nil || !ok {
					b.Fatalf("RegainFlowed: %v, %v", ok, err)
				}
			}
			b.StopTimer()
			flowed, ok := be.FlowedAddrs()
			a := base
			a[15] = 1
			if tc.k > 0 && (!ok || !flowed(netip.AddrFrom16(a))) {
				b.Fatal("a flow's address not recorded by the rebuild")
			}
		})
	}
}

// BenchmarkFlowedAddrsWalk (h/flushdump): FlowedAddrs as the churn row's
// flusher calls it every 100 ms (BENCHMARKS.md items 81, 82): ≈ 900
// distinct ended pinholes' addresses asked up front, none of them in
// flowed6, which holds n others. The "ns/addr" metric is one address's
// cost (the counter's read, ≈ 0.15 ms, spread over them). "read" is as
// FlowedAddrs chooses (since h/flushone a set this small is read whole:
// flowedsmall.go), "lookups" the lookups alone (flowedDumpMax -1).
func BenchmarkFlowedAddrsWalk(b *testing.B) {
	for _, n := range []int{0, 128, 512, 4096} {
		for _, mode := range []string{"read", "lookups"} {
			b.Run(fmt.Sprintf("%d/%s", n, mode), func(b *testing.B) {
				if mode == "lookups" {
					defer pinhole.SetFlowedDumpMax(-1)()
				}
				topo, be := guardedTopology(b, pinhole.Config{})
				fillFlowed(b, topo.Host, n)
				var asked []netip.Addr
				for i := range 900 {
					asked = append(asked, netip.MustParseAddr(fmt.Sprintf("2001:db8:fe00::%x", i)))
				}
				b.ReportAllocs()
				for b.Loop() {
					flowed, ok := be.FlowedAddrs(asked...)
					if !ok {
						b.Fatal("FlowedAddrs untrusted")
					}
					if flowed(asked[0]) {
						b.Fatalf("flowed(%v) true, want false", asked[0])
					}
				}
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(asked)), "ns/addr")
			})
		}
	}
}
