package pinhole_test

import (
	"regexp"
	"testing"
)

// TestLeaseSetGC (h/burst49k, issue 8, BENCHMARKS.md item 70): after
// Setup every pinhole set of pcpd's has the kernel gc interval
// pinhole.LeaseSetGC (5 min), as the kernel lists it; the maps (redirect,
// NAPT, SNAT) keep the kernel's default (no gc-interval listed: nft 1.0.6
// cannot read a map's back); a second request (Setup's on every repair)
// is taken again. Standalone table and attached mode (the admin's table,
// prefixed sets). Before, every set had the default of 1 s: a walk of the
// whole set every second (nft_rhash_gc), 4-10 ms of one CPU at 55 000-
// 100 000 leases.
func TestLeaseSetGC(t *testing.T) {
	sets := []string{"pin6", "pin6_proto", "pin6_addr", "pin6_filter", "pin6_addr_filter"}
	maps := []string{"redir6", "redir6_filter", "napt4", "napt4_filter", "snat4", "snat4_filter"}
	for _, mode := range bothModes {
		t.Run(mode.name, func(t *testing.T) {
			ns, b := backendIn(t, "setgc", mode)
			check := func(when string) {
				t.Helper()
				for _, name := range sets {
					out := nftList(t, ns, "set", "inet", mode.table, mode.prefix+name)
					if !regexp.MustCompile(`(?m)^\s*gc-interval 5m$`).MatchString(out) {
						t.Errorf("%s: set %s has no gc-interval 5m:\n%s", when, mode.prefix+name, out)
					}
				}
				for _, name := range maps {
					out := nftList(t, ns, "map", "inet", mode.table, mode.prefix+name)
					if regexp.MustCompile(`gc-interval`).MatchString(out) {
						t.Errorf("%s: map %s has a gc-interval:\n%s", when, mode.prefix+name, out)
					}
				}
			}
			check("after Setup")
			if err := b.SetLeaseGCForTest(); err != nil {
				t.Fatalf("again: %v", err)
			}
			check("again")
		})
	}
}
