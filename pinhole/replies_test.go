package pinhole

import (
	"encoding/binary"
	"errors"
	"slices"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	mnl "github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

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

// TestReadRepliesTakesAcksDirectly (h/tail11, root): a committed batch's
// acknowledgements, one a datagram, are taken by acksPeeker through the
// socket's descriptor, none through mdlayher/netlink's Receive (a page
// allocated, a peek and a read, each read starting a goroutine and waking
// a thread: BENCHMARKS.md item 64); a refused batch's error reply still
// goes through Receive, judged as before (the batch reported failed with
// the kernel's errno, the connection in step for the next batch).
func TestReadRepliesTakesAcksDirectly(t *testing.T) {
	c, nl := nsConn(t, "tail11acks")
	slow := 0
	slowReplyHook = func() { slow++ }
	defer func() { slowReplyHook = nil }()
	tbl := &nftables.Table{Family: nftables.TableFamilyINet, Name: "acks"}
	c.AddTable(tbl)
	for i := range 6 {
		c.AddChain(&nftables.Chain{Table: tbl, Name: "c" + string(rune('a'+i))})
	}
	if inStep, err := flushConn(c, nl); err != nil || !inStep {
		t.Fatalf("7 messages: %v (in step %v)", err, inStep)
	}
	if slow != 0 {
		t.Errorf("7 acknowledgements: %d read through nl.Receive, want 0", slow)
	}
	slow = 0
	c.AddChain(&nftables.Chain{Table: &nftables.Table{Family: nftables.TableFamilyINet, Name: "none"}, Name: "x"})
	inStep, err := flushConn(c, nl)
	if !errors.Is(err, unix.ENOENT) || !inStep {
		t.Fatalf("a chain in no table: %v (in step %v), want ENOENT in step", err, inStep)
	}
	if slow == 0 {
		t.Error("the error reply was not read through nl.Receive")
	}
	slow = 0
	c.AddChain(&nftables.Chain{Table: tbl, Name: "after"})
	if inStep, err := flushConn(c, nl); err != nil || !inStep || slow != 0 {
		t.Fatalf("the batch after: %v (in step %v), %d through nl.Receive", err, inStep, slow)
	}
}

// TestPlainAcks: what acksPeeker may take of a datagram, and what it
// leaves for nl.Receive.
func TestPlainAcks(t *testing.T) {
	msg := func(typ uint16, flags uint16, data ...byte) []byte {
		b := binary.NativeEndian.AppendUint32(nil, uint32(unix.NLMSG_HDRLEN+len(data)))
		b = binary.NativeEndian.AppendUint16(b, typ)
		b = binary.NativeEndian.AppendUint16(b, flags)
		b = append(b, make([]byte, 8)...) // sequence, port id
		b = append(b, data...)
		for len(b)%4 != 0 {
			b = append(b, 0)
		}
		return b
	}
	errno := func(e int32) []byte { return binary.NativeEndian.AppendUint32(nil, uint32(e)) }
	ack := msg(unix.NLMSG_ERROR, 0, append(errno(0), make([]byte, 16)...)...)
	notify := msg(unix.NFNL_SUBSYS_NFTABLES<<8|unix.NFT_MSG_NEWRULE, 0, 1, 2, 3, 4, 5)
	for _, tc := range []struct {
		name string
		b    []byte
		want int
	}{
		{"an acknowledgement", ack, 1},
		{"two", append(slices.Clone(ack), ack...), 2},
		{"a notification, then one", append(slices.Clone(notify), ack...), 1},
		{"notifications only", notify, 0},
		{"an error reply", msg(unix.NLMSG_ERROR, 0, append(errno(-int32(unix.ENOENT)), make([]byte, 16)...)...), 0},
		{"an acknowledgement and an error reply", append(slices.Clone(ack), msg(unix.NLMSG_ERROR, 0, errno(-1)...)...), 0},
		{"a short error message", msg(unix.NLMSG_ERROR, 0, 0, 0), 0},
		{"a done with an errno", msg(unix.NLMSG_DONE, 2, errno(-1)...), 0},
		{"a length past the datagram", ack[:len(ack)-4], 0},
		{"trailing bytes", append(slices.Clone(ack), 1, 2), 0},
		{"nothing", nil, 0},
	} {
		if got := plainAcks(tc.b); got != tc.want {
			t.Errorf("%s: %d acknowledgements, want %d", tc.name, got, tc.want)
		}
	}
}
