package pinhole

import (
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// TestForeignDNATGuess (review h/revf4): a port forward under a condition
// pcpd does not read (an interface: 'iifname "lan0"', NAT reflection for
// the LAN only) is reserved (TCP) and marked a guess (GuessTCP): the
// server ends no lease on it. One with every condition read is no guess,
// nor a port both forward. Before there was no GuessTCP: the server took
// every reserved port for a forward and ended a PEER on a LAN-only one.
func TestForeignDNATGuess(t *testing.T) {
	dstnat := *nftables.ChainPriorityNATDest
	tab := &nftables.Table{Family: nftables.TableFamilyIPv4, Name: "admin"}
	iif := []expr.Any{&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte("lan0\x00")}}
	tcp := func(p uint16) []expr.Any { return cat(l4(unix.IPPROTO_TCP), dportCmp(expr.CmpOpEq, p), dnat4()) }
	for _, tc := range []struct {
		name            string
		rules           [][]expr.Any
		wantTCP, wantGs string
	}{
		{"all read", [][]expr.Any{tcp(443)}, "443", ""},
		{"an interface condition", [][]expr.Any{cat(iif, tcp(443))}, "443", "443"},
		{"both forward it", [][]expr.Any{cat(iif, tcp(443)), tcp(443), cat(iif, tcp(8080))}, "443,8080", "8080"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var rs []*nftables.Rule
			for i, r := range tc.rules {
				rs = append(rs, &nftables.Rule{Handle: uint64(i + 1), Exprs: r})
			}
			f := &fakeRules{
				chainList: []*nftables.Chain{baseChain(tab, "pre", nftables.ChainTypeNAT, nftables.ChainHookPrerouting, dstnat)},
				rulesOf:   map[string][]*nftables.Rule{"admin/pre": rs},
			}
			got, err := readForeign(f, func(*nftables.Table, string) bool { return false }, fExt, 1024, 65535)
			if err != nil {
				t.Fatal(err)
			}
			if g, gs := got.TCP.String(), got.GuessTCP.String(); g != tc.wantTCP || gs != tc.wantGs || got.GuessUDP.String() != "" {
				t.Errorf("TCP %q guessed %q (UDP guessed %q); want %q, %q", g, gs, got.GuessUDP.String(), tc.wantTCP, tc.wantGs)
			}
		})
	}
}
