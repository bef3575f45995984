package pinhole

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// fakeRules is a ruleSource of chains, rules and sets built in the test.
type fakeRules struct {
	chainList []*nftables.Chain
	rulesOf   map[string][]*nftables.Rule // by table name/chain name
	setsOf    map[string]fakeSet          // by table name/set name
	errs      map[string]error            // rules' error, by table name/chain name
	counts    map[string]int              // the kernel's expression count, by table name/chain name/handle (default: as listed)
	raw       map[string][]*nftables.Rule // pcpd's own decoding of a chain the library cannot parse, by table name/chain name
}

func (f *fakeRules) rawRules(t *nftables.Table, chain string) ([]*nftables.Rule, error) {
	if rs, ok := f.raw[t.Name+"/"+chain]; ok {
		return rs, nil
	}
	return nil, errors.New("no raw rules")
}

func (f *fakeRules) exprCount(t *nftables.Table, chain string, handle uint64) (int, error) {
	if n, ok := f.counts[fmt.Sprintf("%s/%s/%d", t.Name, chain, handle)]; ok {
		return n, nil
	}
	for _, r := range f.rulesOf[t.Name+"/"+chain] {
		if r.Handle == handle {
			return len(r.Exprs), nil
		}
	}
	return -1, nil
}

type fakeSet struct {
	s   *nftables.Set
	els []nftables.SetElement
}

func (f *fakeRules) chains() ([]*nftables.Chain, error) { return f.chainList, nil }

// A fakeRules ruleset never moves.
func (f *fakeRules) begin() genMark     { return genMark{ok: true} }
func (f *fakeRules) moved(genMark) bool { return false }

func (f *fakeRules) rules(t *nftables.Table, chain string) ([]*nftables.Rule, error) {
	if err := f.errs[t.Name+"/"+chain]; err != nil {
		return nil, err
	}
	return f.rulesOf[t.Name+"/"+chain], nil
}

func (f *fakeRules) set(t *nftables.Table, name string) (*nftables.Set, []nftables.SetElement, error) {
	s, ok := f.setsOf[t.Name+"/"+name]
	if !ok {
		return nil, nil, nil
	}
	return s.s, s.els, nil
}

var (
	fExt    = netip.MustParseAddr("198.51.100.1")
	fAdmin  = &nftables.Table{Family: nftables.TableFamilyIPv4, Name: "admin"}
	fInet   = &nftables.Table{Family: nftables.TableFamilyINet, Name: "fw"}
	fPcpd   = &nftables.Table{Family: nftables.TableFamilyINet, Name: "pcpd"}
	fIP6    = &nftables.Table{Family: nftables.TableFamilyIPv6, Name: "six"}
	fNAT    = nftables.ChainTypeNAT
	fFilter = nftables.ChainTypeFilter
)

// Expression builders, as nft compiles the rules named.
func l4(proto byte) []expr.Any { // meta l4proto PROTO
	return []expr.Any{&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}}}
}
func ipProto(proto byte) []expr.Any { // ip protocol PROTO
	return []expr.Any{&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 9, Len: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}}}
}
func be16(p uint16) []byte { return binary.BigEndian.AppendUint16(nil, p) }
func loadDport() expr.Any {
	return &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2}
}
func dportCmp(op expr.CmpOp, p uint16) []expr.Any { // th dport OP P
	return []expr.Any{loadDport(), &expr.Cmp{Op: op, Register: 1, Data: be16(p)}}
}
func dportRange(lo, hi uint16) []expr.Any { // th dport LO-HI
	return []expr.Any{loadDport(), &expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: be16(lo), ToData: be16(hi)}}
}
func dportSet(name string, invert bool) []expr.Any { // th dport [!=] @name
	return []expr.Any{loadDport(), &expr.Lookup{SourceRegister: 1, SetName: name, Invert: invert}}
}
func daddr(prefix string) []expr.Any { // ip daddr PREFIX
	p := netip.MustParsePrefix(prefix)
	a := p.Addr().As4()
	out := []expr.Any{&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4}}
	if p.Bits() < 32 {
		mask := binary.BigEndian.AppendUint32(nil, ^uint32(0)<<(32-p.Bits()))
		out = append(out, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: make([]byte, 4)})
	}
	return append(out, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: a[:]})
}
func nfprotoIs(fam byte) []expr.Any { // meta nfproto FAM
	return []expr.Any{&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{fam}}}
}
func dnat(fam uint32) []expr.Any { // dnat to 10.100.2.7
	return []expr.Any{&expr.Immediate{Register: 1, Data: []byte{10, 100, 2, 7}},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: fam, RegAddrMin: 1, Specified: true}}
}
func dnat4() []expr.Any { return dnat(unix.NFPROTO_IPV4) }
func jump(kind expr.VerdictKind, chain string) []expr.Any {
	return []expr.Any{&expr.Verdict{Kind: kind, Chain: chain}}
}
func ctLoad(key expr.CtKey, dir uint32) []expr.Any { // ct [original|reply] KEY
	return []expr.Any{&expr.Ct{Key: key, Register: 1, Direction: dir}}
}
func cat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// listedVerdict is a verdict map element's Val as the library lists it:
// the NFTA_DATA_VERDICT nest's attributes.
func listedVerdict(kind expr.VerdictKind, chain string) []byte {
	attrs := []netlink.Attribute{{Type: unix.NFTA_VERDICT_CODE, Data: binary.BigEndian.AppendUint32(nil, uint32(int32(kind)))}}
	if chain != "" {
		attrs = append(attrs, netlink.Attribute{Type: unix.NFTA_VERDICT_CHAIN, Data: []byte(chain + "\x00")})
	}
	b, err := netlink.MarshalAttributes(attrs)
	if err != nil {
		panic(err)
	}
	return b
}

func portSet(ports ...uint16) fakeSet {
	s := &nftables.Set{Name: "ports", KeyType: nftables.TypeInetService}
	var els []nftables.SetElement
	for _, p := range ports {
		els = append(els, nftables.SetElement{Key: be16(p)})
	}
	return fakeSet{s: s, els: els}
}

// intervalSet is nft's encoding of the ranges [lo, hi]: each start, and
// hi + 1 flagged IntervalEnd (none after 65535), listed in reverse as
// the kernel's rbtree dumps them.
func intervalSet(ranges ...[2]uint16) fakeSet {
	s := &nftables.Set{Name: "ranges", KeyType: nftables.TypeInetService, Interval: true}
	var els []nftables.SetElement
	for _, r := range ranges {
		els = append([]nftables.SetElement{{Key: be16(r[0])}}, els...)
		if r[1] < 0xffff {
			els = append([]nftables.SetElement{{Key: be16(r[1] + 1), IntervalEnd: true}}, els...)
		}
	}
	return fakeSet{s: s, els: els}
}

func prio(p nftables.ChainPriority) *nftables.ChainPriority { return &p }

func baseChain(t *nftables.Table, name string, typ nftables.ChainType, hook *nftables.ChainHook, p nftables.ChainPriority) *nftables.Chain {
	return &nftables.Chain{Table: t, Name: name, Type: typ, Hooknum: hook, Priority: prio(p)}
}

// TestForeignDNATDecode: which ports of the external address the host's
// DNAT rules take, rule shape by rule shape (h/adminports), with rules
// built of google/nftables expressions as nft and iptables-nft compile
// them. Without the reading (before h/adminports) nothing was reserved.
func TestForeignDNATDecode(t *testing.T) {
	dstnat := *nftables.ChainPriorityNATDest
	pre := nftables.ChainHookPrerouting
	type want struct {
		tcp, udp  string // ports as "a,b-c"; "" none
		catchAll  int
		before    bool   // the catch-all's Before
		protos    string // the catch-all's protocols: "tcp", "udp", "tcp,udp"
		unsure    string // in the catch-all's Why ("": none, it takes every connection)
		undecoded string
	}
	for _, tc := range []struct {
		name   string
		table  *nftables.Table
		chain  *nftables.Chain // nil: admin's pre at dstnat in table
		rule   []expr.Any
		others map[string][]expr.Any // more chains of table: name -> one rule
		sets   map[string]fakeSet
		count  int // the kernel's expression count of the rule (0: as listed)
		want   want
	}{
		{name: "tcp dport eq", rule: cat(l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 443), dnat4()), want: want{tcp: "443"}},
		{name: "ip protocol udp", rule: cat(ipProto(unix.IPPROTO_UDP), dportCmp(expr.CmpOpEq, 500), dnat4()), want: want{udp: "500"}},
		{name: "th dport: both protocols", rule: cat(dportCmp(expr.CmpOpEq, 8080), dnat4()), want: want{tcp: "8080", udp: "8080"}},
		{name: "sctp only", rule: cat(l4(unix.IPPROTO_SCTP), dportCmp(expr.CmpOpEq, 9), dnat4()), want: want{}},
		{name: "daddr is ours", rule: cat(daddr("198.51.100.1/32"), l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 443), dnat4()), want: want{tcp: "443"}},
		{name: "daddr prefix holds ours", rule: cat(daddr("198.51.100.0/24"), l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 443), dnat4()), want: want{tcp: "443"}},
		{name: "daddr another address", rule: cat(daddr("203.0.113.9/32"), l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 443), dnat4()), want: want{}},
		{name: "daddr another prefix", rule: cat(daddr("10.0.0.0/8"), l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 443), dnat4()), want: want{}},
		{name: "daddr set without ours", sets: map[string]fakeSet{"addrs": {s: &nftables.Set{Name: "addrs", KeyType: nftables.TypeIPAddr}, els: []nftables.SetElement{{Key: []byte{203, 0, 113, 9}}}}},
			rule: cat([]expr.Any{&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4}, &expr.Lookup{SourceRegister: 1, SetName: "addrs"}},
				l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 443), dnat4()), want: want{}},
		{name: "range", rule: cat(l4(unix.IPPROTO_TCP), dportRange(8000, 8010), dnat4()), want: want{tcp: "8000-8010"}},
		{name: "gt", rule: cat(l4(unix.IPPROTO_UDP), dportCmp(expr.CmpOpGt, 65000), dnat4()), want: want{udp: "65001-65535"}},
		{name: "anonymous set", sets: map[string]fakeSet{"__set0": portSet(9000, 9443)},
			rule: cat(l4(unix.IPPROTO_TCP), dportSet("__set0", false), dnat4()), want: want{tcp: "9000,9443"}},
		{name: "named interval set", sets: map[string]fakeSet{"fwd": intervalSet([2]uint16{7000, 7005}, [2]uint16{7100, 7100}, [2]uint16{65530, 65535})},
			rule: cat(l4(unix.IPPROTO_TCP), dportSet("fwd", false), dnat4()), want: want{tcp: "7000-7005,7100,65530-65535"}},
		{name: "named interval set, adjacent ranges", sets: map[string]fakeSet{"fwd": intervalSet([2]uint16{80, 90}, [2]uint16{91, 100}, [2]uint16{200, 300})},
			rule: cat(l4(unix.IPPROTO_TCP), dportSet("fwd", false), dnat4()), want: want{tcp: "80-100,200-300"}},
		{name: "empty set", sets: map[string]fakeSet{"none": {s: &nftables.Set{Name: "none", KeyType: nftables.TypeInetService}}},
			rule: cat(l4(unix.IPPROTO_TCP), dportSet("none", false), dnat4()), want: want{}},
		{name: "dnat map", sets: map[string]fakeSet{"__map0": portSet(8081)},
			rule: cat(l4(unix.IPPROTO_TCP), []expr.Any{loadDport(), &expr.Lookup{SourceRegister: 1, SetName: "__map0", DestRegister: 1, IsDestRegSet: true},
				&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1}}), want: want{tcp: "8081"}},
		{name: "redirect", rule: cat(l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 80), []expr.Any{&expr.Redir{}}), want: want{tcp: "80"}},
		{name: "inet: ipv4", table: fInet, rule: cat(nfprotoIs(unix.NFPROTO_IPV4), daddr("198.51.100.1/32"), l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 25), dnat4()), want: want{tcp: "25"}},
		{name: "inet: ipv6 only", table: fInet, rule: cat(nfprotoIs(unix.NFPROTO_IPV6), l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 25), dnat(unix.NFPROTO_IPV6)), want: want{}},
		{name: "inet: dnat ip6", table: fInet, rule: cat(l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 25), dnat(unix.NFPROTO_IPV6)), want: want{}},
		{name: "jump", rule: cat(l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 443), jump(expr.VerdictJump, "fwd")),
			others: map[string][]expr.Any{"fwd": dnat4()}, want: want{tcp: "443"}},
		{name: "goto, narrowed there", rule: cat(l4(unix.IPPROTO_TCP), jump(expr.VerdictGoto, "fwd")),
			others: map[string][]expr.Any{"fwd": cat(dportRange(20, 21), dnat4())}, want: want{tcp: "20-21"}},
		{name: "jump with another daddr", rule: cat(daddr("203.0.113.9/32"), jump(expr.VerdictJump, "fwd")),
			others: map[string][]expr.Any{"fwd": cat(l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 443), dnat4())}, want: want{}},
		{name: "verdict map", sets: map[string]fakeSet{"__map1": {s: &nftables.Set{Name: "__map1", KeyType: nftables.TypeInetService, IsMap: true},
			els: []nftables.SetElement{{Key: be16(80), VerdictData: &expr.Verdict{Kind: expr.VerdictJump, Chain: "web"}},
				{Key: be16(81), VerdictData: &expr.Verdict{Kind: expr.VerdictJump, Chain: "plain"}}}}},
			rule:   cat(l4(unix.IPPROTO_TCP), []expr.Any{loadDport(), &expr.Lookup{SourceRegister: 1, SetName: "__map1", DestRegister: unix.NFT_REG_VERDICT, IsDestRegSet: true}}),
			others: map[string][]expr.Any{"web": dnat4(), "plain": jump(expr.VerdictAccept, "")}, want: want{tcp: "80"}},
		{name: "verdict map as listed", sets: map[string]fakeSet{"__map1": {s: &nftables.Set{Name: "__map1", KeyType: nftables.TypeInetService, IsMap: true},
			els: []nftables.SetElement{{Key: be16(82), Val: listedVerdict(expr.VerdictGoto, "web")}, {Key: be16(83), Val: listedVerdict(expr.VerdictDrop, "")}}}},
			rule:   cat(l4(unix.IPPROTO_TCP), []expr.Any{loadDport(), &expr.Lookup{SourceRegister: 1, SetName: "__map1", DestRegister: unix.NFT_REG_VERDICT, IsDestRegSet: true}}),
			others: map[string][]expr.Any{"web": dnat4()}, want: want{tcp: "82"}},
		{name: "catch-all at dstnat", rule: cat(daddr("198.51.100.1/32"), dnat4()), want: want{catchAll: 1, before: true, protos: "tcp,udp"}},
		{name: "catch-all but 22", rule: cat(l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpNeq, 22), dnat4()), want: want{catchAll: 1, before: true, protos: "tcp"}},
		{name: "DMZ after pcpd's chain", chain: baseChain(fAdmin, "pre", fNAT, pre, dstnat+2),
			rule: cat(daddr("198.51.100.1/32"), l4(unix.IPPROTO_TCP), dportRange(1024, 65535), dnat4()), want: want{catchAll: 1, protos: "tcp"}},
		// h/left9 (issue 9): a catch-all before pcpd's chain with every
		// condition read takes every connection of its protocols (the
		// server refuses new IPv4 mappings then); one whose path holds a
		// condition not read may leave some (Why says which).
		{name: "catch-all udp through a jump", rule: cat(l4(unix.IPPROTO_UDP), jump(expr.VerdictJump, "dmz")),
			others: map[string][]expr.Any{"dmz": cat(daddr("198.51.100.0/24"), dnat4())}, want: want{catchAll: 1, before: true, protos: "udp"}},
		{name: "catch-all from some sources", rule: cat([]expr.Any{&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 12, Len: 4},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{192, 168, 1, 5}}}, daddr("198.51.100.1/32"), dnat4()),
			want: want{catchAll: 1, before: true, protos: "tcp,udp", unsure: "not read"}},
		{name: "catch-all on an interface", rule: cat([]expr.Any{&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte("lan0\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")}}, dnat4()),
			want: want{catchAll: 1, before: true, protos: "tcp,udp", unsure: "not read"}},
		{name: "catch-all with a limit", rule: cat(daddr("198.51.100.1/32"), []expr.Any{&expr.Limit{Type: expr.LimitTypePkts, Rate: 10, Unit: expr.LimitTimeSecond}}, dnat4()),
			want: want{catchAll: 1, before: true, protos: "tcp,udp", unsure: "Limit"}},
		{name: "catch-all with a meter", rule: cat(daddr("198.51.100.1/32"), []expr.Any{&expr.Dynset{SetName: "m", Operation: 1, SrcRegKey: 1}}, dnat4()),
			want: want{catchAll: 1, before: true, protos: "tcp,udp", unsure: "set update"}},
		{name: "catch-all with an expression the library drops", count: 5, rule: cat(daddr("198.51.100.1/32"), dnat4()),
			want: want{catchAll: 1, before: true, protos: "tcp,udp", unsure: "does not read"}},
		{name: "catch-all with an iptables comment", rule: cat(daddr("198.51.100.1/32"), []expr.Any{&expr.Match{Name: "comment", Info: &xt.Unknown{}}},
			[]expr.Any{&expr.Target{Name: "DNAT", Info: &xt.NatRange{}}}), want: want{catchAll: 1, before: true, protos: "tcp,udp"}},
		{name: "catch-all with an iptables conntrack match", rule: cat(daddr("198.51.100.1/32"), []expr.Any{&expr.Match{Name: "conntrack", Info: &xt.Unknown{}}},
			[]expr.Any{&expr.Target{Name: "DNAT", Info: &xt.NatRange{}}}), want: want{catchAll: 1, before: true, protos: "tcp,udp", unsure: "conntrack"}},
		{name: "forward after pcpd's chain", chain: baseChain(fAdmin, "pre", fNAT, pre, dstnat+2),
			rule: cat(l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 443), dnat4()), want: want{tcp: "443"}},
		// h/left9: conntrack's original tuple (a chain holding one is read
		// by pcpd's own decoder: TestDecodeRuleMsgsCt).
		{name: "ct original proto-dst", rule: cat(l4(unix.IPPROTO_TCP), ctLoad(expr.CtKeyPROTODST, 0), []expr.Any{&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: be16(8080)}}, dnat4()),
			want: want{tcp: "8080"}},
		{name: "ct original proto-dst in a set", sets: map[string]fakeSet{"__set2": portSet(53, 5353)},
			rule: cat(l4(unix.IPPROTO_UDP), ctLoad(expr.CtKeyPROTODST, 0), []expr.Any{&expr.Lookup{SourceRegister: 1, SetName: "__set2"}}, dnat4()),
			want: want{udp: "53,5353"}},
		{name: "ct protocol, th dport", rule: cat(ctLoad(expr.CtKeyPROTOCOL, 0), []expr.Any{&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_UDP}}},
			dportCmp(expr.CmpOpEq, 500), dnat4()), want: want{udp: "500"}},
		{name: "ct original ip daddr another address", rule: cat(ctLoad(unix.NFT_CT_DST_IP, 0), []expr.Any{&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{203, 0, 113, 9}}},
			l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 443), dnat4()), want: want{}},
		{name: "ct original ip daddr ours", rule: cat(ctLoad(unix.NFT_CT_DST_IP, 0), []expr.Any{&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{198, 51, 100, 1}}},
			l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 443), dnat4()), want: want{tcp: "443"}},
		{name: "ct reply proto-dst: the source port", rule: cat(l4(unix.IPPROTO_TCP), ctLoad(expr.CtKeyPROTODST, 1), []expr.Any{&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: be16(8080)}}, dnat4()),
			want: want{catchAll: 1, before: true, protos: "tcp", unsure: "not read"}},
		{name: "concatenation", sets: map[string]fakeSet{"__set1": {s: &nftables.Set{Name: "__set1", Concatenation: true},
			els: []nftables.SetElement{{Key: []byte{198, 51, 100, 1, 0x01, 0xbb, 0, 0}}}}},
			rule: cat(l4(unix.IPPROTO_TCP), []expr.Any{&expr.Payload{DestRegister: unix.NFT_REG32_00, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
				&expr.Payload{DestRegister: unix.NFT_REG32_01, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
				&expr.Lookup{SourceRegister: unix.NFT_REG32_00, SetName: "__set1"}}, dnat4()), want: want{undecoded: "concatenation"}},
		{name: "set not found", rule: cat(l4(unix.IPPROTO_TCP), dportSet("gone", false), dnat4()), want: want{undecoded: "not found"}},
		{name: "iptables-nft tcp match, DNAT target", rule: []expr.Any{&expr.Match{Name: "tcp", Info: &xt.Tcp{SrcPorts: [2]uint16{0, 0xffff}, DstPorts: [2]uint16{2222, 2222}}},
			&expr.Target{Name: "DNAT", Info: &xt.NatRange{}}}, want: want{tcp: "2222"}},
		{name: "iptables-nft udp match", rule: []expr.Any{&expr.Match{Name: "udp", Info: &xt.Udp{SrcPorts: [2]uint16{0, 0xffff}, DstPorts: [2]uint16{6000, 6010}}},
			&expr.Target{Name: "REDIRECT", Info: &xt.NatRange{}}}, want: want{udp: "6000-6010"}},
		{name: "iptables-nft multiport", rule: cat(ipProto(unix.IPPROTO_TCP), []expr.Any{&expr.Match{Name: "multiport", Info: &xt.Unknown{}},
			&expr.Target{Name: "DNAT", Info: &xt.NatRange{}}}), want: want{undecoded: "multiport"}},
		{name: "pcpd's own table", table: fPcpd, chain: baseChain(fPcpd, "prerouting", fNAT, pre, dstnat+1),
			rule: cat(l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 443), dnat4()), want: want{}},
		{name: "filter chain", chain: baseChain(fAdmin, "pre", fFilter, pre, dstnat),
			rule: cat(l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 443), dnat4()), want: want{}},
		{name: "output hook", chain: baseChain(fAdmin, "pre", fNAT, nftables.ChainHookOutput, dstnat),
			rule: cat(l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 443), dnat4()), want: want{}},
		{name: "ip6 table", table: fIP6, chain: baseChain(fIP6, "pre", fNAT, pre, dstnat),
			rule: cat(l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 443), dnat4()), want: want{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			table := tc.table
			if table == nil {
				table = fAdmin
			}
			c := tc.chain
			if c == nil {
				c = baseChain(table, "pre", fNAT, pre, dstnat)
			}
			src := &fakeRules{chainList: []*nftables.Chain{c}, rulesOf: map[string][]*nftables.Rule{
				table.Name + "/" + c.Name: {{Table: table, Chain: c, Handle: 7, Exprs: tc.rule}}}, setsOf: map[string]fakeSet{}}
			for name, e := range tc.others {
				ch := &nftables.Chain{Table: table, Name: name}
				src.chainList = append(src.chainList, ch)
				src.rulesOf[table.Name+"/"+name] = []*nftables.Rule{{Table: table, Chain: ch, Handle: 9, Exprs: e}}
			}
			for name, s := range tc.sets {
				src.setsOf[table.Name+"/"+name] = s
			}
			if tc.count != 0 {
				src.counts = map[string]int{table.Name + "/" + c.Name + "/7": tc.count}
			}
			own := func(t *nftables.Table, _ string) bool {
				return t.Family == nftables.TableFamilyINet && t.Name == "pcpd"
			}
			f, err := readForeign(src, own, fExt, 1024, 65535)
			if err != nil {
				t.Fatal(err)
			}
			if got := f.TCP.String(); got != tc.want.tcp {
				t.Errorf("TCP ports %q, want %q", got, tc.want.tcp)
			}
			if got := f.UDP.String(); got != tc.want.udp {
				t.Errorf("UDP ports %q, want %q", got, tc.want.udp)
			}
			if len(f.CatchAll) != tc.want.catchAll || (len(f.CatchAll) > 0 && f.CatchAll[0].Before != tc.want.before) {
				t.Errorf("catch-alls %+v, want %d (before pcpd's chain: %v)", f.CatchAll, tc.want.catchAll, tc.want.before)
			}
			if len(f.CatchAll) > 0 {
				r := f.CatchAll[0]
				var protos []string
				if r.TCP {
					protos = append(protos, "tcp")
				}
				if r.UDP {
					protos = append(protos, "udp")
				}
				if got := strings.Join(protos, ","); got != tc.want.protos {
					t.Errorf("catch-all's protocols %q, want %q", got, tc.want.protos)
				}
				if (tc.want.unsure == "") != (r.Why == "") || !strings.Contains(r.Why, tc.want.unsure) {
					t.Errorf("catch-all's condition not read %q, want %q", r.Why, tc.want.unsure)
				}
			}
			switch {
			case tc.want.undecoded == "" && len(f.Undecoded) > 0:
				t.Errorf("undecoded %+v, want none", f.Undecoded)
			case tc.want.undecoded != "" && (len(f.Undecoded) != 1 || !strings.Contains(f.Undecoded[0].Why, tc.want.undecoded)):
				t.Errorf("undecoded %+v, want one: %q", f.Undecoded, tc.want.undecoded)
			}
		})
	}
}

// TestForeignDNATUnparsedChain: a chain whose rules the library cannot
// parse (google/nftables v0.3.0 reads ct's u8 direction as a u32:
// "ct original proto-dst 3003" fails its dump) is reported undecoded and
// the rest of the ruleset is read (review h/revadmin); a netlink error
// (the kernel's) still fails the read. Before, any such rule failed the
// whole read: nothing reserved at all.
func TestForeignDNATUnparsedChain(t *testing.T) {
	pre := baseChain(fAdmin, "pre", fNAT, nftables.ChainHookPrerouting, *nftables.ChainPriorityNATDest)
	odd := &nftables.Chain{Table: fAdmin, Name: "odd"}
	src := &fakeRules{chainList: []*nftables.Chain{pre, odd}, rulesOf: map[string][]*nftables.Rule{"admin/pre": {
		{Table: fAdmin, Chain: pre, Handle: 1, Exprs: cat(l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 443), dnat4())},
		{Table: fAdmin, Chain: pre, Handle: 2, Exprs: cat(l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 84), jump(expr.VerdictJump, "odd"))},
	}}, errs: map[string]error{"admin/odd": fmt.Errorf("netlink: attribute 3 is not a uint32; length: 1")}}
	own := func(*nftables.Table, string) bool { return false }
	f, err := readForeign(src, own, fExt, 1024, 65535)
	if err != nil {
		t.Fatalf("a chain the library cannot parse failed the whole read: %v", err)
	}
	if got := f.TCP.String(); got != "443" {
		t.Errorf("TCP ports %q, want 443", got)
	}
	if len(f.Undecoded) != 1 || f.Undecoded[0].Chain != "odd" || !strings.Contains(f.Undecoded[0].Why, "cannot be parsed") {
		t.Errorf("undecoded %+v, want chain odd's", f.Undecoded)
	}
	src.errs["admin/odd"] = &netlink.OpError{Op: "receive", Err: unix.ENOENT}
	if _, err := readForeign(src, own, fExt, 1024, 65535); err == nil {
		t.Error("a netlink error did not fail the read")
	}
}

// branching is a base chain c0 and chains c1..cDepth, each of c0..c(depth-1)
// with fanout rules jumping to the next, rule(level, j) the j-th's
// expressions before its jump; cDepth holds "tcp dport 443 dnat" and a
// catch-all "dnat".
func branching(depth, fanout int, rule func(level, j int) []expr.Any) *fakeRules {
	base := baseChain(fAdmin, "c0", fNAT, nftables.ChainHookPrerouting, *nftables.ChainPriorityNATDest)
	src := &fakeRules{chainList: []*nftables.Chain{base}, rulesOf: map[string][]*nftables.Rule{}}
	for i := 0; i <= depth; i++ {
		ch := base
		if i > 0 {
			ch = &nftables.Chain{Table: fAdmin, Name: fmt.Sprint("c", i)}
			src.chainList = append(src.chainList, ch)
		}
		var rs []*nftables.Rule
		if i == depth {
			rs = []*nftables.Rule{{Table: fAdmin, Chain: ch, Handle: 1, Exprs: cat(l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 443), dnat4())},
				{Table: fAdmin, Chain: ch, Handle: 2, Exprs: dnat4()}}
		}
		for j := 0; i < depth && j < fanout; j++ {
			rs = append(rs, &nftables.Rule{Table: fAdmin, Chain: ch, Handle: uint64(j + 1),
				Exprs: cat(rule(i, j), jump(expr.VerdictJump, fmt.Sprint("c", i+1)))})
		}
		src.rulesOf["admin/"+ch.Name] = rs
	}
	return src
}

// TestForeignDNATBranchingJumps: a chain reached by many paths is walked
// once per condition and its DNATs recorded once (review h/revadmin).
// Before, every path was walked: 3 jumps a level over 10 levels recorded
// the catch-all 59 049 times, 8 over 16 (8^16 paths) never ended, under
// the engine lock. Paths whose conditions all differ (a distinct port
// excluded at every branch) are cut at maxVisits: the read fails.
func TestForeignDNATBranchingJumps(t *testing.T) {
	own := func(*nftables.Table, string) bool { return false }
	iif := func(level, j int) []expr.Any { // iifname "ethJ" (not modelled: may match)
		return []expr.Any{&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte(fmt.Sprint("eth", j, "\x00"))}}
	}
	for _, tc := range []struct{ depth, fanout int }{{10, 3}, {16, 8}} {
		f, err := readForeign(branching(tc.depth, tc.fanout, iif), own, fExt, 1024, 65535)
		if err != nil {
			t.Fatal(err)
		}
		if len(f.CatchAll) != 1 || f.Rules != 2 || f.TCP.String() != "443" {
			t.Fatalf("%d levels of %d jumps: %d catch-all records, %d rules, TCP %q; want 1, 2, 443", tc.depth, tc.fanout, len(f.CatchAll), f.Rules, f.TCP.String())
		}
	}
	distinct := func(level, j int) []expr.Any { return dportCmp(expr.CmpOpNeq, uint16(10000+level*100+j)) }
	if _, err := readForeign(branching(16, 4, distinct), own, fExt, 1024, 65535); !errors.Is(err, errTooBranched) {
		t.Fatalf("4^16 distinct paths: %v, want errTooBranched", err)
	}
}

// TestSpans: the port-list algebra the conditions use.
func TestSpans(t *testing.T) {
	s := spans{{5, 9}, {1, 3}, {4, 4}, {20, 30}}.normal()
	if fmt.Sprint(s) != "[{1 9} {20 30}]" {
		t.Fatalf("normal: %v", s)
	}
	if c := s.complement(); fmt.Sprint(c) != "[{0 0} {10 19} {31 65535}]" {
		t.Fatalf("complement: %v", c)
	}
	if i := s.intersect(spans{{8, 25}}); fmt.Sprint(i) != "[{8 9} {20 25}]" {
		t.Fatalf("intersect: %v", i)
	}
	if !s.covers(2, 9) || s.covers(2, 10) || (spans{{0, 65535}}).complement() != nil {
		t.Fatal("covers / complement of everything")
	}
	var p PortSet
	p.addRange(60, 200)
	p.addRange(65535, 65535)
	if got := p.String(); got != "60-200,65535" {
		t.Fatalf("addRange: %s", got)
	}
}

// BenchmarkReadForeignDecode: readForeign's own work (no kernel) over n
// rules of one port each, "tcp dport N dnat to A" as nft compiles it.
func BenchmarkReadForeignDecode(b *testing.B) {
	for _, n := range []int{10, 1000} {
		b.Run(fmt.Sprintf("rules=%d", n), func(b *testing.B) {
			c := baseChain(fAdmin, "pre", fNAT, nftables.ChainHookPrerouting, *nftables.ChainPriorityNATDest)
			src := &fakeRules{chainList: []*nftables.Chain{c}, rulesOf: map[string][]*nftables.Rule{}}
			for i := range n {
				src.rulesOf["admin/pre"] = append(src.rulesOf["admin/pre"], &nftables.Rule{Table: fAdmin, Chain: c, Handle: uint64(i),
					Exprs: cat(l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, uint16(20000+i)), dnat4())})
			}
			own := func(*nftables.Table, string) bool { return false }
			for b.Loop() {
				if f, err := readForeign(src, own, fExt, 1024, 65535); err != nil || f.Rules != n {
					b.Fatal(f, err)
				}
			}
		})
	}
}
