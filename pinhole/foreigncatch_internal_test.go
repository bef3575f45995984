package pinhole

import (
	"fmt"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// refusing is what the server refuses on f (hostPorts.storeDNAT): the
// protocols of the catch-alls before pcpd's chain with every condition
// read.
func refusing(f *ForeignDNAT) (tcp, udp bool) {
	for _, r := range f.CatchAll {
		if r.Before && r.Why == "" {
			tcp, udp = tcp || r.TCP, udp || r.UDP
		}
	}
	return tcp, udp
}

// TestForeignCatchAllPath (review h/revl9, issue 9): a catch-all DNAT
// before pcpd's chain refuses new IPv4 mappings only if it takes every
// new connection of its protocols to the external address, so the rules
// on its path before it count too: an earlier accept (or a return, a
// goto, a verdict map's accept) of some connections to ports of pcpd's
// range lets them through to pcpd's chain, where a mapping works ("tcp
// dport 5000-5999 accept" then a DMZ host: pcpd's mappings of
// 5000-5999 carry). Before, every such catch-all was read as taking
// everything: the server refused every IPv4 mapping of the protocol
// ('refusing TCP true, UDP true; want TCP false, UDP false'). An accept
// that cannot match pcpd's connections (another address, ssh's port
// outside pcpd's range) changes nothing. And a chain reached first
// under a condition not read and then with none was walked once, its
// catch-all recorded only as not sure: 'refusing TCP false, UDP false;
// want TCP true, UDP true'.
func TestForeignCatchAllPath(t *testing.T) {
	pre := nftables.ChainHookPrerouting
	dstnat := *nftables.ChainPriorityNATDest
	saddr := []expr.Any{&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{203, 0, 113, 7}}}
	iif := []expr.Any{&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte("lan0\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")}}
	accept := jump(expr.VerdictAccept, "")
	dmz := cat(daddr("198.51.100.1/32"), dnat4())
	type want struct{ tcp, udp bool }
	for _, tc := range []struct {
		name   string
		chains map[string][][]expr.Any // "pre" is the base chain at dstnat
		sets   map[string]fakeSet
		want   want // refusing
	}{
		{name: "the DMZ alone", chains: map[string][][]expr.Any{"pre": {dmz}}, want: want{true, true}},
		{name: "ports of pcpd's range accepted first", chains: map[string][][]expr.Any{"pre": {
			cat(l4(unix.IPPROTO_TCP), dportRange(5000, 5999), accept), dmz}}, want: want{false, true}},
		{name: "some sources accepted first", chains: map[string][][]expr.Any{"pre": {cat(saddr, accept), dmz}}},
		{name: "an interface returned first", chains: map[string][][]expr.Any{"pre": {cat(iif, jump(expr.VerdictReturn, "")), dmz}}},
		{name: "ssh accepted first (outside pcpd's range)", chains: map[string][][]expr.Any{"pre": {
			cat(l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 22), accept), dmz}}, want: want{true, true}},
		{name: "another address accepted first", chains: map[string][][]expr.Any{"pre": {
			cat(daddr("203.0.113.9/32"), accept), dmz}}, want: want{true, true}},
		{name: "the accept after the DMZ", chains: map[string][][]expr.Any{"pre": {dmz, cat(saddr, accept)}}, want: want{true, true}},
		{name: "a jumped chain accepts some first", chains: map[string][][]expr.Any{"pre": {jump(expr.VerdictJump, "acc"), dmz},
			"acc": {cat(saddr, accept)}}},
		{name: "a goto first, its chain not translating", chains: map[string][][]expr.Any{"pre": {cat(saddr, jump(expr.VerdictGoto, "log")), dmz},
			"log": {{&expr.Counter{}}}}},
		{name: "a verdict map accepts a port of pcpd's range", sets: map[string]fakeSet{"__map1": {s: &nftables.Set{Name: "__map1", IsMap: true},
			els: []nftables.SetElement{{Key: be16(6000), Val: listedVerdict(expr.VerdictAccept, "")}}}},
			chains: map[string][][]expr.Any{"pre": {cat(l4(unix.IPPROTO_UDP), []expr.Any{loadDport(),
				&expr.Lookup{SourceRegister: 1, SetName: "__map1", DestRegister: unix.NFT_REG_VERDICT, IsDestRegSet: true}}), dmz}},
			want: want{true, false}},
		{name: "a chain's return before its DMZ", chains: map[string][][]expr.Any{"pre": {jump(expr.VerdictJump, "dmz")},
			"dmz": {cat(saddr, jump(expr.VerdictReturn, "")), dmz}}},
		{name: "a chain reached under a condition not read, then with none", chains: map[string][][]expr.Any{
			"pre": {cat(iif, jump(expr.VerdictJump, "dmz")), jump(expr.VerdictJump, "dmz")}, "dmz": {dmz}}, want: want{true, true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := baseChain(fAdmin, "pre", fNAT, pre, dstnat)
			src := &fakeRules{chainList: []*nftables.Chain{base}, rulesOf: map[string][]*nftables.Rule{}, setsOf: map[string]fakeSet{}}
			h := uint64(1)
			for name, rules := range tc.chains {
				ch := base
				if name != "pre" {
					ch = &nftables.Chain{Table: fAdmin, Name: name}
					src.chainList = append(src.chainList, ch)
				}
				for _, e := range rules {
					src.rulesOf["admin/"+name] = append(src.rulesOf["admin/"+name], &nftables.Rule{Table: fAdmin, Chain: ch, Handle: h, Exprs: e})
					h++
				}
			}
			for name, s := range tc.sets {
				src.setsOf["admin/"+name] = s
			}
			f, err := readForeign(src, func(*nftables.Table, string) bool { return false }, fExt, 1024, 65535)
			if err != nil {
				t.Fatal(err)
			}
			if tcp, udp := refusing(f); tcp != tc.want.tcp || udp != tc.want.udp {
				t.Errorf("refusing TCP %v, UDP %v; want TCP %v, UDP %v (catch-alls %s)", tcp, udp, tc.want.tcp, tc.want.udp, catchAlls(f))
			}
			if len(f.CatchAll) == 0 {
				t.Errorf("no catch-all recorded: the DMZ rule is one, refusing or not")
			}
		})
	}
}

func catchAlls(f *ForeignDNAT) string {
	s := ""
	for _, r := range f.CatchAll {
		s += fmt.Sprintf("[%v tcp %v udp %v before %v why %q] ", r, r.TCP, r.UDP, r.Before, r.Why)
	}
	return s
}
