package pinhole_test

import (
	"errors"
	"net/netip"
	"regexp"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestHealthyGuardRuleReplaced (review4 F3, pre-existing, not of
// h/pinfix): Healthy compares the layout's chains by rule count only, so
// a guard rule replaced by one that lets everything through (same count)
// passes every check: the inbound guard is off and the table "healthy".
func TestHealthyGuardRuleReplaced(t *testing.T) {
	topo, b := guardedTopology(t, pinhole.Config{})
	defer b.Teardown()
	out := topo.Host.MustRun(t, "nft", "-a", "list", "chain", "inet", "pcpd", "guard6")
	m := regexp.MustCompile(`\n\s*([^\n]*drop[^\n]*) # handle (\d+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no drop rule in guard6:\n%s", out)
	}
	topo.Host.MustRun(t, "nft", "replace", "rule", "inet", "pcpd", "guard6", "handle", m[2], "counter", "accept")
	if err := b.Healthy(); err == nil {
		t.Errorf("Healthy = nil after guard6's %q became \"counter accept\":\n%s", m[1],
			topo.Host.MustRun(t, "nft", "list", "chain", "inet", "pcpd", "guard6"))
	}
}

// TestLayoutHealthyRounds (review4 F3): Healthy compares every rule of the
// layout's chains with what Setup wrote, value for value; on this kernel
// an intact table passes round after round in every mode (no repair
// flapping every 5 s), and any layout chain's last rule replaced with a
// bare counter (a guard's drop, a goto, a meter's drop gone) is damage
// that Setup repairs.
func TestLayoutHealthyRounds(t *testing.T) {
	for _, tc := range []struct {
		name     string
		cfg      pinhole.Config
		attached bool
	}{
		{"standalone, no meter", pinhole.Config{}, false},
		{"standalone, meter, echo", pinhole.Config{AllowEcho: true, Meter: pinhole.Meter{Rate: 200, Burst: 400, Ports: []uint16{5351, 5350}}}, false},
		{"standalone, meter, tracked", pinhole.Config{TrackControl: true, Meter: pinhole.Meter{Rate: 200, Burst: 400}}, false},
		{"attached", pinhole.Config{Table: "filter", Attached: true, Chain: "pcpd"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			topo := netlab.NewTopology(t, netlab.TopologyOptions{})
			if tc.attached {
				loadNft(t, topo.Host, adminRuleset)
			}
			b := newBackend(t, topo.Host, tc.cfg)
			defer b.Teardown()
			if !tc.attached {
				serveTunnel(t, b, topo)
			}
			if err := b.SetProtected([]netip.Prefix{topo.ClientPrefix6, topo.ClientPrefix4}); err != nil {
				t.Fatal(err)
			}
			for round := range 4 {
				if err := b.Healthy(); err != nil {
					t.Fatalf("round %d: Healthy on an intact table: %v", round, err)
				}
				if round == 1 {
					if err := b.Setup(); err != nil { // rewritten: still healthy
						t.Fatal(err)
					}
				}
			}
			if tc.attached {
				return // the chains share the admin's table
			}
			chains := regexp.MustCompile(`(?m)^\s*chain (\S+) \{`).FindAllStringSubmatch(
				topo.Host.MustRun(t, "nft", "list", "table", "inet", "pcpd"), -1)
			lastRule := regexp.MustCompile(`# handle (\d+)\s*\n\s*\}`)
			tampered := 0
			for _, c := range chains {
				if strings.HasPrefix(c[1], "owner_") {
					continue
				}
				m := lastRule.FindStringSubmatch(topo.Host.MustRun(t, "nft", "-a", "list", "chain", "inet", "pcpd", c[1]))
				if m == nil {
					continue // no rules
				}
				topo.Host.MustRun(t, "nft", "replace", "rule", "inet", "pcpd", c[1], "handle", m[1], "counter")
				tampered++
				if err := b.Healthy(); !errors.Is(err, pinhole.ErrUnhealthy) {
					t.Errorf("chain %s's last rule made a bare counter: Healthy = %v, want ErrUnhealthy", c[1], err)
				}
				if err := b.Setup(); err != nil {
					t.Fatal(err)
				}
				if err := b.Healthy(); err != nil {
					t.Errorf("after Setup repaired %s: Healthy = %v", c[1], err)
				}
			}
			if tampered < 5 {
				t.Errorf("only %d layout chains tampered with", tampered)
			}
		})
	}
}
