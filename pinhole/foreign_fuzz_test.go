package pinhole

import (
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// FuzzForeignDecode (review h/revadmin): readForeign over rules built of
// fuzzed values (a verdict map element's raw Val as the library lists it,
// cmp and range operands, set keys of any length, interval flags) never
// panics, and reserves only ports the rule's port condition can match:
// with "tcp dport OP data" or "th dport in set", no port outside what the
// condition holds on its own.
func FuzzForeignDecode(f *testing.F) {
	f.Add(uint8(0), []byte{0x01, 0xbb}, []byte{0x01, 0xbb}, []byte{0, 80, 0, 90, 0, 91, 1, 0}, uint8(0), listedVerdict(expr.VerdictJump, "web"))
	f.Add(uint8(3), []byte{0xff}, []byte{}, []byte{0}, uint8(0xff), []byte{4, 0, 1, 0})
	f.Fuzz(func(t *testing.T, op uint8, data, to, keys []byte, flags uint8, val []byte) {
		pre := baseChain(fAdmin, "pre", fNAT, nftables.ChainHookPrerouting, *nftables.ChainPriorityNATDest)
		web := &nftables.Chain{Table: fAdmin, Name: "web"}
		// Set elements: keys cut into pieces of 1..4 bytes by flags.
		var els []nftables.SetElement
		for i, k := 0, keys; len(k) > 0; i++ {
			n := min(len(k), 1+int(flags>>(i%4)&3))
			els = append(els, nftables.SetElement{Key: k[:n], IntervalEnd: (flags>>(i%8))&1 == 1, Val: val})
			k = k[n:]
		}
		cmpOp := expr.CmpOp(op % 6)
		src := &fakeRules{chainList: []*nftables.Chain{pre, web}, rulesOf: map[string][]*nftables.Rule{
			"admin/pre": {
				{Table: fAdmin, Chain: pre, Handle: 1, Exprs: cat(l4(unix.IPPROTO_TCP), []expr.Any{loadDport(), &expr.Cmp{Op: cmpOp, Register: 1, Data: data}}, dnat4())},
				{Table: fAdmin, Chain: pre, Handle: 2, Exprs: cat(l4(unix.IPPROTO_UDP), []expr.Any{loadDport(), &expr.Range{Op: cmpOp, Register: 1, FromData: data, ToData: to}}, dnat4())},
				{Table: fAdmin, Chain: pre, Handle: 3, Exprs: cat(dportSet("s", op&0x80 != 0), dnat4())},
				{Table: fAdmin, Chain: pre, Handle: 4, Exprs: cat([]expr.Any{loadDport(), &expr.Lookup{SourceRegister: 1, SetName: "m", DestRegister: unix.NFT_REG_VERDICT, IsDestRegSet: true}})},
				{Table: fAdmin, Chain: pre, Handle: 5, Exprs: cat([]expr.Any{&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
					&expr.Cmp{Op: cmpOp, Register: 1, Data: data}}, l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 7), dnat4())},
			},
			"admin/web": {{Table: fAdmin, Chain: web, Handle: 6, Exprs: dnat4()}},
		}, setsOf: map[string]fakeSet{
			"admin/s": {s: &nftables.Set{Name: "s", Interval: flags&1 == 1}, els: els},
			"admin/m": {s: &nftables.Set{Name: "m", IsMap: true, Interval: flags&2 == 2}, els: els},
		}}
		fd, err := readForeign(src, func(*nftables.Table, string) bool { return false }, fExt, 1024, 65535)
		if err != nil {
			t.Fatal(err)
		}
		_ = verdictOf(nftables.SetElement{Val: val})
		// TCP: rule 1's cmp, rule 5's 7, and the set and map rules' keys
		// (both protocols). Without any set key, TCP holds only what the
		// cmp holds: check that part.
		if len(keys) == 0 && len(data) == 2 {
			m := cmpMatcher(cmpOp, data)
			for p := 0; p < 1<<16; p++ {
				if fd.TCP.Has(uint16(p)) && p != 7 && !m.holds([]byte{byte(p >> 8), byte(p)}) {
					t.Fatalf("TCP %d reserved; the cmp %v %x cannot match it", p, cmpOp, data)
				}
			}
		}
	})
}
