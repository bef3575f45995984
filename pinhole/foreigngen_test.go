package pinhole_test

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// genRuleset is an admin's DNAT rules whose answer can change three ways:
// a commit (a rule, an element), the packet path (learn adds the
// destination port of a UDP datagram to 7500 to dyn, which the DNAT rule
// matches: a set with timeouts takes it without the dynamic flag) and
// nothing else.
const genRuleset = `table ip admin {
	set dyn {
		type inet_service; flags timeout
	}
	map fwdmap {
		type inet_service : ipv4_addr
		elements = { 6000 : 10.100.2.7 }
	}
	chain pre {
		type nat hook prerouting priority dstnat;
		tcp dport 443 dnat to 10.100.2.7
		udp dport @dyn dnat to 10.100.2.7
		dnat to tcp dport map @fwdmap
	}
	chain learn {
		type filter hook prerouting priority raw;
		udp dport 7500 add @dyn { udp dport }
	}
}
`

// TestForeignDNATSkipsUnchanged (root, h/nftgen): ForeignDNAT reads the
// host's ruleset again only when it may have changed: pcpd's own
// transactions (installs and deletes of its pinholes, a health check)
// leave the last read standing, counted as skipped, its answer the same;
// another process's commit (a rule, a map element), a set element the
// packet path added each make the next call read, and the ports appear;
// a rule committed while a read went on (told after it) makes the call
// read again at once. Before
// (every call read): "read 2 times after pcpd's own transactions, want 1".
func TestForeignDNATSkipsUnchanged(t *testing.T) {
	ns := netlab.NewNS(t, "fgen")
	b := newBackend(t, ns, pinhole.Config{})
	loadNft(t, ns, genRuleset)
	ext := netip.MustParseAddr("198.51.100.1")
	wantReads := uint64(0)
	check := func(step string, read bool, tcpWant, udpWant string) {
		t.Helper()
		r0, s0 := b.ForeignReads()
		f, err := b.ForeignDNAT(ext, 1024, 65535)
		if err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		r, s := b.ForeignReads()
		if read {
			wantReads++
		}
		if r != wantReads || r+s != r0+s0+1 {
			t.Fatalf("%s: read %d times, want %d (skipped %d)", step, r, wantReads, s)
		}
		if got, got2 := f.TCP.String(), f.UDP.String(); got != tcpWant || got2 != udpWant {
			t.Fatalf("%s: TCP %q UDP %q, want %q %q", step, got, got2, tcpWant, udpWant)
		}
		t.Logf("%s: read %v (reads %d, skipped %d): TCP %s UDP %s", step, r != r0, r, s, f.TCP.String(), f.UDP.String())
	}
	check("first", true, "443,6000", "")

	// pcpd's own transactions: 20 installs and 20 deletes, a check.
	ownTransactions(t, b, ext, 20)
	check("after pcpd's own transactions", false, "443,6000", "")
	check("nothing changed", false, "443,6000", "")

	ns.MustRun(t, "nft", "add rule ip admin pre tcp dport 444 dnat to 10.100.2.7")
	check("a rule added by nft", true, "443-444,6000", "")
	check("nothing changed", false, "443-444,6000", "")
	ns.MustRun(t, "nft", "add element ip admin fwdmap { 6001 : 10.100.2.7 }")
	check("a map element added by nft", true, "443-444,6000-6001", "")

	// The packet path adds 7500 to dyn: no commit, no notification.
	sendUDPFrom(t, ns, netip.MustParseAddrPort("127.0.0.1:7500"))
	if out := ns.MustRun(t, "nft", "list set ip admin dyn"); !strings.Contains(out, "7500") {
		t.Fatalf("the datagram did not reach learn: %s", out)
	}
	check("an element the packet path added", true, "443-444,6000-6001", "7500")
	check("nothing changed", false, "443-444,6000-6001", "7500")

	// A rule in a new table committed once the read has listed the chains:
	// the generation listener tells it after the read, which is made
	// again in the same call (review h/revf4: before, that read, missing
	// it, was answered and the next call read again).
	pinhole.SetForeignReadHook(func() {
		pinhole.SetForeignReadHook(nil)
		loadNft(t, ns, "table ip late {\n\tchain pre {\n\t\ttype nat hook prerouting priority dstnat;\n\t\ttcp dport 445 dnat to 10.100.2.7\n\t}\n}\n")
	})
	t.Cleanup(func() { pinhole.SetForeignReadHook(nil) })
	ns.MustRun(t, "nft", "add table ip other") // a commit: the next call reads (and meets the hook)
	check("a rule committed during the read", true, "443-445,6000-6001", "7500")
	check("the call after it", false, "443-445,6000-6001", "7500")
	check("nothing changed", false, "443-445,6000-6001", "7500")
}

// BenchmarkForeignDNATSkipped (root, h/nftgen): ForeignDNAT when nothing
// changed since its last read (the socket drained, no set to dump again),
// beside a full read (ForgetForeign), with n admin rules in one chain.
func BenchmarkForeignDNATSkipped(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		for _, mode := range []string{"read", "skipped"} {
			b.Run(fmt.Sprintf("rules=%d/%s", n, mode), func(b *testing.B) {
				ns := netlab.NewNS(b, "fgenb")
				be := newBackend(b, ns, pinhole.Config{})
				loadNft(b, ns, "table ip admin {\n\tchain pre {\n\t\ttype nat hook prerouting priority dstnat;\n\t}\n}\n")
				for i := 0; i < n; i += 1000 {
					var rs strings.Builder
					for j := i; j < min(n, i+1000); j++ {
						fmt.Fprintf(&rs, "add rule ip admin pre tcp dport %d dnat to 10.100.2.7\n", 20000+j)
					}
					loadNft(b, ns, rs.String())
				}
				ext := netip.MustParseAddr("198.51.100.1")
				if _, err := be.ForeignDNAT(ext, 1024, 65535); err != nil {
					b.Fatal(err)
				}
				r0, _ := be.ForeignReads()
				b.ResetTimer()
				for b.Loop() {
					if mode == "read" {
						pinhole.ForgetForeign(be)
					}
					f, err := be.ForeignDNAT(ext, 1024, 65535)
					if err != nil || f.Rules != n {
						b.Fatalf("%v rules, %v", f, err)
					}
				}
				b.StopTimer()
				r, s := be.ForeignReads()
				b.ReportMetric(float64(r-r0), "reads")
				b.ReportMetric(float64(s), "skips")
			})
		}
	}
}
