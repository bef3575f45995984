package pinhole_test

import (
	"regexp"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// BenchmarkControlRuleCost: BenchmarkControlDatagram's round trip (a burst
// of 32 requests from the client's IPv6 address to the host's 5351 over a
// veth, echoed from the host's 5351) through pcpd's table as pcpd's default
// owner meter lays it out, and through the same table with one of its
// rules or lookups removed or rewritten by nft after Setup (BENCHMARKS.md
// item 34). The variants are for attribution under perf (nft_do_chain's
// samples a datagram), not layouts pcpd uses; "one served lookup" is the
// candidate for servedSourceRules; "no loopback rules" is control_local
// before loopbackRules (BENCHMARKS.md item 89). OWNER in a variant's
// script is the owner chain's name.
func BenchmarkControlRuleCost(b *testing.B) {
	const (
		local  = `add rule inet pcpd control_local ip6 saddr vmap @owners6; add rule inet pcpd control_local ip saddr vmap @owners4; add rule inet pcpd control_local goto unowned`
		served = `add rule inet pcpd control_local ip6 saddr @served6 ip6 saddr != fe80::/10 iif != "lo" counter drop; ` +
			`add rule inet pcpd control_local ip6 saddr @served6 iif != "lo" fib saddr . iif type local counter drop; ` +
			`add rule inet pcpd control_local ip saddr @served4 iif != "lo" counter drop; `
		limit = `limit rate over 2097152/second burst 2097152 packets counter drop`
		rpf   = `iif != "lan0" fib saddr . iif oif 0 counter drop`
	)
	meter := func(op string) string {
		return `add rule inet pcpd control_meter ` + op + ` @meter6 { ip6 saddr & ffff:ffff:ffff:ffff:: timeout 10s limit rate over 1048576/second burst 1048576 packets } drop; ` +
			`add rule inet pcpd control_meter ` + op + ` @meter4 { ip saddr timeout 10s limit rate over 1048576/second burst 1048576 packets } drop; `
	}
	x8 := func(r string) string {
		return strings.Repeat(`insert rule inet pcpd control_local `+r+`; `, 8)
	}
	for _, tc := range []struct {
		name   string
		owned  bool
		script string
	}{
		{"full", true, ""},
		{"no table", true, "delete table inet pcpd"},
		{"unowned", false, ""},
		{"no served-source rules", true, `flush chain inet pcpd control_local; ` + local},
		{"one served lookup", true, `flush chain inet pcpd control_local; ` +
			`add chain inet pcpd served_src6; add rule inet pcpd served_src6 ip6 saddr != fe80::/10 counter drop; add rule inet pcpd served_src6 fib saddr . iif type local counter drop; ` +
			`add rule inet pcpd control_local ip6 saddr @served6 iif != "lo" jump served_src6; ` +
			`add rule inet pcpd control_local ip saddr @served4 iif != "lo" counter drop; ` + local},
		// The second served-source rule with the link-local match first
		// (equivalent: a served source that is not link-local never gets
		// past the first rule), so a global source skips its lookup.
		{"served link-local first", true, `flush chain inet pcpd control_local; ` +
			`add rule inet pcpd control_local ip6 saddr @served6 ip6 saddr != fe80::/10 iif != "lo" counter drop; ` +
			`add rule inet pcpd control_local ip6 saddr fe80::/10 ip6 saddr @served6 iif != "lo" fib saddr . iif type local counter drop; ` +
			`add rule inet pcpd control_local ip saddr @served4 iif != "lo" counter drop; ` + local},
		// served6, served4 and serving_ifs made again with a size, which
		// gets the kernel's fixed-size hash (nft_hash) for them instead of
		// the resizable one (nft_rhash).
		{"sized served sets", true, `flush chain inet pcpd control_in; flush chain inet pcpd control_local; ` +
			`delete set inet pcpd served6; delete set inet pcpd served4; delete set inet pcpd serving_ifs; ` +
			`add set inet pcpd served6 { type ipv6_addr; size 64; elements = { 2001:db8:1:2::1 }; }; ` +
			`add set inet pcpd served4 { type ipv4_addr; size 64; elements = { 10.100.0.1 }; }; ` +
			`add set inet pcpd serving_ifs { type ifname; size 64; elements = { "lo", "lan0", "wan0" }; }; ` +
			`add rule inet pcpd control_in udp dport 5351 ip6 daddr @served6 iifname @serving_ifs goto control_local; ` +
			`add rule inet pcpd control_in udp dport 5351 ip daddr @served4 iifname @serving_ifs goto control_local; ` +
			served + local},
		// Eight more copies of one rule at control_local's head, which
		// every request passes without a match: its own cost, eight times.
		{"x8 served rule 1", true, x8(`ip6 saddr @served6 ip6 saddr != fe80::/10 iif != "lo" counter drop`)},
		{"x8 served rule 2", true, x8(`ip6 saddr @served6 iif != "lo" fib saddr . iif type local counter drop`)},
		{"x8 served rule 2 link-local first", true, x8(`ip6 saddr fe80::/10 ip6 saddr @served6 iif != "lo" fib saddr . iif type local counter drop`)},
		{"x8 IPv4 rule", true, x8(`ip saddr @served4 iif != "lo" counter drop`)},
		{"x8 owner limit", true, x8(limit)},
		// control_local as before the host's loopback bucket (item 89):
		// the served-source drops, then the owner maps.
		{"no loopback rules", true, `flush chain inet pcpd control_local; ` + served + local},
		// Eight more copies of both loopback rules: a request from the
		// LAN fails their interface comparison sixteen times more.
		{"x8 loopback rules", true, x8(`iif "lo" notrack accept`) + x8(`iif "lo" limit rate over 1048576/second burst 1048576 packets counter drop`)},
		{"no reverse-path rule", true, `flush chain inet pcpd OWNER; add rule inet pcpd OWNER ` + limit + `; add rule inet pcpd OWNER goto control_meter`},
		{"no owner limit", true, `flush chain inet pcpd OWNER; add rule inet pcpd OWNER ` + rpf + `; add rule inet pcpd OWNER goto control_meter`},
		{"no per-source meter", true, `flush chain inet pcpd control_meter; add rule inet pcpd control_meter notrack; add rule inet pcpd control_meter accept`},
		{"meter add, not update", true, `flush chain inet pcpd control_meter; ` + meter("add") + `add rule inet pcpd control_meter notrack; add rule inet pcpd control_meter accept`},
		{"no vmap", true, `flush chain inet pcpd control_local; ` + served + `add rule inet pcpd control_local goto OWNER`},
		{"notrack only", true, `flush chain inet pcpd control_local; add rule inet pcpd control_local notrack; add rule inet pcpd control_local accept`},
		// local_out (BENCHMARKS.md item 91), which the echo's answer
		// passes: without its rules; and written again by nft in either
		// order of the destination rules' ct state and set lookup (main's
		// before item 91: the lookup first; layout()'s: ct state first).
		{"no local_out rules", true, `flush chain inet pcpd local_out`},
		{"local_out lookup first", true, localOutScript(false)},
		{"local_out ct state first", true, localOutScript(true)},
	} {
		b.Run(tc.name, func(b *testing.B) {
			topo := netlab.NewTopology(b, netlab.TopologyOptions{})
			controlTable(b, topo, pinhole.Config{Meter: pinhole.Meter{Rate: 1 << 20, Burst: 1 << 20}}, tc.owned)
			if tc.script != "" {
				owner := regexp.MustCompile(`chain (owner_[0-9a-f]+) `).FindStringSubmatch(nftList(b, topo.Host, "table", "inet", "pcpd"))
				script := tc.script
				if strings.Contains(script, "OWNER") {
					if owner == nil {
						b.Fatal("no owner chain")
					}
					script = strings.ReplaceAll(script, "OWNER", owner[1])
				}
				topo.Host.MustRun(b, "nft", script)
			}
			if testing.Verbose() {
				b.Log(nftList(b, topo.Host, "table", "inet", "pcpd"))
			}
			measureControlEcho(b, topo)
		})
	}
}

// localOutScript writes local_out's four rules again by nft, the
// destination rules' ct state before or after their set lookup.
func localOutScript(ctFirst bool) string {
	const tail = ` meta skuid >= 0 fib saddr type != local - anycast counter drop; `
	dst := func(fam, set string) string {
		if ctFirst {
			return `ct state new ` + fam + ` daddr @` + set
		}
		return fam + ` daddr @` + set + ` ct state new`
	}
	return `flush chain inet pcpd local_out; ` +
		`add rule inet pcpd local_out ip6 saddr @protected6` + tail +
		`add rule inet pcpd local_out ip saddr @protected4` + tail +
		`add rule inet pcpd local_out meta nfproto ipv6 ` + dst("ip6", "protected6") + tail +
		`add rule inet pcpd local_out meta nfproto ipv4 ` + dst("ip", "protected4") + tail
}
