package store

import (
	"net/netip"
	"sort"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
)

// cmpOpts compares the netip types by value (they have unexported fields
// and no Equal method); time.Time goes through its Equal method.
var cmpOpts = cmp.Options{
	cmp.Comparer(func(a, b netip.Addr) bool { return a == b }),
	cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b }),
	cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }),
}

var t0 = time.Date(2026, 11, 23, 9, 0, 0, 0, time.UTC)

// fullLease sets every field to something non-zero and distinct.
func fullLease() Lease {
	return Lease{
		Key: Key{
			Owner:        "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
			Protocol:     6,
			InternalAddr: netip.MustParseAddr("2001:db8:1:2::10"),
			InternalPort: 443,
			Remote:       netip.MustParseAddrPort("[2001:db8:99::7]:5000"),
		},
		Kind:          KindPeer,
		Nonce:         [12]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12},
		ExternalAddr:  netip.MustParseAddr("2001:db8:1:2::11"),
		ExternalPort:  80,
		Filters:       []Filter{{netip.MustParsePrefix("2001:db8:99::/48"), 0}, {netip.MustParsePrefix("2001:db8:98::1/128"), 22}},
		ClientAddr:    netip.MustParseAddrPort("[2001:db8:1:2::10]:40000"),
		ServerAddr:    netip.MustParseAddrPort("[fe80::1%wg0]:5351"),
		Created:       t0,
		Expires:       t0.Add(time.Hour + 123*time.Nanosecond),
		Description:   "nextcloud — https",
		ThirdParty:    true,
		PreferFailure: true,
	}
}

// lease n: a small MAP lease with a distinct key, as the engine writes them.
func leaseN(n int) Lease {
	a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, byte(n >> 24), byte(n >> 16), 0, 0, 0, 0, 0, 0, byte(n >> 8), byte(n)})
	return Lease{
		Key:          Key{Owner: "peer" + string(rune('A'+n%16)), Protocol: 6, InternalAddr: a, InternalPort: uint16(1024 + n%50000)},
		Kind:         KindMap,
		Nonce:        [12]byte{byte(n), byte(n >> 8), byte(n >> 16)},
		ExternalAddr: a,
		ExternalPort: uint16(1024 + n%50000),
		ClientAddr:   netip.AddrPortFrom(a, 5350),
		ServerAddr:   netip.MustParseAddrPort("[2001:db8:1::1]:5351"),
		Created:      t0,
		Expires:      t0.Add(time.Duration(n%3600+120) * time.Second),
	}
}

func leasesN(from, to int) []Lease {
	ls := make([]Lease, 0, to-from)
	for i := from; i < to; i++ {
		ls = append(ls, leaseN(i))
	}
	return ls
}

func keyLess(a, b *Key) bool { return string(appendKey(nil, a)) < string(appendKey(nil, b)) }

func sortLeases(ls []Lease) []Lease {
	out := append([]Lease(nil), ls...)
	sort.Slice(out, func(i, j int) bool { return keyLess(&out[i].Key, &out[j].Key) })
	return out
}

// wantLeases fails unless got holds exactly want (any order).
func wantLeases(t *testing.T, got, want []Lease) {
	t.Helper()
	if d := cmp.Diff(sortLeases(want), sortLeases(got), cmpOpts); d != "" {
		t.Fatalf("leases differ (-want +got), %d want, %d got:\n%.3000s", len(want), len(got), d)
	}
}

func testLog(t *testing.T) *zap.Logger { return zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)) }

// openT opens dir and registers Close.
func openT(t *testing.T, dir string, opts ...Option) (*Store, State) {
	t.Helper()
	s, st, err := Open(dir, testLog(t), opts...)
	if err != nil {
		t.Fatalf("Open(%s): %v", dir, err)
	}
	t.Cleanup(func() { s.Close() })
	return s, st
}

// reopen closes s and opens its directory again.
func reopen(t *testing.T, s *Store, opts ...Option) (*Store, State) {
	t.Helper()
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	return openT(t, s.Dir(), opts...)
}

func fixedClock(t time.Time) Option { return WithClock(func() time.Time { return t }) }

func cmpLease(a, b Lease) string { return cmp.Diff(a, b, cmpOpts) }
