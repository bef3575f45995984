package pinhole_test

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// overlapPairs are pairs of one address's pinholes and whether the
// kernel refuses them in some insertion order (pinhole.Conflicts).
func overlapPairs() []struct {
	name string
	p, q pinhole.Pinhole
	want bool
} {
	x := netip.MustParseAddr("2001:db8:a::10")
	x4, e4 := netip.MustParseAddr("10.0.0.2"), netip.MustParseAddr("198.51.100.1")
	pf := netip.MustParsePrefix
	wide, first, last, mid := pf("2001:db8:5::/48"), pf("2001:db8:5::/64"), pf("2001:db8:5:ffff::/64"), pf("2001:db8:5:1::/64")
	r4 := func(s string) netip.Prefix { return pf(s) }
	f := func(port uint16, rp netip.Prefix, rport uint16) pinhole.Pinhole {
		return pinhole.Pinhole{Protocol: 6, InternalAddr: x, InternalPort: port, RemotePrefix: rp, RemotePort: rport}
	}
	n4 := func(port uint16, rp netip.Prefix, rport uint16) pinhole.Pinhole {
		return pinhole.Pinhole{Protocol: 6, InternalAddr: x4, InternalPort: 80, ExternalAddr: e4, ExternalPort: port, RemotePrefix: rp, RemotePort: rport}
	}
	peer := pf("2001:db8:5::/128")
	return []struct {
		name string
		p, q pinhole.Pinhole
		want bool
	}{
		{"PEER at the FILTER's first address", f(443, peer, 4000), f(443, wide, 0), true},
		{"PEER at the FILTER's last address", f(443, pf("2001:db8:5:ffff:ffff:ffff:ffff:ffff/128"), 4000), f(443, wide, 0), true},
		{"PEER inside the FILTER, not at an end", f(443, pf("2001:db8:5:1::1/128"), 4000), f(443, wide, 0), true},
		{"PEER at the FILTER's first address, other remote port", f(443, peer, 4000), f(443, wide, 80), false},
		{"narrower any port at the start, wider one port", f(443, first, 0), f(443, wide, 80), true},
		{"narrower any port at the end, wider one port", f(443, last, 0), f(443, wide, 80), true},
		{"narrower any port inside, wider one port", f(443, mid, 0), f(443, wide, 80), false},
		{"nested, same remote port", f(443, first, 0), f(443, wide, 0), true},
		{"other internal port", f(443, first, 0), f(80, wide, 80), false},
		{"all ports over one port", f(443, first, 80), f(0, wide, 0), true},
		{"all ports, disjoint remotes", f(443, first, 80), f(0, pf("2001:db8:6::/48"), 0), false},
		{"same element", f(443, wide, 0), f(443, wide, 0), false},
		{"unfiltered", f(443, netip.Prefix{}, 0), f(443, wide, 0), false},
		{"IPv4 PEER at the FILTER's first address", n4(1024, r4("203.0.113.0/32"), 4000), n4(1024, r4("203.0.113.0/24"), 0), true},
		{"IPv4 disjoint", n4(1024, r4("203.0.113.0/32"), 4000), n4(1024, r4("192.0.2.0/24"), 0), false},
	}
}

// TestConflictsRows: the pairs' verdicts, either argument first.
func TestConflictsRows(t *testing.T) {
	for _, tc := range overlapPairs() {
		p, q := canonical(t, tc.p), canonical(t, tc.q)
		if got := pinhole.Conflicts(p, q); got != tc.want {
			t.Errorf("%s: Conflicts(p, q) = %v, want %v", tc.name, got, tc.want)
		}
		if got := pinhole.Conflicts(q, p); got != tc.want {
			t.Errorf("%s: Conflicts(q, p) = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// TestConflictsAsKernel: Conflicts is the kernel's answer. Each pair is
// installed in both orders, each in a transaction of its own on a fresh
// set: a pair that conflicts is refused (ErrConflict) in at least one
// order; one that does not is taken in both.
func TestConflictsAsKernel(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "ovlap")
	b := newBackend(t, ns, pinhole.Config{})
	for _, tc := range overlapPairs() {
		p, q := canonical(t, tc.p), canonical(t, tc.q)
		refused := false
		for _, order := range [][2]pinhole.Pinhole{{p, q}, {q, p}} {
			for _, x := range order {
				err := b.Apply([]pinhole.Op{{Kind: pinhole.Install, Pinhole: x, Timeout: time.Minute}})
				if errors.Is(err, pinhole.ErrConflict) {
					refused = true
				} else if err != nil {
					t.Fatalf("%s: install %v: %v", tc.name, x, err)
				}
			}
			for _, x := range order {
				b.Apply([]pinhole.Op{{Kind: pinhole.Delete, Pinhole: x}})
			}
			if es, err := b.List(); err != nil || len(es) != 0 {
				t.Fatalf("%s: after the deletes the kernel holds %v (%v)", tc.name, es, err)
			}
		}
		if refused != tc.want {
			t.Errorf("%s: kernel refused one order: %v; Conflicts says %v", tc.name, refused, tc.want)
		}
	}
}

func canonical(t *testing.T, p pinhole.Pinhole) pinhole.Pinhole {
	t.Helper()
	c, err := p.Canonical()
	if err != nil {
		t.Fatal(err)
	}
	return c
}
