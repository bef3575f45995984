package pinhole

import (
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// TestForeignForwardOtherInterfaceReserved (review h/revpr of h/prio):
// a port forward limited to an interface that does not hold the
// external address ("iifname "lan0" ip daddr P tcp dport 8080 dnat to
// H", a hairpin/reflection forward as OpenWrt's fw4 writes one) still
// takes connections to P:8080: those of the LAN's hosts, which reach
// pcpd's mappings on P through lan0 too (pcpd hairpins: natcut,
// TestNAPT4HairpinKeepsExternalSource). Its port stays reserved, as
// before h/prio, and a catch-all so limited is warned about: granting
// 8080 gives it two owners, the Internet's connections landing on the
// client and the LAN's on H. Rows by name, wildcard, set, iif, "!=".
func TestForeignForwardOtherInterfaceReserved(t *testing.T) {
	name := func(s string) []byte { b := make([]byte, 16); copy(b, s); return b }
	wan := []extIf{{name: "wan0", index: 5}}
	for _, tc := range []struct {
		name string
		cond []expr.Any
	}{
		{"iifname lan0", []expr.Any{&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: name("lan0")}}},
		{"iifname la*", []expr.Any{&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte("la")}}},
		{"iifname != wan0", []expr.Any{&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1}, &expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: name("wan0")}}},
		{"iif 7", []expr.Any{&expr.Meta{Key: expr.MetaKeyIIF, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{7, 0, 0, 0}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pc := baseChain(fAdmin, "pre", fNAT, nftables.ChainHookPrerouting, *nftables.ChainPriorityNATDest)
			at := target{ext: fExt, ifs: wan, ifsKnown: true}
			own := func(*nftables.Table, string) bool { return false }
			fwd := &fakeRules{chainList: []*nftables.Chain{pc}, rulesOf: map[string][]*nftables.Rule{"admin/pre": {{Table: fAdmin, Chain: pc, Handle: 1,
				Exprs: cat(tc.cond, daddr("198.51.100.1/32"), l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, 8080), dnat4())}}}}
			f, err := readForeignAt(fwd, own, at, 1024, 65535)
			if err != nil {
				t.Fatal(err)
			}
			if !f.TCP.Has(8080) {
				t.Errorf("forward: TCP reserved %q, want 8080 (the LAN's hairpinned connections to it land on the forward's host)", f.TCP.String())
			}
			dmz := &fakeRules{chainList: []*nftables.Chain{pc}, rulesOf: map[string][]*nftables.Rule{"admin/pre": {{Table: fAdmin, Chain: pc, Handle: 1,
				Exprs: cat(tc.cond, daddr("198.51.100.1/32"), dnat4())}}}}
			if f, err = readForeignAt(dmz, own, at, 1024, 65535); err != nil {
				t.Fatal(err)
			}
			if tcp, udp := refusing(f); tcp || udp || len(f.CatchAll) == 0 {
				t.Errorf("catch-all: refusing TCP %v UDP %v, catch-alls %s; want none refused, the rule warned about", tcp, udp, catchAlls(f))
			}
		})
	}
}
