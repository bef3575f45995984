package pinhole

import (
	"testing"

	"github.com/google/nftables"
)

// BenchmarkDecode: List's and the watcher's reading of one element, per
// shape pcpd writes (h/redir6 added a check that it encodes back to the
// very element: BENCHMARKS.md item 65).
func BenchmarkDecode(b *testing.B) {
	c := addr("2001:db8:1:2::10")
	for _, tc := range []struct {
		name string
		p    Pinhole
	}{
		{"pin6", Pinhole{Protocol: 6, InternalAddr: c, InternalPort: 443}},
		{"pin6_filter", Pinhole{Protocol: 6, InternalAddr: c, InternalPort: 443, RemotePrefix: pfx("2001:db8:ffff::/48")}},
		{"napt4_filter", Pinhole{Protocol: 6, InternalAddr: addr("10.100.0.2"), InternalPort: 80, ExternalAddr: addr("198.51.100.1"), ExternalPort: 8080, RemotePrefix: pfx("198.51.100.0/24")}},
	} {
		p, err := tc.p.normalize()
		if err != nil {
			b.Fatal(err)
		}
		k := kindOf(p)
		e := element(k, p)
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := decode(k, nftables.SetElement{Key: e.Key, KeyEnd: e.KeyEnd, Val: e.Val}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
