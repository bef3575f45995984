package server

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// scratchStream is State.Stream as the store does it (store.WithLeasesLater):
// each lease of ls copied into one scratch lease, its FILTERs into one
// reused buffer, both overwritten once fn returns, so that whatever
// restore kept of the pointer it got shows up as damage. failAt > 0: the
// failAt-th lease handed out (over all calls) fails with errRead instead.
func scratchStream(ls []store.Lease, failAt int) func(func(*store.Lease) error) error {
	var scratch store.Lease
	var fbuf []store.Filter
	calls := 0
	return func(fn func(*store.Lease) error) error {
		for i := range ls {
			if calls++; calls == failAt {
				return errRead
			}
			scratch = ls[i]
			fbuf = append(fbuf[:0], ls[i].Filters...)
			scratch.Filters = fbuf
			err := fn(&scratch)
			for j := range fbuf {
				fbuf[j] = store.Filter{Prefix: netip.MustParsePrefix("::/0"), Port: 9}
			}
			scratch = store.Lease{Description: "overwritten", Expires: time.Unix(1, 0)}
			if err != nil {
				return err
			}
		}
		return nil
	}
}

var errRead = errors.New("stored lease unreadable")

// streamStartLeases are stored leases of every fate at a restart (the
// harness's clock, --deny-ports 22): kept (IPv6 MAP with FILTER and
// description, IPv4 NAPT MAP with a FILTER, PEER), expired (IPv6, and
// IPv4 whose port is then quarantined), moved (external IPv4 no longer
// ours) and refused (port 22 denied).
func streamStartLeases(now time.Time) []store.Lease {
	live, past := now.Add(time.Hour), now.Add(-time.Minute)
	l := func(in, ext netip.Addr, port uint16, kind store.Kind, exp time.Time) store.Lease {
		return store.Lease{Key: store.Key{Owner: ownerA, InternalAddr: in, InternalPort: port, Protocol: 6},
			ExternalAddr: ext, ExternalPort: port, Kind: kind, Created: now.Add(-time.Minute), Expires: exp,
			ClientAddr: netip.AddrPortFrom(in, 5350), ServerAddr: local6, Nonce: [12]byte{byte(port)}}
	}
	kept6 := l(addrA, addrA, 443, store.KindMap, live)
	kept6.Filters = []store.Filter{{Prefix: netip.MustParsePrefix("2001:db8:99::/48")}, {Prefix: netip.MustParsePrefix("2001:db8:98::1/128"), Port: 7}}
	kept6.Description = "web"
	kept4 := l(v4A, ext4, 40000, store.KindMap, live)
	kept4.ServerAddr = local4
	kept4.Filters = []store.Filter{{Prefix: netip.MustParsePrefix("192.0.2.0/24")}}
	peer := l(addrA, addrA, 8443, store.KindPeer, live)
	peer.Remote = remote
	exp4 := l(v4A2, ext4, 40001, store.KindMap, past)
	exp4.ServerAddr = local4
	moved := l(v4A, netip.MustParseAddr("198.51.100.9"), 40002, store.KindNATPMP, live)
	moved.ServerAddr = local4
	refused := l(v4A2, ext4, 22, store.KindMap, live)
	refused.ServerAddr = local4
	return []store.Lease{kept6, kept4, peer, l(addrA, addrA, 80, store.KindMap, past), exp4, moved, refused}
}

// restartedWith restarts a harness holding streamStartLeases, its stored
// leases handed to Start by how (nil: in State.Leases).
func restartedWith(t *testing.T, how func([]store.Lease) func(func(*store.Lease) error) error) *harness {
	t.Helper()
	h := newHarness(t, func(_ *Config, p *policy.Config) {
		p.DenyPorts = []policy.PortRange{{First: 22, Last: 22}}
	})
	if err := h.st.Commit(streamStartLeases(h.clock.Now()), nil); err != nil {
		t.Fatal(err)
	}
	h.startWith(func(d *Deps) {
		if how != nil {
			d.State.Stream = how(d.State.Leases)
			d.State.Leases = nil
		}
	}, nil)
	return h
}

// TestRestoreFromStream: a restart fed by State.Stream (store.WithLeasesLater:
// the stored leases read one at a time, never all decoded beside the
// table) ends exactly as one fed State.Leases: the same table, store,
// MAP-22 quarantines and kernel pinholes, with what is kept, dropped,
// refused and quarantined as each lease's fate says. The scratch lease
// and FILTERs are overwritten after each, so a table entry sharing them
// would differ. Before State.Stream existed, such a start restored nothing.
func TestRestoreFromStream(t *testing.T) {
	slice := restartedWith(t, nil)
	stream := restartedWith(t, func(ls []store.Lease) func(func(*store.Lease) error) error { return scratchStream(ls, 0) })

	if got := len(slice.s.Leases()); got != 3 {
		t.Fatalf("restored from State.Leases: %d leases, want 3 (kept6, kept4, peer): %v", got, slice.s.Leases())
	}
	if got := len(slice.st.Leases()); got != 3 {
		t.Fatalf("%d leases stored after the restart, want the 3 kept", got)
	}
	if !quarPorts(slice.s)[40001] { // 22 is denied: never handed out, so not quarantined
		t.Fatalf("port 40001 (expired while down) not quarantined: %v", quarPorts(slice.s))
	}
	sameRestart(t, slice, stream, "(-State.Leases +State.Stream)")
}

// restartPart is one part of a restarted server's state, as two restarts
// compare it.
type restartPart struct {
	what string
	a, b any
}

// sameRestart fails t for each part of a's and b's restarted state that
// differs: the table, the store, the stored and the live MAP-22
// quarantines, the kernel's pinholes, then any extra parts.
func sameRestart(t *testing.T, a, b *harness, legend string, extra ...restartPart) {
	t.Helper()
	parts := append([]restartPart{
		{"table", a.s.Leases(), b.s.Leases()},
		{"store", a.st.Leases(), b.st.Leases()},
		{"stored quarantines", a.st.Quarantines(), b.st.Quarantines()},
		{"quarantined ports", quarPorts(a.s), quarPorts(b.s)},
		{"pinholes", a.fw.Holes(), b.fw.Holes()},
	}, extra...)
	for _, p := range parts {
		if d := cmp.Diff(p.a, p.b, cmp.Comparer(func(x, y netip.Addr) bool { return x == y }),
			cmp.Comparer(func(x, y netip.Prefix) bool { return x == y }), cmp.Comparer(func(x, y netip.AddrPort) bool { return x == y })); d != "" {
			t.Errorf("%s differs %s:\n%s", p.what, legend, d)
		}
	}
}

// TestRestoreStreamFails: a stored lease that can not be read (the
// stream's error, in the sizing pass or the adding one) fails Start with
// it, and the store keeps every stored lease: nothing is dropped on a
// partial read.
func TestRestoreStreamFails(t *testing.T) {
	n := len(streamStartLeases(time.Time{}))
	for _, failAt := range []int{1, n, n + 1, 2 * n} { // first and last of each pass
		h := newHarness(t, func(_ *Config, p *policy.Config) {
			p.DenyPorts = []policy.PortRange{{First: 22, Last: 22}}
		})
		if err := h.st.Commit(streamStartLeases(h.clock.Now()), nil); err != nil {
			t.Fatal(err)
		}
		d := Deps{Firewall: h.fw, Store: h.st, State: h.st.State(), Policy: h.s.pol, Now: h.clock.Now}
		d.State.Stream = scratchStream(d.State.Leases, failAt)
		d.State.Leases = nil
		s, err := New(h.cfg, d, h.s.log)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Start(); !errors.Is(err, errRead) {
			t.Fatalf("failing at lease %d: Start = %v, want the read error", failAt, err)
		}
		if got := len(h.st.Leases()); got != n {
			t.Fatalf("failing at lease %d: %d leases left in the store, want all %d", failAt, got, n)
		}
	}
}
