package pinhole_test

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// foreignRuleset is an admin's DNAT rules in the forms nft compiles
// them (h/adminports): the ports noted are those ForeignDNAT must find
// on 198.51.100.1.
const foreignRuleset = `table ip admin {
	set fwdports {
		type inet_service; flags interval
		elements = { 7000-7005, 7006-7010, 7100 }
	}
	chain pre {
		type nat hook prerouting priority dstnat;
		ip daddr 198.51.100.1 tcp dport 443 dnat to 10.100.2.7
		tcp dport 8000-8010 dnat to 10.100.2.7
		tcp dport { 9000, 9443 } dnat to 10.100.2.7
		udp dport @fwdports dnat to 10.100.2.7
		ip daddr 203.0.113.9 tcp dport 444 dnat to 10.100.2.7
		ip daddr 198.51.100.0/24 udp dport 5000 dnat to 10.100.2.7
		tcp dport 80 redirect to :8080
		meta l4proto tcp th dport 81 jump tohost
		tcp dport vmap { 82 : jump tohost }
		dnat to tcp dport map { 8081 : 10.100.2.7 }
		ip daddr . tcp dport { 198.51.100.1 . 8443 } dnat to 10.100.2.7
		ip daddr 198.51.100.1 dnat to 10.100.2.8
		tcp dport 84 jump odd
		meta l4proto tcp ct original proto-dst 3004 dnat to 10.100.2.7
		meta l4proto udp ct original proto-dst { 53, 5353-5360 } dnat to 10.100.2.7
		ct original ip daddr 203.0.113.9 meta l4proto tcp ct original proto-dst 3005 dnat to 10.100.2.7
	}
	chain odd {
		meta l4proto tcp ct original proto-dst 3003 dnat to 10.100.2.7
	}
	chain tohost {
		dnat to 10.100.2.7
	}
}
table inet fw {
	chain pre {
		type nat hook prerouting priority dstnat + 2;
		ip daddr 198.51.100.1 tcp dport 1024-65535 dnat ip to 10.100.2.7
		ip6 daddr 2001:db8::1 tcp dport 25 dnat ip6 to [2001:db8::2]
		tcp dport 26 dnat ip to 10.100.2.7
	}
}
table ip6 six {
	chain pre {
		type nat hook prerouting priority dstnat;
		tcp dport 27 dnat to [2001:db8::2]
	}
}
`

// TestForeignDNATKernel (root): ForeignDNAT reads the admin's rules as
// the kernel holds them, nft's own compilation of each form: an equal
// port, a range, anonymous and named (interval) sets, a redirect, a jump,
// a verdict map, a dnat map, UDP and TCP apart; a rule for another
// address and IPv6 rules take nothing; a concatenation is reported
// undecoded; the catch-alls are reported, not reserved, with their
// position beside pcpd's chain; pcpd's own chains (its DNAT chain holds
// a mapping of TCP 8500) are not the host's.
func TestForeignDNATKernel(t *testing.T) {
	ns := netlab.NewNS(t, "fdnat")
	b := newBackend(t, ns, pinhole.Config{})
	ext := netip.MustParseAddr("198.51.100.1")
	if err := b.Apply([]pinhole.Op{{Kind: pinhole.Install, Timeout: time.Hour, Pinhole: pinhole.Pinhole{Protocol: tcp, ExternalAddr: ext, ExternalPort: 8500,
		InternalAddr: netip.MustParseAddr("10.100.2.9"), InternalPort: 8500}}}); err != nil {
		t.Fatal(err)
	}
	loadNft(t, ns, foreignRuleset)
	f, err := b.ForeignDNAT(ext, 1024, 65535)
	if err != nil {
		t.Fatal(err)
	}
	// Chains pre and odd hold "ct original ..." rules, which
	// google/nftables v0.3.0 cannot parse: read by pcpd's own decoder
	// (h/left9; before, each chain was one undecoded record, its ports
	// not reserved). Odd's 3003 is reached only with tcp dport 84: none.
	if got, want := f.TCP.String(), "26,80-82,443,3004,8000-8010,8081,9000,9443"; got != want {
		t.Errorf("TCP ports %s, want %s", got, want)
	}
	if got, want := f.UDP.String(), "53,5000,5353-5360,7000-7010,7100"; got != want {
		t.Errorf("UDP ports %s, want %s", got, want)
	}
	if len(f.Undecoded) != 1 || f.Undecoded[0].Chain != "pre" || !strings.Contains(f.Undecoded[0].Why, "concatenation") {
		t.Errorf("undecoded: %+v, want the concatenation alone", f.Undecoded)
	}
	before := map[string]bool{}
	for _, r := range f.CatchAll {
		before[r.Table] = r.Before
		// h/left9: admin's takes every connection (each condition
		// read, as many expressions listed as the kernel holds); fw's
		// is TCP only.
		if (r.Table == "admin" && (r.Why != "" || !r.TCP || !r.UDP)) || (r.Table == "fw" && (!r.TCP || r.UDP)) {
			t.Errorf("catch-all %v: TCP %v, UDP %v, condition not read %q", r, r.TCP, r.UDP, r.Why)
		}
	}
	if len(f.CatchAll) != 2 || !before["admin"] || before["fw"] {
		t.Errorf("catch-alls: %+v, want admin's (before pcpd's chain) and fw's (after)", f.CatchAll)
	}
	t.Logf("%d rules; undecoded %v; catch-alls %v", f.Rules, f.Undecoded, f.CatchAll)
}

// BenchmarkForeignDNAT (root): one read of the host's DNAT rules, as the
// server's host port scan did every 2 s while ports are allocated (now
// only when the ruleset may have changed: BenchmarkForeignDNATSkipped),
// with n admin rules (one port each) in one chain.
func BenchmarkForeignDNAT(b *testing.B) {
	for _, n := range []int{10, 1000, 10000} {
		b.Run(fmt.Sprintf("rules=%d", n), func(b *testing.B) {
			ns := netlab.NewNS(b, "fdnatb")
			be := newBackend(b, ns, pinhole.Config{})
			loadNft(b, ns, "table ip admin {\n\tchain pre {\n\t\ttype nat hook prerouting priority dstnat;\n\t}\n}\n")
			for i := 0; i < n; i += 1000 { // a shell argument's size
				var rs strings.Builder
				for j := i; j < min(n, i+1000); j++ {
					fmt.Fprintf(&rs, "add rule ip admin pre tcp dport %d dnat to 10.100.2.7\n", 20000+j)
				}
				loadNft(b, ns, rs.String())
			}
			ext := netip.MustParseAddr("198.51.100.1")
			b.ResetTimer()
			for b.Loop() {
				pinhole.ForgetForeign(be) // a read each time (h/nftgen: else skipped)
				f, err := be.ForeignDNAT(ext, 1024, 65535)
				if err != nil || f.Rules != n {
					b.Fatalf("%v rules, %v", f, err)
				}
			}
		})
	}
}
