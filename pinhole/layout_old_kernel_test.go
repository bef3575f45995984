package pinhole

import (
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// TestLayoutLookupsLinux61 (review7 F1): every lookup pcpd writes must be
// one that the kernels pcpd supports accept. Before Linux 6.5 (commit
// "netfilter: nf_tables: relax set/map validation checks"; Debian 12 runs
// 6.1, RHEL 9 5.14, Ubuntu 22.04 5.15), nft_lookup_init refuses, with
// EINVAL, a lookup into a map that is inverted or has no destination
// register. The unowned rule of S4 ("ip6 saddr != @owners6 jump unowned",
// a map looked up as a set, inverted) was both, so on those kernels
// Setup's whole transaction failed and pcpd, standalone with the default
// kernel meter, could not start; then a probe left the unowned bucket out
// there. Since BENCHMARKS.md item 29 the owner chains go on to
// control_meter and the map's miss falls through to "goto unowned", so
// no rule needs it. The test applies the old kernel's checks to the
// layout's rules; the box's own kernel (6.18) accepts them either way,
// so only this check shows it. natcut's rules (natcut.go) do look the
// DNAT maps up as sets: the layout checked is the one Setup falls back
// to when the kernel refuses them (natCutRefusal, TestNATCutRefused),
// and the test checks that only natcut's rules hold such lookups.
func TestLayoutLookupsLinux61(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
	}{
		{"standalone, kernel meter (pcpd's default)", Config{Meter: Meter{Rate: 200}}},
		{"standalone, no meter", Config{}},
		{"attached", Config{Attached: true, Table: "filter", Chain: "pcpd"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := New(&nftables.Conn{}, tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			sets := map[string]*nftables.Set{}
			for _, s := range b.allSets() {
				sets[s.Name] = s
			}
			full := 0
			for _, cr := range b.layout() {
				for _, r := range cr.rules {
					for _, e := range r {
						if l, ok := e.(*expr.Lookup); ok && sets[l.SetName] != nil && sets[l.SetName].IsMap && !l.IsDestRegSet {
							full++
						}
					}
				}
			}
			if want := map[bool]int{true: 8}[b.natCutting()]; full != want {
				t.Errorf("the full layout has %d lookups into a map without a destination register, want %d (natcut's)", full, want)
			}
			b.natCut = false // natCutRefusal's fallback
			for _, cr := range b.layout() {
				for i, r := range cr.rules {
					for _, e := range r {
						l, ok := e.(*expr.Lookup)
						if !ok {
							continue
						}
						s := sets[l.SetName]
						if s == nil || !s.IsMap {
							continue
						}
						if l.Invert {
							t.Errorf("chain %s rule %d: inverted lookup into map %s: EINVAL before Linux 6.5", cr.name, i, s.Name)
						}
						if !l.IsDestRegSet {
							t.Errorf("chain %s rule %d: lookup into map %s without a destination register: EINVAL before Linux 6.5", cr.name, i, s.Name)
						}
					}
				}
			}
		})
	}
}
