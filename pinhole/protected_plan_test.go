package pinhole

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
	"time"
)

// TestPlanIntervalSync: every transaction planIntervalSync plans deletes
// only ranges the set holds at that point, adds none that overlaps one it
// holds (the kernel refuses those), has at most limit elements (one
// transaction is one sendmsg: a larger one failed with EMSGSIZE for good),
// and leaves every address that is held before and wanted after covered
// (the guard must not lapse for a client that stays); the last leaves
// exactly want, and an unchanged set takes no transaction.
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
		{"unchanged", rs("10.0.0.0/24", "10.0.2.0/24"), rs("10.0.0.0/24", "10.0.2.0/24"), 6, 0},
		{"empty to many", nil, many(100, 0, 2), 16, 13},
		{"many to empty", many(100, 0, 2), nil, 16, 13},
		{"half moved", many(100, 0, 2), many(100, 100, 2), 16, -1},
		{"one wide over many held", many(100, 0, 2), rs("10.0.0.0/16"), 16, 17},
		{"many wanted in one held", rs("10.0.0.0/16"), many(100, 0, 2), 16, 17},
		{"one wide over many held, fits", many(7, 0, 2), rs("10.0.0.0/16"), 16, 1},
		{"many wanted in one held, fits", rs("10.0.0.0/16"), many(7, 0, 2), 16, 1},
		{"many held to many wanted under one", append(many(50, 0, 2), r("10.1.0.0/16")), append(rs("10.0.0.0/16"), many(50, 256, 2)...), 16, -1},
		{"one wide over many held, smallest limit", many(20, 0, 2), rs("10.0.0.0/16"), 6, 20},
		{"many wanted in one held, smallest limit", rs("10.0.0.0/16"), many(20, 0, 2), 6, 19},
		{"limit below 6 counts as 6", rs("10.0.0.0/16"), many(20, 0, 2), 1, 19},
		{"wanted wider than held on both sides", many(30, 1, 2), rs("10.0.0.0/16"), 8, -1},
		{"held wider than wanted on both sides", rs("10.0.0.0/16"), many(30, 1, 2), 8, -1},
		{"grown by one", rs("10.0.0.0/24"), rs("10.0.0.0/23"), 16, 1},
		{"adjacent held merged", rs("10.0.0.0/24", "10.0.1.0/24"), rs("10.0.0.0/23"), 16, 1},
		{"adjacent held merged, split", many(40, 0, 1), rs("10.0.0.0/16"), 16, -1},
		{"to the top", rs("255.255.255.0/24"), rs("255.255.0.0/16"), 16, 1},
		{"many to the top", rs("255.255.0.0/16"), rs("255.255.0.0/24", "255.255.2.0/24", "255.255.4.0/24", "255.255.6.0/24", "255.255.255.0/24"), 6, -1},
		{"many from the top", rs("255.255.0.0/24", "255.255.2.0/24", "255.255.4.0/24", "255.255.6.0/24", "255.255.255.0/24"), rs("255.255.0.0/16"), 6, -1},
		{"mixed", rs("10.0.0.0/24", "10.0.4.0/22", "10.1.0.0/16"), rs("10.0.0.0/24", "10.0.5.0/24", "10.0.7.0/24", "10.2.0.0/16"), 6, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			txns := planIntervalSync(tc.have, tc.want, tc.limit)
			if tc.txns >= 0 && len(txns) != tc.txns {
				t.Errorf("%d transactions, want %d", len(txns), tc.txns)
			}
			checkPlan(t, tc.have, tc.want, max(tc.limit, 6), txns)
		})
	}
}

// TestPlanIntervalSyncRandom: the properties of TestPlanIntervalSync for
// random held and wanted ranges in 512 addresses up to the top of the
// IPv4 space (where a range has no end element), the held ones possibly
// adjacent (as a kernel set may hold them), the wanted ones as
// writeProtected computes them from prefixes, and random limits.
func TestPlanIntervalSyncRandom(t *testing.T) {
	const space = 512
	base := netip.MustParseAddr("255.255.254.0")
	addr := func(off int) netip.Addr {
		a := base
		for range off {
			a = a.Next()
		}
		return a
	}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rnd := rand.New(rand.NewPCG(seed, 1))
	for i := range 3000 {
		var have [][2]netip.Addr
		for off := rnd.IntN(8); off < space; {
			n := 1 + rnd.IntN([]int{2, 8, 64}[rnd.IntN(3)])
			if off+n > space {
				n = space - off
			}
			have = append(have, [2]netip.Addr{addr(off), addr(off + n - 1)})
			off += n + rnd.IntN([]int{1, 4, 40}[rnd.IntN(3)]) // 0: adjacent
		}
		if rnd.IntN(4) == 0 {
			have = nil
		}
		var prefixes []netip.Prefix
		for range rnd.IntN(80) {
			prefixes = append(prefixes, netip.PrefixFrom(addr(rnd.IntN(space)), 23+rnd.IntN(10)).Masked())
		}
		want := elementRanges(intervalElements(prefixes))
		limit := 6 + rnd.IntN(40)
		txns := planIntervalSync(have, want, limit)
		if !checkPlan(t, have, want, limit, txns) {
			t.Fatalf("case %d (seed %d): have %v, want %v, limit %d", i, seed, have, want, limit)
		}
	}
}

// checkPlan applies txns to a simulated set holding have and reports
// whether every transaction keeps the properties of TestPlanIntervalSync
// and the set ends as want.
func checkPlan(t *testing.T, have, want [][2]netip.Addr, limit int, txns []intervalTxn) bool {
	t.Helper()
	set := slices.Clone(have)
	for i, txn := range txns {
		n := 0
		for _, d := range txn.del {
			k := slices.Index(set, d)
			if k < 0 {
				t.Errorf("txn %d deletes %v, not held (%v)", i, d, set)
				return false
			}
			set = slices.Delete(set, k, k+1)
			n += rangeElementCount(d)
		}
		for _, a := range txn.add {
			for _, h := range set {
				if a[0].Compare(h[1]) <= 0 && h[0].Compare(a[1]) <= 0 {
					t.Errorf("txn %d adds %v over %v, still held", i, a, h)
					return false
				}
			}
			set = append(set, a)
			n += rangeElementCount(a)
		}
		if n > limit {
			t.Errorf("txn %d has %d elements, limit %d", i, n, limit)
			return false
		}
		for _, h := range have {
			for _, w := range want {
				if lo, hi := maxAddr(h[0], w[0]), minAddr(h[1], w[1]); lo.Compare(hi) <= 0 && !covered(set, lo, hi) {
					t.Errorf("after txn %d, %v-%v (held before, wanted after) is not covered: %v", i, lo, hi, set)
					return false
				}
			}
		}
	}
	slices.SortFunc(set, func(a, b [2]netip.Addr) int { return a[0].Compare(b[0]) })
	if fmt.Sprint(set) != fmt.Sprint(want) && !(len(set) == 0 && len(want) == 0) {
		t.Errorf("set ends as %v, want %v", set, want)
		return false
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
