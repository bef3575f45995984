package pinhole_test

import (
	"regexp"
	"testing"

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
