package pinhole

import (
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// commitRules is a ruleSource whose ruleset another process commits
// over while it is read: gens[i] is generation i; a commit, the next
// generation, lands at each rule listing numbered in commitAt (1: the
// first listing of a read's first try, right after the chains).
type commitRules struct {
	gens     []*fakeRules
	cur      int
	listings int
	commitAt map[int]bool
	tries    int
}

func (c *commitRules) now() *fakeRules { return c.gens[c.cur] }

func (c *commitRules) chains() ([]*nftables.Chain, error) { return c.now().chains() }

func (c *commitRules) rules(t *nftables.Table, chain string) ([]*nftables.Rule, error) {
	c.listings++
	if c.commitAt[c.listings] && c.cur+1 < len(c.gens) {
		c.cur++
	}
	return c.now().rules(t, chain)
}

func (c *commitRules) set(t *nftables.Table, name string) (*nftables.Set, []nftables.SetElement, error) {
	return c.now().set(t, name)
}

func (c *commitRules) exprCount(t *nftables.Table, chain string, handle uint64) (int, error) {
	return c.now().exprCount(t, chain, handle)
}

func (c *commitRules) rawRules(t *nftables.Table, chain string) ([]*nftables.Rule, error) {
	return c.now().rawRules(t, chain)
}

func (c *commitRules) begin() genMark {
	c.tries++
	return genMark{gen: uint32(c.cur), ok: true}
}

func (c *commitRules) moved(m genMark) bool { return uint32(c.cur) != m.gen }

// TestForeignReadAcrossCommit (review h/revf4, issue 9): the admin moves
// a forward's "iifname lan0" condition from the chain it jumps to onto
// the jump itself (NAT reflection for the LAN, in both generations: its
// port 8080 only reserved, GuessTCP). A read that lists the base chain's
// rules before that commit (the jump without the condition) and the
// jumped-to chain's after (the DNAT without it) saw a forward of 8080
// with every condition read, which no generation holds: since h/fwd4 it
// ends the PEERs and PREFER_FAILURE MAPs on 8080 for good. Now the
// generation moved during the read, so it is read again; a ruleset
// moving under every try is answered Unsettled.
func TestForeignReadAcrossCommit(t *testing.T) {
	lan := func() []expr.Any {
		b := make([]byte, 16)
		copy(b, "lan0")
		return []expr.Any{&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: b}}
	}
	pc := baseChain(fAdmin, "pre", fNAT, nftables.ChainHookPrerouting, *nftables.ChainPriorityNATDest)
	fwd := &nftables.Chain{Table: fAdmin, Name: "fwd"}
	gen := func(jumpCond, dnatCond []expr.Any) *fakeRules {
		return &fakeRules{chainList: []*nftables.Chain{pc, fwd}, rulesOf: map[string][]*nftables.Rule{
			"admin/pre": {{Table: fAdmin, Chain: pc, Handle: 1, Exprs: cat(jumpCond, daddr("198.51.100.1/32"), ipProto(6), dportCmp(expr.CmpOpEq, 8080), jump(expr.VerdictJump, "fwd"))}},
			"admin/fwd": {{Table: fAdmin, Chain: fwd, Handle: 2, Exprs: cat(dnatCond, dnat4())}},
		}}
	}
	before := gen(nil, lan()) // tcp dport 8080 jump fwd; fwd: iifname lan0 dnat
	after := gen(lan(), nil)  // iifname lan0 tcp dport 8080 jump fwd; fwd: dnat
	own := func(*nftables.Table, string) bool { return false }
	for _, tc := range []struct {
		name      string
		commitAt  map[int]bool
		tries     int
		unsettled bool
	}{
		{name: "no commit", tries: 1},
		{name: "a commit between the two chains' listings", commitAt: map[int]bool{2: true}, tries: 2},
		{name: "a commit in each of three tries", commitAt: map[int]bool{2: true, 4: true, 6: true}, tries: foreignTries, unsettled: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Generations alternate: before, after, before, after.
			src := &commitRules{gens: []*fakeRules{before, after, before, after}, commitAt: tc.commitAt}
			f, err := readForeign(src, own, fExt, 1024, 65535)
			if err != nil {
				t.Fatal(err)
			}
			if sure := f.TCP.Has(8080) && !f.GuessTCP.Has(8080); sure && !f.Unsettled {
				t.Errorf("8080 forwarded with every condition read (a lease on it is ended), from a read across a commit: no generation forwards it so (tcp %s, guessed %s)", f.TCP.String(), f.GuessTCP.String())
			}
			if !f.TCP.Has(8080) {
				t.Errorf("8080 not reserved (tcp %s)", f.TCP.String())
			}
			if src.tries != tc.tries || f.Unsettled != tc.unsettled {
				t.Errorf("%d tries, unsettled %v; want %d, %v", src.tries, f.Unsettled, tc.tries, tc.unsettled)
			}
		})
	}
}
