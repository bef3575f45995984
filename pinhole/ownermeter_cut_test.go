package pinhole

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"
)

// spansOf reads "first-last=chain" (or "prefix=chain"), space separated,
// into spans; spansString writes spans so.
func spansOf(t *testing.T, s string) []ownedSpan {
	t.Helper()
	var out []ownedSpan
	for _, f := range strings.Fields(s) {
		r, chain, _ := strings.Cut(f, "=")
		if p, err := netip.ParsePrefix(r); err == nil {
			first, last := prefixRange(p)
			out = append(out, ownedSpan{first, last, chain})
			continue
		}
		a, b, _ := strings.Cut(r, "-")
		out = append(out, ownedSpan{netip.MustParseAddr(a), netip.MustParseAddr(b), chain})
	}
	return out
}

func spansString(spans []ownedSpan) string {
	var got []string
	for _, s := range spans {
		got = append(got, fmt.Sprintf("%s-%s=%s", s.first, s.last, s.chain))
	}
	return strings.Join(got, " ")
}

// TestCutSpans: the range subtraction behind Meter.Unowned (cutSpans):
// cuts at a span's start, end and middle, a cut equal to or covering a
// span, spans inside a cut, several, overlapping, nested and adjacent
// cuts, /32 and /128 cuts and spans, the ends of the address space.
func TestCutSpans(t *testing.T) {
	for _, c := range []struct {
		name, spans, cuts, want string
	}{
		{"no cuts", "10.0.0.0/24=a", "", "10.0.0.0-10.0.0.255=a"},
		{"no spans", "", "10.0.0.0/24=", ""},
		{"cut elsewhere", "10.0.0.0/24=a", "10.0.1.0/24= 9.0.0.0/8=", "10.0.0.0-10.0.0.255=a"},
		{"cut at the start", "10.0.0.0/24=a", "10.0.0.0/26=", "10.0.0.64-10.0.0.255=a"},
		{"cut at the end", "10.0.0.0/24=a", "10.0.0.192/26=", "10.0.0.0-10.0.0.191=a"},
		{"cut in the middle", "10.0.0.0/24=a", "10.0.0.64/26=", "10.0.0.0-10.0.0.63=a 10.0.0.128-10.0.0.255=a"},
		{"cut is the span", "10.0.0.0/24=a", "10.0.0.0/24=", ""},
		{"cut covers the span", "10.0.0.0/24=a", "10.0.0.0/16=", ""},
		{"span inside the cut, beside others", "10.0.0.0/24=a 10.0.5.0/24=b 10.1.0.0/24=c", "10.0.0.0/16=",
			"10.1.0.0-10.1.0.255=c"},
		{"one cut across two spans", "10.0.0.0/24=a 10.0.1.0/24=b", "10.0.0.128-10.0.1.127=",
			"10.0.0.0-10.0.0.127=a 10.0.1.128-10.0.1.255=b"},
		{"several cuts in one span, unsorted", "10.0.0.0/24=a", "10.0.0.200/29= 10.0.0.16/28= 10.0.0.100/32=",
			"10.0.0.0-10.0.0.15=a 10.0.0.32-10.0.0.99=a 10.0.0.101-10.0.0.199=a 10.0.0.208-10.0.0.255=a"},
		{"overlapping and nested cuts", "10.0.0.0/24=a", "10.0.0.0/25= 10.0.0.64/26= 10.0.0.96-10.0.0.140=",
			"10.0.0.141-10.0.0.255=a"},
		{"adjacent cuts", "10.0.0.0/24=a", "10.0.0.64/27= 10.0.0.96/27=", "10.0.0.0-10.0.0.63=a 10.0.0.128-10.0.0.255=a"},
		{"/32 cuts at both ends", "10.0.0.0/24=a", "10.0.0.255/32= 10.0.0.0/32=", "10.0.0.1-10.0.0.254=a"},
		{"/32 span cut", "10.0.0.7/32=a 10.0.0.8/32=b", "10.0.0.8/32=", "10.0.0.7-10.0.0.7=a"},
		{"a hole's span (no chain) is cut alike", "10.0.0.0/24=", "10.0.0.0/25=", "10.0.0.128-10.0.0.255="},
		{"whole address space", "0.0.0.0/0=a", "255.255.255.255/32= 0.0.0.0/32=", "0.0.0.1-255.255.255.254=a"},
		{"cut to the top across spans", "10.0.0.0/8=a 200.0.0.0/8=b", "128.0.0.0/1=", "10.0.0.0-10.255.255.255=a"},
		{"IPv6 /128 in a /64", "2001:db8::/64=a", "2001:db8::5/128=",
			"2001:db8::-2001:db8::4=a 2001:db8::6-2001:db8::ffff:ffff:ffff:ffff=a"},
		{"IPv6 /128 span inside a cut", "64:ff9b::c633:6402/128=a 64:ff9b::1:0:0/128=b", "64:ff9b::/96=",
			"64:ff9b::1:0:0-64:ff9b::1:0:0=b"},
		{"IPv6 ::/0 less the translation prefixes", "::/0=a", "64:ff9b::/96= 64:ff9b:1::/48= ::/96=",
			"::1:0:0-64:ff9a:ffff:ffff:ffff:ffff:ffff:ffff=a 64:ff9b::1:0:0-64:ff9b:0:ffff:ffff:ffff:ffff:ffff=a 64:ff9b:2::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff=a"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if g := spansString(cutSpans(spansOf(t, c.spans), spansOf(t, c.cuts))); g != c.want {
				t.Errorf("cutSpans(%s, less %s)\ngot  %s\nwant %s", c.spans, c.cuts, g, c.want)
			}
		})
	}
}

// TestCutSpansModel: over random nested prefixes, holes and cuts inside
// 10.0.0.0/24, every address maps (the owner map's ranges,
// ownerMapSpans) to the owner of the longest prefix holding it, nobody in
// a hole, and nobody in a cut however long the owner's prefix.
func TestCutSpansModel(t *testing.T) {
	rnd := rand.New(rand.NewPCG(9, 64))
	base := netip.MustParseAddr("10.0.0.0").As4()
	pfx := func() netip.Prefix {
		bits := 24 + rnd.IntN(9)
		a := base
		a[3] = byte(rnd.IntN(256))
		return netip.PrefixFrom(netip.AddrFrom4(a), bits).Masked()
	}
	for round := range 2000 {
		var owners []Owner
		for i := range 1 + rnd.IntN(4) {
			o := Owner{ID: fmt.Sprint("o", i)}
			for range 1 + rnd.IntN(3) {
				o.Prefixes = append(o.Prefixes, pfx())
			}
			owners = append(owners, o)
		}
		var holes, cuts []netip.Prefix
		for range rnd.IntN(3) {
			holes = append(holes, pfx())
		}
		for range rnd.IntN(4) {
			cuts = append(cuts, pfx())
		}
		_, v4, err := ownerMapSpans(owners, holes, cuts)
		if err != nil {
			t.Fatal(err)
		}
		chains := OwnerChains(owners)
		for x := range 256 {
			a := base
			a[3] = byte(x)
			addr := netip.AddrFrom4(a)
			// The model: longest match (holes last win ties), then cuts.
			want, best := "", -1
			for _, o := range owners {
				for _, p := range o.Prefixes {
					if p.Contains(addr) && p.Bits() >= best {
						want, best = chains[o.ID], p.Bits()
					}
				}
			}
			for _, h := range holes {
				if h.Contains(addr) && h.Bits() >= best {
					want, best = "", h.Bits()
				}
			}
			for _, c := range cuts {
				if c.Contains(addr) {
					want = ""
				}
			}
			got := ""
			for _, s := range v4 {
				if s.first.Compare(addr) <= 0 && addr.Compare(s.last) <= 0 {
					got = s.chain
				}
			}
			if got != want {
				t.Fatalf("round %d: %v maps to %q, want %q\nowners %v holes %v cuts %v\nspans %s", round, addr, got, want, owners, holes, cuts, spansString(v4))
			}
		}
		for i := 1; i < len(v4); i++ {
			if v4[i-1].last.Compare(v4[i].first) >= 0 {
				t.Fatalf("round %d: spans overlap or out of order: %s", round, spansString(v4))
			}
		}
	}
}

// TestOwnerElementsUnowned (issue 9, review h/revp64 finding 3): the owner
// maps' elements leave the Meter.Unowned prefixes (pcpd: the translation
// prefixes and --nat64-prefix) out of every owner's range, an enclosing
// one's (a WireGuard peer with ::/0, a client given 64:ff9b::/64, an NSP
// inside a client's /48) and a more specific one's (a /128 inside
// 64:ff9b::/96) alike, so a translated source misses the map and is
// charged to the unowned bucket, as the policy makes it nobody's.
func TestOwnerElementsUnowned(t *testing.T) {
	pfx := netip.MustParsePrefix
	xlat := []netip.Prefix{pfx("64:ff9b::/96"), pfx("64:ff9b:1::/48"), pfx("::/96")}
	nsp := pfx("2001:db8:77:64::/96") // --nat64-prefix, inside c's /48
	owners := []Owner{
		{ID: "wg:a", Prefixes: []netip.Prefix{pfx("::/0")}},
		{ID: "wg:b", Prefixes: []netip.Prefix{pfx("64:ff9b::/64"), pfx("64:ff9b::c633:6402/128")}},
		{ID: "static:c", Prefixes: []netip.Prefix{pfx("2001:db8:77::/48"), pfx("10.77.0.0/16")}},
	}
	chains := OwnerChains(owners)
	name := map[string]string{}
	for id, c := range chains {
		name[c] = strings.TrimPrefix(strings.TrimPrefix(id, "wg:"), "static:")
	}
	v6, v4, err := ownerMapSpans(owners, nil, append(xlat, nsp))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range append(ownerElements(v6), ownerElements(v4)...) {
		k, _ := netip.AddrFromSlice(e.Key)
		if e.IntervalEnd {
			got = append(got, k.String()+"=end")
		} else {
			got = append(got, k.String()+"="+name[e.VerdictData.Chain])
		}
	}
	// (Adjacent ranges of two owners share a key, as an end and a start.)
	want := strings.Join([]string{
		"::1:0:0=a", // ::/96 is out
		"64:ff9b::=end",
		"64:ff9b::1:0:0=b", // b's /64 less 64:ff9b::/96, and its /128 inside it gone
		"64:ff9b:0:1::=end", "64:ff9b:0:1::=a",
		"64:ff9b:1::=end", // 64:ff9b:1::/48 out
		"64:ff9b:2::=a",
		"2001:db8:77::=end", "2001:db8:77::=c",
		"2001:db8:77:64::=end", // the NSP out of c's /48
		"2001:db8:77:64:0:1::=c",
		"2001:db8:78::=end", "2001:db8:78::=a",
		"10.77.0.0=c",
		"10.78.0.0=end",
	}, " ")
	if g := strings.Join(got, " "); g != want {
		t.Errorf("owner map elements\ngot  %s\nwant %s", g, want)
	}
}
