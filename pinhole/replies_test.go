package pinhole

import (
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	mnl "github.com/mdlayher/netlink"

	"github.com/pcpd/pcpd/internal/netlab"
)

// TestFlushConnEchoedRules (review h/revenomem): google/nftables asks for
// an echo of every rule it adds or replaces (NLM_F_ECHO), so a committed
// batch's replies are, before the acknowledgements, the kernel's
// notifications, coalesced into datagrams of about a page
// (nft_commit_notify), split wherever the next one does not fit: a
// replaced rule's DELRULE and NEWRULE, and, when the batch's first message
// asked for an echo, a NEWGEN. flushConn read them as google/nftables'
// receiveAckAware does, which skips a datagram of notifications only when
// its last message's type has the bits of NLMSG_OVERRUN (NEWRULE does,
// DELRULE does not): a datagram ending with a DELRULE was taken for a
// reply and the next for its acknowledgement ("expected header error, but
// got unknown(2566)"), so a batch of ReplaceRules the kernel committed (the
// owner chains' reverse-path rules, 16 a batch, when routes move:
// FollowRoutes, writeOwners) was reported failed. Every committed batch
// here must read as applied, and the connection stay in step.
func TestFlushConnEchoedRules(t *testing.T) {
	small := []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}}
	big := []expr.Any{}
	for range 9 {
		big = append(big, &expr.Counter{})
	}
	big = append(big, &expr.Verdict{Kind: expr.VerdictDrop})
	for _, tc := range []struct {
		name     string
		n        int
		old, new []expr.Any // each chain's rule before, and as replaced
		lead     bool       // a chain added before the rules: the first message asks for no echo
	}{
		{"2 replaced, larger", 2, small, big, false},
		{"8 replaced, larger", 8, small, big, false},
		{"16 replaced, larger", 16, small, big, false},
		{"16 replaced, larger, after a chain", 16, small, big, true},
		{"16 replaced, smaller", 16, big, small, false},
		{"24 replaced, same size", 24, small, small, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, nl := nsConn(t, "revenomem")
			tbl := &nftables.Table{Family: nftables.TableFamilyINet, Name: "echo"}
			c.AddTable(tbl)
			var chains []*nftables.Chain
			for i := range tc.n {
				ch := c.AddChain(&nftables.Chain{Table: tbl, Name: "c" + string(rune('a'+i))})
				chains = append(chains, ch)
				c.AddRule(&nftables.Rule{Table: tbl, Chain: ch, Exprs: tc.old})
			}
			if inStep, err := flushConn(c, nl); err != nil || !inStep {
				t.Fatalf("adding the rules: %v (in step %v)", err, inStep)
			}
			if tc.lead {
				c.AddChain(&nftables.Chain{Table: tbl, Name: "lead"})
			}
			for _, ch := range chains {
				rules, err := c.GetRules(tbl, ch)
				if err != nil || len(rules) != 1 {
					t.Fatalf("rules of %s: %v, %v", ch.Name, rules, err)
				}
				c.ReplaceRule(&nftables.Rule{Table: tbl, Chain: ch, Handle: rules[0].Handle, Exprs: tc.new})
			}
			inStep, err := flushConn(c, nl)
			if err != nil || !inStep {
				t.Errorf("a batch of %d ReplaceRules: %v (in step %v); want applied", tc.n, err, inStep)
			}
			if got := drain(nl); got != 0 {
				t.Errorf("%d datagrams left queued after the batch", got)
			}
			for _, ch := range chains {
				rules, err := c.GetRules(tbl, ch)
				if err != nil || len(rules) != 1 || len(rules[0].Exprs) != len(tc.new) {
					t.Fatalf("rules of %s after the batch: %v, %v; want one of %d expressions (committed)", ch.Name, rules, err, len(tc.new))
				}
			}
		})
	}
}

// nsConn is, in a new namespace, the engine's own kind of nftables
// connection into it (dialConn), both closed when the test ends.
func nsConn(t *testing.T, name string) (*nftables.Conn, *mnl.Conn) {
	t.Helper()
	ns := netlab.NewNS(t, name)
	h, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	c, nl, err := dialConn(int(h))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.CloseLasting() })
	return c, nl
}
