package policy

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// tableOf builds a table from prefix → owner index (noOwner = hole).
func tableOf(nOwners int, claims map[netip.Prefix]int32) *table {
	owners := make([]Owner, nOwners)
	for i := range owners {
		owners[i].ID = OwnerID(fmt.Sprintf("test:%d", i))
	}
	var spans []span
	for p, o := range claims {
		s := spanOf(p)
		s.owner = o
		spans = append(spans, s)
		if o >= 0 {
			owners[o].Prefixes = append(owners[o].Prefixes, p)
		}
	}
	return build(owners, spans)
}

// bruteOwner is the reference longest match.
func bruteOwner(claims map[netip.Prefix]int32, a netip.Addr) int32 {
	best, owner := -1, noOwner
	for p, o := range claims {
		if p.Contains(a) && p.Bits() > best {
			best, owner = p.Bits(), o
		}
	}
	return owner
}

// randomClaims draws prefixes from a small pool of bases so that many nest.
// With few set, lengths come from a handful of values (the hashed lookup);
// otherwise from the whole range (the interval search).
func randomClaims(r *rand.Rand, n, nOwners int, few ...bool) map[netip.Prefix]int32 {
	claims := make(map[netip.Prefix]int32)
	len4 := func() int { return 8 + r.IntN(25) }
	len6 := func() int { return 32 + r.IntN(97) }
	if len(few) > 0 && few[0] {
		len4 = func() int { return []int{8, 16, 24, 30, 32}[r.IntN(5)] }
		len6 = func() int { return []int{32, 48, 56, 64, 126, 127, 128}[r.IntN(7)] }
	}
	for len(claims) < n {
		var p netip.Prefix
		if r.IntN(3) == 0 {
			a := netip.AddrFrom4([4]byte{10, byte(r.IntN(4)), byte(r.IntN(4)), byte(r.IntN(8))})
			p = netip.PrefixFrom(a, len4()).Masked()
		} else {
			var b [16]byte
			copy(b[:], []byte{0x20, 0x01, 0x0d, 0xb8, 0, byte(r.IntN(4)), 0, 0, 0, byte(r.IntN(4))})
			b[15] = byte(r.IntN(8))
			p = netip.PrefixFrom(netip.AddrFrom16(b), len6()).Masked()
		}
		o := int32(r.IntN(nOwners))
		if r.IntN(10) == 0 {
			o = noOwner
		}
		claims[p] = o
	}
	return claims
}

// probes returns addresses at and around every prefix boundary plus randoms.
func probes(r *rand.Rand, claims map[netip.Prefix]int32) []netip.Addr {
	var out []netip.Addr
	for p := range claims {
		s := spanOf(p)
		for _, u := range []u128{s.first, s.last} {
			out = append(out, natural(u))
			if n, of := u.addOne(); !of {
				out = append(out, natural(n))
			}
			out = append(out, natural(u.subOne()))
		}
	}
	for range 200 {
		out = append(out, natural(u128{r.Uint64(), r.Uint64()}))
		out = append(out, natural(u128{0x20010db800000000 | r.Uint64()&0x0000_0003_0000_0003, r.Uint64() & 0xff}))
	}
	return out
}

// natural unmaps IPv4-mapped keys, as lookups expect.
func natural(u u128) netip.Addr { return u.addr().Unmap() }

func TestTableLongestMatchAgainstBruteForce(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for round := range 100 {
		claims := randomClaims(r, 1+r.IntN(60), 5, round%2 == 0)
		tab := tableOf(5, claims)
		if round%2 == 0 && (tab.len4 == nil || tab.len6 == nil) {
			t.Fatalf("round %d: few lengths but no hashed lookup", round)
		}
		for _, a := range probes(r, claims) {
			want := bruteOwner(claims, a)
			if got := tab.find(a); got != want {
				t.Fatalf("round %d: find(%s) = %d, want %d; claims %v", round, a, got, want, claims)
			}
			if got := tab.search(key(a)); got != want {
				t.Fatalf("round %d: search(%s) = %d, want %d; claims %v", round, a, got, want, claims)
			}
		}
		// The flattened intervals are canonical: strictly increasing starts,
		// no two neighbours with the same owner.
		for i := 1; i < len(tab.starts); i++ {
			if !tab.starts[i-1].less(tab.starts[i]) || tab.owner[i-1] == tab.owner[i] {
				t.Fatalf("round %d: interval %d not canonical", round, i)
			}
		}
	}
}

func TestTableEdges(t *testing.T) {
	tab := tableOf(2, map[netip.Prefix]int32{
		netip.MustParsePrefix("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff00/120"): 0, // ends at the top of the space
		netip.MustParsePrefix("::/127"):                                      1, // starts at the bottom
		netip.MustParsePrefix("10.0.0.0/8"):                                  1,
		netip.MustParsePrefix("10.1.2.3/32"):                                 0,
		netip.MustParsePrefix("10.1.2.0/24"):                                 noOwner, // a hole inside 10/8
		netip.MustParsePrefix("2001:db8::/32"):                               0,
	})
	for _, c := range []struct {
		addr string
		want int32
	}{
		{"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 0},
		{"ffff:ffff:ffff:ffff:ffff:ffff:ffff:feff", noOwner},
		{"::", 1},
		{"::1", 1},
		{"::2", noOwner},
		{"10.0.0.0", 1},
		{"10.1.2.2", noOwner},
		{"10.1.2.3", 0},
		{"10.1.2.4", noOwner},
		{"10.1.3.0", 1},
		{"10.255.255.255", 1},
		{"11.0.0.0", noOwner},
		{"2001:db8::1", 0},
	} {
		if got := tab.find(netip.MustParseAddr(c.addr)); got != c.want {
			t.Errorf("find(%s) = %d, want %d", c.addr, got, c.want)
		}
	}
	// An IPv4-mapped or zoned address never matches the IPv4 entry.
	for _, a := range []string{"::ffff:10.1.2.3", "fe80::1%wg0"} {
		if _, ok := tab.lookup(netip.MustParseAddr(a)); ok {
			t.Errorf("lookup(%s) found an owner", a)
		}
	}
}

func TestAppendRange(t *testing.T) {
	for _, c := range []struct {
		from, to string
		want     []string
	}{
		{"10.0.0.1", "10.0.0.6", []string{"10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/31", "10.0.0.6/32"}},
		{"10.0.0.0", "10.0.0.255", []string{"10.0.0.0/24"}},
		{"2001:db8::", "2001:db8:0:1:ffff:ffff:ffff:ffff", []string{"2001:db8::/63"}},
		{"::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", []string{"::/0"}},
		{"2001:db8::5", "2001:db8::5", []string{"2001:db8::5/128"}},
	} {
		got := appendRange(nil, key(netip.MustParseAddr(c.from)), key(netip.MustParseAddr(c.to)))
		var gs []string
		for _, p := range got {
			gs = append(gs, p.String())
		}
		if diff := cmp.Diff(c.want, gs); diff != "" {
			t.Errorf("appendRange(%s, %s) (-want +got):\n%s", c.from, c.to, diff)
		}
	}
}

// TestDiffLIFE05 checks that the change computation reports exactly the
// address space each owner lost (LIFE-05), against a brute-force reference.
func TestDiffLIFE05(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for round := range 50 {
		oldC := randomClaims(r, 1+r.IntN(40), 4)
		newC := make(map[netip.Prefix]int32)
		for p, o := range oldC { // mutate: drop, reassign, keep
			switch r.IntN(4) {
			case 0:
			case 1:
				newC[p] = int32(r.IntN(4))
			default:
				newC[p] = o
			}
		}
		for p, o := range randomClaims(r, r.IntN(10), 4) {
			newC[p] = o
		}
		nNew := 4
		if round%2 == 0 { // owner 3 disappears from new entirely
			nNew = 3
			maps.DeleteFunc(newC, func(_ netip.Prefix, o int32) bool { return o == 3 })
		}
		oldT, newT := tableOf(4, oldC), tableOf(nNew, newC)
		changes := diff(oldT, newT)
		lost := make(map[OwnerID][]netip.Prefix)
		for _, c := range changes {
			if len(c.Lost) == 0 {
				t.Fatalf("round %d: change without loss: %+v", round, c)
			}
			_, present := newT.byID[c.Owner]
			if c.Removed == present {
				t.Fatalf("round %d: %s Removed=%v but present=%v", round, c.Owner, c.Removed, present)
			}
			lost[c.Owner] = c.Lost
		}
		for _, a := range append(probes(r, oldC), probes(r, newC)...) {
			o, n := oldT.find(a), newT.find(a)
			wantLost := o >= 0 && (n < 0 || newT.owners[n].ID != oldT.owners[o].ID)
			gotLost := false
			if o >= 0 {
				gotLost = slices.ContainsFunc(lost[oldT.owners[o].ID], func(p netip.Prefix) bool { return p.Contains(a) })
			}
			if gotLost != wantLost {
				t.Fatalf("round %d: %s old owner %d new owner %d: reported lost %v, want %v", round, a, o, n, gotLost, wantLost)
			}
		}
	}
}
