package pinhole

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
)

// TestPlanIntervalSync: every transaction planIntervalSync plans deletes
// only ranges the set holds at that point, adds none that overlaps one it
// holds (the kernel refuses those), and leaves every address that is held
// before and wanted after covered (the guard must not lapse for a client
// that stays); the last leaves exactly want, an unchanged set takes no
// transaction, and a transaction exceeds the limit only when one
// component does.
func TestPlanIntervalSync(t *testing.T) {
	r := func(s string) [2]netip.Addr {
		p := netip.MustParsePrefix(s)
		f, l := prefixRange(p)
		return [2]netip.Addr{f, l}
	}
	rs := func(ss ...string) [][2]netip.Addr {
		var out [][2]netip.Addr
		for _, s := range ss {
			out = append(out, r(s))
		}
		return out
	}
	many := func(n, from, step int) [][2]netip.Addr {
		var out [][2]netip.Addr
		for i := range n {
			j := from + i*step
			out = append(out, r(netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(j >> 8), byte(j), 0}), 24).String()))
		}
		return out
	}
	for _, tc := range []struct {
		name       string
		have, want [][2]netip.Addr
		limit      int
		txns       int // -1: not checked
	}{
		{"unchanged", rs("10.0.0.0/24", "10.0.2.0/24"), rs("10.0.0.0/24", "10.0.2.0/24"), 4, 0},
		{"empty to many", nil, many(100, 0, 2), 16, 13},
		{"many to empty", many(100, 0, 2), nil, 16, 13},
		{"half moved", many(100, 0, 2), many(100, 100, 2), 16, -1},
		{"one wide over many held", many(100, 0, 2), rs("10.0.0.0/16"), 16, 1},
		{"many wanted in one held", rs("10.0.0.0/16"), many(100, 0, 2), 16, 1},
		{"grown by one", rs("10.0.0.0/24"), rs("10.0.0.0/23"), 16, 1},
		{"adjacent held merged", rs("10.0.0.0/24", "10.0.1.0/24"), rs("10.0.0.0/23"), 16, 1},
		{"to the top", rs("255.255.255.0/24"), rs("255.255.0.0/16"), 16, 1},
		{"mixed", rs("10.0.0.0/24", "10.0.4.0/22", "10.1.0.0/16"), rs("10.0.0.0/24", "10.0.5.0/24", "10.0.7.0/24", "10.2.0.0/16"), 3, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			txns := planIntervalSync(tc.have, tc.want, tc.limit)
			if tc.txns >= 0 && len(txns) != tc.txns {
				t.Errorf("%d transactions, want %d", len(txns), tc.txns)
			}
			set := slices.Clone(tc.have)
			for i, txn := range txns {
				n := 0
				for _, d := range txn.del {
					k := slices.Index(set, d)
					if k < 0 {
						t.Fatalf("txn %d deletes %v, not held (%v)", i, d, set)
					}
					set = slices.Delete(set, k, k+1)
					n += rangeElementCount(d)
				}
				for _, a := range txn.add {
					for _, h := range set {
						if a[0].Compare(h[1]) <= 0 && h[0].Compare(a[1]) <= 0 {
							t.Fatalf("txn %d adds %v over %v, still held", i, a, h)
						}
					}
					set = append(set, a)
					n += rangeElementCount(a)
				}
				if n > tc.limit && !oneComponent(txn) {
					t.Errorf("txn %d has %d elements, limit %d, and more than one component", i, n, tc.limit)
				}
				for _, h := range tc.have {
					for _, w := range tc.want {
						if lo, hi := maxAddr(h[0], w[0]), minAddr(h[1], w[1]); lo.Compare(hi) <= 0 && !covered(set, lo, hi) {
							t.Fatalf("after txn %d, %v-%v (held before, wanted after) is not covered: %v", i, lo, hi, set)
						}
					}
				}
			}
			slices.SortFunc(set, func(a, b [2]netip.Addr) int { return a[0].Compare(b[0]) })
			if fmt.Sprint(set) != fmt.Sprint(tc.want) && !(len(set) == 0 && len(tc.want) == 0) {
				t.Errorf("set ends as %v, want %v", set, tc.want)
			}
		})
	}
}

// oneComponent: txn's ranges all overlap into one component.
func oneComponent(txn intervalTxn) bool {
	all := append(slices.Clone(txn.del), txn.add...)
	slices.SortFunc(all, func(a, b [2]netip.Addr) int { return a[0].Compare(b[0]) })
	end := all[0][1]
	for _, r := range all[1:] {
		if r[0].Compare(end) > 0 {
			return false
		}
		end = maxAddr(end, r[1])
	}
	return true
}

// covered: lo..hi lies within the union of set's ranges.
func covered(set [][2]netip.Addr, lo, hi netip.Addr) bool {
	s := slices.Clone(set)
	slices.SortFunc(s, func(a, b [2]netip.Addr) int { return a[0].Compare(b[0]) })
	for _, r := range s {
		if r[0].Compare(lo) > 0 {
			return false
		}
		if r[1].Compare(lo) >= 0 {
			if r[1].Compare(hi) >= 0 {
				return true
			}
			lo = r[1].Next()
		}
	}
	return false
}

func maxAddr(a, b netip.Addr) netip.Addr {
	if a.Compare(b) > 0 {
		return a
	}
	return b
}

func minAddr(a, b netip.Addr) netip.Addr {
	if a.Compare(b) < 0 {
		return a
	}
	return b
}
