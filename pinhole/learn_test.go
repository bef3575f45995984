package pinhole

import (
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// TestListedAsWritten: a listing of an owner chain is learnt only if it is
// what was written but for register numbers renumbered consistently
// (review4 F4): any value changed, or a compare made to read another
// register than the load wrote, is not learnt.
func TestListedAsWritten(t *testing.T) {
	b := &Backend{cfg: Config{Meter: Meter{OwnerRate: 200, OwnerBurst: 400, ReversePath: ReversePathLoose}}}
	wrote := b.ownerRules([]int{3, 4})
	listed := func(change func(rules [][]expr.Any)) []*nftables.Rule {
		var out []*nftables.Rule
		rules := b.ownerRules([]int{3, 4})
		if change != nil {
			change(rules)
		}
		for _, r := range rules {
			out = append(out, &nftables.Rule{Exprs: r})
		}
		return out
	}
	for _, tc := range []struct {
		name   string
		change func(rules [][]expr.Any)
		learnt bool
	}{
		{"as written", nil, true},
		{"as this kernel lists it", func(r [][]expr.Any) {
			for _, rule := range r {
				for j := range rule {
					rule[j] = asListed(rule[j])
				}
			}
		}, true},
		{"counter figures", func(r [][]expr.Any) { r[1][1] = &expr.Counter{Packets: 7, Bytes: 700} }, true},
		{"limit verdict accept", func(r [][]expr.Any) { r[1][2] = &expr.Verdict{Kind: expr.VerdictAccept} }, false},
		{"limit rate", func(r [][]expr.Any) {
			l := *r[1][0].(*expr.Limit)
			l.Rate = 1000000
			r[1][0] = &l
		}, false},
		{"limit burst", func(r [][]expr.Any) {
			l := *r[1][0].(*expr.Limit)
			l.Burst = 1 << 20
			r[1][0] = &l
		}, false},
		{"interface compared", func(r [][]expr.Any) {
			c := *r[0][1].(*expr.Cmp)
			c.Data = []byte{9, 0, 0, 0}
			r[0][1] = &c
		}, false},
		{"meta key", func(r [][]expr.Any) {
			m := *r[0][0].(*expr.Meta)
			m.Key = expr.MetaKeyOIF
			r[0][0] = &m
		}, false},
		{"fib flags", func(r [][]expr.Any) {
			f := *r[0][3].(*expr.Fib)
			f.FlagIIF = !f.FlagIIF
			r[0][3] = &f
		}, false},
		{"compare reads another register", func(r [][]expr.Any) {
			c := *r[0][1].(*expr.Cmp)
			c.Register = unix.NFT_REG32_05
			r[0][1] = &c
		}, false},
		{"one rule fewer", func(r [][]expr.Any) { r[1] = r[1][:2] }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, ok := listedAsWritten(listed(tc.change), wrote)
			if ok != tc.learnt {
				t.Errorf("learnt = %v, want %v", ok, tc.learnt)
			}
		})
	}
}
