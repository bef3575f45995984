package server

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/server/servertest"
	"github.com/pcpd/pcpd/store"
)

// TestRestoreFromStoredLeases starts the engine on stored leases and checks
// what restore promises: every live lease in the table and its pinholes in
// the kernel with its remaining lifetime (a pinhole two leases share with
// the later expiry, whichever order they are stored in), expired and moved
// leases out of the table, the store and the kernel, and a lease the
// kernel refuses dropped alone.
func TestRestoreFromStoredLeases(t *testing.T) {
	t0 := time.Date(2026, 11, 23, 9, 0, 0, 0, time.UTC)
	now := func() time.Time { return t0 }
	mapL := func(in netip.Addr, port uint16, ext netip.Addr, left time.Duration) store.Lease {
		return store.Lease{
			Key:          store.Key{Owner: ownerA, Protocol: 6, InternalAddr: in, InternalPort: port},
			ExternalAddr: ext, ExternalPort: port, Kind: store.KindMap,
			Created: t0.Add(-time.Minute), Expires: t0.Add(left),
		}
	}
	// A PEER to remote and a MAP filtered to remote/128:port on one tuple
	// share one pinhole.
	filtered := mapL(addrA, 443, addrA, 2*time.Hour)
	filtered.Filters = []store.Filter{{Prefix: netip.PrefixFrom(remote.Addr(), 128), Port: remote.Port()}}
	peer := mapL(addrA, 443, addrA, time.Hour)
	peer.Kind, peer.Remote = store.KindPeer, remote
	shared := pinholesOf(&peer)[0]
	renewed := mapL(addrA2, 80, addrA2, 3*time.Hour)
	stale := renewed
	stale.Expires = t0.Add(time.Hour)
	moved := mapL(v4A, 22, netip.MustParseAddr("203.0.113.9"), time.Hour)
	expired := mapL(addrB, 22, addrB, -time.Second)
	expired.Owner = ownerB
	refused := mapL(addrA, 8080, addrA, time.Hour)
	many := make([]store.Lease, 3*pinhole.MaxBatch+7)
	for i := range many {
		a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 1, byte(i >> 8), byte(i)})
		many[i] = mapL(a, 443, a, time.Duration(i+1)*time.Second)
	}

	tests := []struct {
		name   string
		leases []store.Lease
		fail   *store.Lease // the kernel refuses this lease's pinholes
		keep   []store.Lease
		holes  map[pinhole.Pinhole]time.Duration // remaining; nil: one per kept lease at its own expiry
		gone   []pinhole.Pinhole                 // must not be in the kernel
	}{
		{name: "shared pinhole, later expiry first", leases: []store.Lease{filtered, peer}, keep: []store.Lease{filtered, peer},
			holes: map[pinhole.Pinhole]time.Duration{shared: 2 * time.Hour}},
		{name: "shared pinhole, later expiry last", leases: []store.Lease{peer, filtered}, keep: []store.Lease{filtered, peer},
			holes: map[pinhole.Pinhole]time.Duration{shared: 2 * time.Hour}},
		{name: "a key stored twice: the later stands", leases: []store.Lease{renewed, stale}, keep: []store.Lease{stale}},
		{name: "expired and moved leases dropped", leases: []store.Lease{expired, moved, peer}, keep: []store.Lease{peer},
			gone: []pinhole.Pinhole{pinholesOf(&moved)[0], pinholesOf(&expired)[0]}},
		{name: "more than one transaction", leases: many, keep: many},
		{name: "a lease the kernel refuses is dropped alone", leases: []store.Lease{peer, refused, renewed}, fail: &refused,
			keep: []store.Lease{peer, renewed}, gone: []pinhole.Pinhole{pinholesOf(&refused)[0]}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fw := servertest.NewFirewall(now)
			// A pinhole of the moved lease left in the kernel by the
			// previous run: restore knows it without a dump.
			if err := fw.Apply([]pinhole.Op{{Kind: pinhole.Install, Pinhole: pinholesOf(&moved)[0], Timeout: time.Hour}}); err != nil {
				t.Fatal(err)
			}
			if tc.fail != nil {
				bad := pinholesOf(tc.fail)[0]
				fw.FailApply = func(ops []pinhole.Op) error {
					if slices.ContainsFunc(ops, func(o pinhole.Op) bool { return o.Pinhole == bad }) {
						return servertest.ErrInjected
					}
					return nil
				}
			}
			st := servertest.NewStore()
			var stored []store.Lease
			for _, l := range tc.leases {
				if err := st.Commit([]store.Lease{l}, nil); err != nil {
					t.Fatal(err)
				}
				stored = append(stored, l)
			}
			own, err := policy.NewStatic(map[string][]netip.Prefix{
				"a": {netip.MustParsePrefix("2001:db8:a::/48"), netip.MustParsePrefix("10.0.0.0/28")},
				"b": {netip.MustParsePrefix("2001:db8:b::/48")},
			})
			if err != nil {
				t.Fatal(err)
			}
			pol, err := policy.New(policy.Config{}, own)
			if err != nil {
				t.Fatal(err)
			}
			state := store.State{Leases: stored, EpochOrigin: t0.Add(-time.Hour)}
			s, err := New(Config{ExternalIPv4: ext4, Interfaces: []string{"lo"}, KeepConnections: true},
				Deps{Firewall: fw, Store: st, State: state, Policy: pol, Now: now}, zap.NewNop())
			if err != nil {
				t.Fatal(err)
			}
			if err := s.Start(); err != nil {
				t.Fatal(err)
			}
			if s.deps.State.Leases != nil {
				t.Fatal("the server still holds the stored leases")
			}
			checkTable(t, s.tab)
			if s.tab.len() != len(tc.keep) {
				t.Fatalf("%d leases in the table, want %d", s.tab.len(), len(tc.keep))
			}
			want := tc.holes
			if want == nil {
				want = map[pinhole.Pinhole]time.Duration{}
			}
			for i := range tc.keep {
				l := tc.keep[i]
				got, ok := s.tab.get(l.Key)
				if !ok || !got.Expires.Equal(l.Expires) {
					t.Fatalf("lease %v: %v %v", l.Key, got, ok)
				}
				if _, ok := st.Leases()[l.Key]; !ok {
					t.Fatalf("lease %v left the store", l.Key)
				}
				for _, p := range pinholesOf(&l) {
					if _, set := want[p]; !set {
						want[p] = l.Expires.Sub(t0)
					}
				}
			}
			if len(st.Leases()) != len(tc.keep) {
				t.Fatalf("store holds %d leases, want %d", len(st.Leases()), len(tc.keep))
			}
			holes := fw.Holes()
			for p, left := range want {
				if holes[p] != left {
					t.Fatalf("pinhole %v: %v left, want %v", p, holes[p], left)
				}
			}
			for _, p := range tc.gone {
				if _, ok := holes[p]; ok {
					t.Fatalf("pinhole %v of a dropped lease still in the kernel", p)
				}
			}
			lost := tc.fail != nil || slices.ContainsFunc(tc.leases, func(l store.Lease) bool { return l.Key == moved.Key })
			if s.Status().Restarted == lost {
				t.Fatalf("restarted = %v, state lost = %v", s.Status().Restarted, lost)
			}
		})
	}
}
