package pinhole

import (
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
)

// TestRuleGenMoves (root, namespace; review h/revf4): ruleGen reads the
// kernel's ruleset generation (NFT_MSG_GETGEN, raw: the library has no
// call), the fallback readForeignAt's tries compare when the generation
// listener is not open: it moves by one at another process's commit and
// not without one.
func TestRuleGenMoves(t *testing.T) {
	ns := netlab.NewNS(t, "fgenid")
	h, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	c, nl, err := dialSide(int(h))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.CloseLasting() })
	g0, err := ruleGen(nl)
	if err != nil {
		t.Fatal(err)
	}
	if g, err := ruleGen(nl); err != nil || g != g0 {
		t.Fatalf("no commit: generation %d (%v), want %d", g, err, g0)
	}
	ns.MustRun(t, "nft", "add table ip admin")
	if g, err := ruleGen(nl); err != nil || g != g0+1 {
		t.Fatalf("after a commit: generation %d (%v), want %d", g, err, g0+1)
	}
}
