package pinhole

import (
	"encoding/binary"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// TestForeignDMZInputInterface (h/prio, issue 9): an input interface
// condition on a DMZ rule's path is read against the interfaces holding
// the external address (pcpd's mapped connections arrive there): one all
// of them meet refuses as no condition does; one none meets (it still
// takes the hairpinned connections of the hosts behind it: review
// h/revpr), one some meet, or any while the interfaces are unknown, is
// not read (warned). Names as
// nft encodes them: exact (16 bytes, NUL padded), a wildcard (the
// prefix's bytes only), a set of names and wildcards (an interval set),
// iif (u32, host order), "!=". The reliability test
// TestNAPTDMZByInputInterface shows where the connections land.
func TestForeignDMZInputInterface(t *testing.T) {
	name := func(s string) []byte { b := make([]byte, 16); copy(b, s); return b }
	iifname := func(op expr.CmpOp, data []byte) []expr.Any {
		return []expr.Any{&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1}, &expr.Cmp{Op: op, Register: 1, Data: data}}
	}
	iif := func(idx uint32) []expr.Any {
		return []expr.Any{&expr.Meta{Key: expr.MetaKeyIIF, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binary.NativeEndian.AppendUint32(nil, idx)}}
	}
	inSet := []expr.Any{&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1}, &expr.Lookup{SourceRegister: 1, SetName: "__set0"}}
	// { "ppp0", "wan*" }: [ppp0, ppp0+1) and [wan, wao).
	set := fakeSet{s: &nftables.Set{Name: "__set0", Interval: true, KeyType: nftables.TypeIFName}, els: []nftables.SetElement{
		{Key: make([]byte, 16), IntervalEnd: true}, {Key: name("ppp0")}, {Key: append(name("ppp0")[:15], 1), IntervalEnd: true},
		{Key: name("wan")}, {Key: name("wao"), IntervalEnd: true}}}
	wan := []extIf{{name: "wan0", index: 5}}
	two := []extIf{{name: "wan0", index: 5}, {name: "wan1", index: 6}}
	for _, tc := range []struct {
		name   string
		cond   []expr.Any
		ifs    []extIf
		known  bool
		refuse bool // a catch-all with no condition not read
		caught bool // a catch-all recorded at all
	}{
		{name: "iifname wan0", cond: iifname(expr.CmpOpEq, name("wan0")), ifs: wan, known: true, refuse: true, caught: true},
		{name: "iifname wan*", cond: iifname(expr.CmpOpEq, []byte("wan")), ifs: wan, known: true, refuse: true, caught: true},
		{name: "iifname lan0", cond: iifname(expr.CmpOpEq, name("lan0")), ifs: wan, known: true, caught: true},
		{name: "iifname != lan0", cond: iifname(expr.CmpOpNeq, name("lan0")), ifs: wan, known: true, refuse: true, caught: true},
		{name: "iifname != wan0", cond: iifname(expr.CmpOpNeq, name("wan0")), ifs: wan, known: true, caught: true},
		{name: "iifname in a set with wan*", cond: inSet, ifs: wan, known: true, refuse: true, caught: true},
		{name: "iifname in a set without it", cond: inSet, ifs: []extIf{{name: "eth0", index: 2}}, known: true, caught: true},
		{name: "iif 5", cond: iif(5), ifs: wan, known: true, refuse: true, caught: true},
		{name: "iif 7", cond: iif(7), ifs: wan, known: true, caught: true},
		{name: "iifname wan0, the address on two", cond: iifname(expr.CmpOpEq, name("wan0")), ifs: two, known: true, caught: true},
		{name: "iifname wan*, the address on two", cond: iifname(expr.CmpOpEq, []byte("wan")), ifs: two, known: true, refuse: true, caught: true},
		{name: "iifname wan0, interfaces unknown", cond: iifname(expr.CmpOpEq, name("wan0")), caught: true},
		{name: "iifname lan0, interfaces unknown", cond: iifname(expr.CmpOpEq, name("lan0")), caught: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pc := baseChain(fAdmin, "pre", fNAT, nftables.ChainHookPrerouting, *nftables.ChainPriorityNATDest)
			src := &fakeRules{chainList: []*nftables.Chain{pc}, setsOf: map[string]fakeSet{"admin/__set0": set},
				rulesOf: map[string][]*nftables.Rule{"admin/pre": {{Table: fAdmin, Chain: pc, Handle: 1, Exprs: cat(tc.cond, daddr("198.51.100.1/32"), dnat4())}}}}
			f, err := readForeignAt(src, func(*nftables.Table, string) bool { return false }, target{ext: fExt, ifs: tc.ifs, ifsKnown: tc.known}, 1024, 65535)
			if err != nil {
				t.Fatal(err)
			}
			tcp, udp := refusing(f)
			if tcp != tc.refuse || udp != tc.refuse || (len(f.CatchAll) > 0) != tc.caught {
				t.Errorf("refusing TCP %v UDP %v, catch-alls %s; want refusing %v, recorded %v", tcp, udp, catchAlls(f), tc.refuse, tc.caught)
			}
		})
	}
}
