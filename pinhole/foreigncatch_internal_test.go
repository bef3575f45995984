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

// TestForeignCtTuple (review h/revl9, issue 9): a new connection's reply
// tuple at prerouting is its original inverted (a NAT chain that binds
// ends the hook's NAT chains), so "ct reply proto-src" is its
// destination port and "ct reply ip saddr" its destination address, as
// "ct original proto-dst" and "ct original ip daddr" are; in an ip table
// "ct original daddr" is the 4-byte address. Before, each was read as a
// condition not modelled: 'ct reply proto-src 4002' reserved nothing
// (TCP ports "", want "4002": a forward pcpd could hand out), and the
// rules for another address reserved their port ('TCP ports "4006",
// want ""'). The source port ("ct original proto-src", "ct reply
// proto-dst") stays a condition not read.
func TestForeignCtTuple(t *testing.T) {
	cmpEq := func(b ...byte) []expr.Any { return []expr.Any{&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: b}} }
	for _, tc := range []struct {
		name     string
		rule     []expr.Any
		tcp      string
		catchAll bool
	}{
		{name: "ct reply proto-src", rule: cat(l4(unix.IPPROTO_TCP), ctLoad(expr.CtKeyPROTOSRC, 1), cmpEq(be16(4002)...), dnat4()), tcp: "4002"},
		{name: "ct reply ip saddr ours", rule: cat(ctLoad(unix.NFT_CT_SRC_IP, 1), cmpEq(198, 51, 100, 1), l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 4010), dnat4()), tcp: "4010"},
		{name: "ct reply ip saddr another", rule: cat(ctLoad(unix.NFT_CT_SRC_IP, 1), cmpEq(203, 0, 113, 9), l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 4010), dnat4())},
		{name: "ct original daddr another", rule: cat(ctLoad(expr.CtKeyDST, 0), cmpEq(203, 0, 113, 9), l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 4006), dnat4())},
		{name: "ct original daddr ours", rule: cat(ctLoad(expr.CtKeyDST, 0), cmpEq(198, 51, 100, 1), l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 4001), dnat4()), tcp: "4001"},
		{name: "ct original ip saddr", rule: cat(ctLoad(unix.NFT_CT_SRC_IP, 0), cmpEq(198, 51, 100, 1), l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 4005), dnat4()), tcp: "4005"},
		{name: "ct original proto-src", rule: cat(l4(unix.IPPROTO_TCP), ctLoad(expr.CtKeyPROTOSRC, 0), cmpEq(be16(4003)...), dnat4()), catchAll: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pc := baseChain(fAdmin, "pre", fNAT, nftables.ChainHookPrerouting, *nftables.ChainPriorityNATDest)
			src := &fakeRules{chainList: []*nftables.Chain{pc}, rulesOf: map[string][]*nftables.Rule{"admin/pre": {{Table: fAdmin, Chain: pc, Handle: 1, Exprs: tc.rule}}}}
			f, err := readForeign(src, func(*nftables.Table, string) bool { return false }, fExt, 1024, 65535)
			if err != nil {
				t.Fatal(err)
			}
			if got := f.TCP.String(); got != tc.tcp {
				t.Errorf("TCP ports %q, want %q", got, tc.tcp)
			}
			if got := len(f.CatchAll) > 0; got != tc.catchAll || (got && f.CatchAll[0].Why == "") {
				t.Errorf("catch-alls %s, want one not sure: %v", catchAlls(f), tc.catchAll)
			}
		})
	}
}
