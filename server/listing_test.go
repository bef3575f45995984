package server

import (
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/store"
)

// list runs ListLeases into a slice of copies.
func list(t *testing.T, s *Server, each func(i int)) ([]store.Lease, error) {
	t.Helper()
	var out []store.Lease
	n := -1
	err := s.ListLeases(func(c int) error { n = c; return nil }, func(l *store.Lease) error {
		if each != nil {
			each(len(out))
		}
		out = append(out, *l)
		return nil
	})
	if err == nil && n != len(out) {
		t.Fatalf("count %d, %d leases given", n, len(out))
	}
	return out, err
}

// putAll puts leases straight into the table (shapes no request makes:
// zones, odd owners), as restore would.
func putAll(s *Server, ls []store.Lease) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, l := range ls {
		s.tab.put(l)
	}
}

// ListLeases gives what Leases gives, in the same order, for every kind of
// lease and key ordering case.
func TestListLeasesMatchesLeases(t *testing.T) {
	h := newHarness(t)
	now := h.clock.Now()
	base := func(owner string, in netip.Addr, proto uint8, port uint16) store.Lease {
		return store.Lease{Key: store.Key{Owner: owner, InternalAddr: in, Protocol: proto, InternalPort: port},
			ExternalAddr: in, ExternalPort: port, Kind: store.KindMap, Created: now, Expires: now.Add(time.Hour)}
	}
	zoned := base("z", netip.MustParseAddr("fe80::1%eth1"), 6, 80)
	zoned2 := base("z", netip.MustParseAddr("fe80::1%eth0"), 6, 80)
	plain := base("z", netip.MustParseAddr("fe80::1"), 6, 80)
	peer := base("a", addrA, 6, 443)
	peer.Kind, peer.Remote = store.KindPeer, remote
	peer2 := peer
	peer2.Remote = netip.AddrPortFrom(remote.Addr(), remote.Port()-1)
	filtered := base("a", addrA, 6, 443)
	filtered.Filters = []store.Filter{{Prefix: netip.MustParsePrefix("2001:db8::/32"), Port: 1}}
	filtered.Description = "printer"
	expired := base("b", addrB, 17, 53)
	expired.Expires = now
	tests := []struct {
		name   string
		leases []store.Lease
	}{
		{"empty", nil},
		{"owners, families, protocols, ports", []store.Lease{
			base("b", v4B, 6, 22), base("a", addrA2, 17, 1), base("a", v4A, 6, 22), base("a", addrA, 17, 1),
			base("a", addrA, 6, 2), base("a", addrA, 6, 1), base("B", addrA, 6, 1), base("", v4A2, 6, 1)}},
		{"remotes and zones", []store.Lease{peer, filtered, peer2, zoned, plain, zoned2}},
		{"expired left out", []store.Lease{expired, base("b", addrB, 17, 54)}},
		{"many owners, many chunks", func() []store.Lease {
			var ls []store.Lease
			for i := range 3*listChunk + 5 {
				a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0x0a, 14: byte(i >> 8), 15: byte(i)})
				ls = append(ls, base(fmt.Sprintf("o%03d", i%97), a, 6, uint16(i%7)))
			}
			return ls
		}()},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h.s.mu.Lock()
			h.s.tab = newTable()
			h.s.mu.Unlock()
			putAll(h.s, tc.leases)
			want := h.s.Leases()
			got, err := list(t, h.s, nil)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(want) || (len(want) > 0 && !reflect.DeepEqual(got, want)) {
				t.Fatalf("ListLeases\n%v\nLeases\n%v", got, want)
			}
			checkTable(t, h.s.tab)
		})
	}
}

// A listing sees the leases of the moment it began, whatever the engine
// does meanwhile; the slots it held back are freed after it; a listing
// read so slowly that the table would grow without end is cut off.
func TestListLeasesSnapshot(t *testing.T) {
	h := newHarness(t)
	now := h.clock.Now()
	var ls []store.Lease
	for i := range 2*listChunk + 1 {
		a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0x0a, 14: byte(i >> 8), 15: byte(i)})
		ls = append(ls, store.Lease{Key: store.Key{Owner: fmt.Sprint("o", i%5), InternalAddr: a, Protocol: 6, InternalPort: 1},
			ExternalAddr: a, ExternalPort: 1, Kind: store.KindMap, Created: now, Expires: now.Add(time.Hour),
			Description: fmt.Sprint("d", i)})
	}
	t.Run("changes during the listing are not seen", func(t *testing.T) {
		putAll(h.s, ls)
		want := h.s.Leases()
		got, err := list(t, h.s, func(i int) {
			if i != 0 {
				return
			}
			// The engine renews half the leases, revokes the rest (every
			// lease of owner o4, listed in a later chunk, among them) and
			// maps new ones for new owners, which would take o4's number
			// were it not held.
			churn(t, h, ls, func(j int) bool { return j%2 == 0 && j%5 != 4 })
		})
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatal("the listing saw changes made after it began")
		}
		if len(h.s.tab.pend) != 0 || h.s.tab.pins != 0 {
			t.Fatalf("after the listing: %d slots held back, %d pins", len(h.s.tab.pend), h.s.tab.pins)
		}
		checkTable(t, h.s.tab)
		kept := 0
		for j := range ls {
			if j%2 == 0 && j%5 != 4 {
				kept++
			}
		}
		if n := h.s.tab.len(); n != kept+10 {
			t.Fatalf("%d leases after the changes, want %d", n, kept+10)
		}
		if _, ok := h.s.tab.byOwner["o4"]; ok {
			t.Fatal("owner o4 still counted")
		}
	})
	t.Run("a reader too slow is cut off", func(t *testing.T) {
		putAll(h.s, ls) // more than one chunk
		l := ls[0]
		_, err := list(t, h.s, func(i int) {
			if i != 0 {
				return
			}
			h.s.mu.Lock()
			defer h.s.mu.Unlock()
			for range pinMax + 1 {
				l.Expires = l.Expires.Add(time.Second)
				h.s.tab.put(l) // each renewal holds back a slot
			}
		})
		if err == nil || !strings.Contains(err.Error(), "too slowly") {
			t.Fatalf("err %v", err)
		}
		if len(h.s.tab.pend) != 0 || h.s.tab.pins != 0 {
			t.Fatalf("%d slots held back, %d pins", len(h.s.tab.pend), h.s.tab.pins)
		}
		checkTable(t, h.s.tab)
	})
}

// churn is the engine changing the table while a listing runs (s.mu
// taken): it renews the leases of ls that renew picks (an hour more,
// "renewed"), ends the others and maps 10 new ones for new owners.
func churn(t *testing.T, h *harness, ls []store.Lease, renew func(j int) bool) {
	t.Helper()
	h.s.mu.Lock()
	defer h.s.mu.Unlock()
	for j, l := range ls {
		if renew(j) {
			l.Expires = l.Expires.Add(time.Hour)
			l.Description = "renewed"
			h.s.tab.put(l)
		} else {
			h.s.tab.del(l.Key)
		}
	}
	for j := range 10 {
		l := ls[j]
		l.Owner, l.InternalPort = fmt.Sprint("new", j), 2
		h.s.tab.put(l)
	}
	checkTable(t, h.s.tab)
}

// BenchmarkListing compares a listing through ListLeases with one through
// Leases (the copy and sort), for 100 000 bench-shaped leases.
func BenchmarkListing(b *testing.B) {
	const n = 100_000
	s := &Server{tab: newTable(), now: time.Now}
	gen := benchLeases(n, 4096)
	for i := range n {
		l := gen(i)
		l.Expires = time.Now().Add(time.Hour)
		s.tab.put(l)
	}
	b.Run("ListLeases", func(b *testing.B) {
		for b.Loop() {
			k := 0
			if err := s.ListLeases(func(int) error { return nil }, func(*store.Lease) error { k++; return nil }); err != nil || k != n {
				b.Fatal(k, err)
			}
		}
	})
	b.Run("Leases", func(b *testing.B) {
		for b.Loop() {
			if k := len(s.Leases()); k != n {
				b.Fatal(k)
			}
		}
	})
}
