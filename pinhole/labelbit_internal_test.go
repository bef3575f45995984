package pinhole

import (
	"net/netip"
	"testing"

	"github.com/google/nftables/expr"
)

// TestRuleUsesLabel: bitTaken's reading of a rule (labelbit.go): "ct
// label set N" and "ct label N" use bit N; a rule that tests another bit
// and an IPv6 address whose bytes hold N does not.
func TestRuleUsesLabel(t *testing.T) {
	addr := netip.MustParseAddr("2001:db8::4:0:0").As16() // byte 11 = 0x04: bit 90
	for _, tc := range []struct {
		name string
		es   []expr.Any
		want bool
	}{
		{"ct label set 90", (&Backend{}).setLabel(90), true},
		{"ct label set 5", (&Backend{}).setLabel(5), false},
		{"ct label 90", rule(x(loadCt(expr.CtKeyLABELS, reg0)), labelSet(90)), true},
		{"ct label 91", rule(x(loadCt(expr.CtKeyLABELS, reg0)), labelSet(91)), false},
		{"ct label 5 ip6 daddr with bit 90's byte", rule(x(loadCt(expr.CtKeyLABELS, reg0)), labelSet(5),
			x(loadNet(ip6DstOff, 16, reg0), &expr.Cmp{Op: expr.CmpOpEq, Register: reg0, Data: addr[:]})), false},
	} {
		if got := ruleUsesLabel(tc.es, 90); got != tc.want {
			t.Errorf("%s: ruleUsesLabel = %v, want %v", tc.name, got, tc.want)
		}
	}
}
