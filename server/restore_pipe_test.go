package server

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// pipeLeases are n live IPv6 MAPs of ownerA, one pinhole each.
func pipeLeases(now time.Time, n int) []store.Lease {
	ls := make([]store.Lease, n)
	for i := range ls {
		a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 1, byte(i >> 8), byte(i)})
		ls[i] = store.Lease{Key: store.Key{Owner: ownerA, Protocol: 6, InternalAddr: a, InternalPort: 443},
			ExternalAddr: a, ExternalPort: 443, Kind: store.KindMap, Created: now.Add(-time.Minute),
			Expires: now.Add(time.Duration(i+1) * time.Minute), ClientAddr: netip.AddrPortFrom(a, 5350), ServerAddr: local6}
	}
	return ls
}

// TestInstallAllPipelined: the restore's kernel install (installAll: the
// table walked in a goroutine of its own, at most two batches ahead of
// the kernel's transactions, BENCHMARKS.md item 62) keeps what the walk
// in series promised. Every pinhole goes in once, in transactions of at
// most pinhole.MaxBatch; a start stopped during the install applies no
// transaction after the one running (and writes nothing to the store);
// a transaction the kernel refuses ends the walk, and the lease-by-lease
// retry puts every lease in. Passes before and after the pipelining (a
// guard, not a fix: nothing of this changed), also under -race.
func TestInstallAllPipelined(t *testing.T) {
	n := 5*pinhole.MaxBatch + 3
	setup := func(t *testing.T) (*harness, Deps) {
		h := newHarness(t, func(*Config, *policy.Config) {})
		if err := h.st.Commit(pipeLeases(h.clock.Now(), n), nil); err != nil {
			t.Fatal(err)
		}
		return h, Deps{Firewall: h.fw, Store: h.st, State: h.st.State(), Policy: h.s.pol, Now: h.clock.Now}
	}
	t.Run("all in", func(t *testing.T) {
		h, d := setup(t)
		calls, most := 0, 0
		h.fw.FailApply = func(ops []pinhole.Op) error { calls++; most = max(most, len(ops)); return nil }
		s, err := New(h.cfg, d, h.s.log)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Start(); err != nil {
			t.Fatal(err)
		}
		if got := len(h.fw.Holes()); got != n {
			t.Errorf("%d pinholes in the kernel, want %d", got, n)
		}
		if want := (n + pinhole.MaxBatch - 1) / pinhole.MaxBatch; calls != want || most != pinhole.MaxBatch {
			t.Errorf("%d transactions of at most %d ops, want %d of at most %d", calls, most, want, pinhole.MaxBatch)
		}
	})
	t.Run("stopped", func(t *testing.T) {
		h, d := setup(t)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		calls := 0
		h.fw.FailApply = func([]pinhole.Op) error {
			if calls++; calls == 2 {
				cancel()
			}
			return nil
		}
		s, err := New(h.cfg, d, h.s.log)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.StartContext(ctx); !errors.Is(err, ErrStartStopped) {
			t.Fatalf("StartContext = %v, want ErrStartStopped", err)
		}
		if calls != 2 {
			t.Errorf("%d transactions, want 2: none after the stop", calls)
		}
		if got := len(h.st.Leases()); got != n {
			t.Errorf("%d leases stored after the stopped start, want all %d", got, n)
		}
	})
	t.Run("refused transaction", func(t *testing.T) {
		h, d := setup(t)
		calls := 0
		h.fw.FailApply = func([]pinhole.Op) error {
			if calls++; calls == 3 {
				return errors.New("kernel says no, once")
			}
			return nil
		}
		s, err := New(h.cfg, d, h.s.log)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Start(); err != nil {
			t.Fatal(err)
		}
		if got := len(h.fw.Holes()); got != n {
			t.Errorf("%d pinholes in the kernel, want %d", got, n)
		}
		if got := s.tab.len(); got != n {
			t.Errorf("%d leases in the table, want %d", got, n)
		}
		if want := 3 + n; calls != want { // 3 batches, then one a lease
			t.Errorf("%d transactions, want %d (the walk ended at the refusal)", calls, want)
		}
	})
}
