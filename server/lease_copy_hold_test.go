package server

import (
	"context"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/store"
)

// leasesOneHold is Leases as it was before h/opsleft: a copy of every
// live lease, sorted, in one hold of s.mu (what control's leases op fell
// back to for a backend that did not stream, and revoke PROTO/ADDR/PORT
// read to find the leases named).
func leasesOneHold(s *Server) []store.Lease {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	out := make([]store.Lease, 0, s.tab.len())
	for _, l := range s.tab.all() {
		if !l.Expires.After(now) {
			continue
		}
		c := *l
		c.Filters = slices.Clone(l.Filters)
		out = append(out, c)
	}
	slices.SortFunc(out, func(a, b store.Lease) int { return compareKeys(a.Key, b.Key) })
	return out
}

// TestLeaseCopyHold measures (PCPD_REVOKE_HOLD=N; root: a real kernel in
// a namespace of its own and a real store) the engine's longest wait for
// s.mu (probeLockWait) while, over N stored leases: every lease is
// copied in one hold (before h/opsleft) and by Leases (ListLeases
// collected); ListLeases streams them (leases --json, the reference);
// 10 leases named by what they open are revoked as control did before
// (the one-hold copy, then a Revoke per key found) and by Revoke's
// Opens. A figure, not an assertion: run it under the bench lock.
func TestLeaseCopyHold(t *testing.T) {
	netlab.RequireRoot(t)
	n, _ := strconv.Atoi(os.Getenv("PCPD_REVOKE_HOLD"))
	if n == 0 {
		t.Skip("PCPD_REVOKE_HOLD=N not set")
	}
	dir := t.TempDir()
	st, _, err := store.Open(dir, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	ls := startLeases(n, time.Now())
	for i := 0; i < n; i += 1 << 14 {
		if err := st.Commit(ls[i:min(i+1<<14, n)], nil); err != nil {
			t.Fatal(err)
		}
	}
	st.Close()
	st, state, err := store.Open(dir, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	fw := lastingFirewall(t, "opsleft-copy")
	s := benchServerCfg(t, fw, st, state, Config{})
	measure := func(what string, f func() int) {
		end := probeLockWait(s)
		time.Sleep(5 * time.Millisecond) // the prober under way
		t0 := time.Now()
		got := f()
		took := time.Since(t0)
		maxWait, probes := end()
		t.Logf("%-44s %7d in %8v; engine's longest wait for s.mu %8v (%d probes)", what, got, took.Round(time.Microsecond), maxWait.Round(time.Microsecond), probes)
	}
	measure("every lease copied in one hold (before)", func() int { return len(leasesOneHold(s)) })
	measure("Leases (ListLeases collected, after)", func() int { return len(s.Leases()) })
	measure("ListLeases streamed (leases --json)", func() int {
		k := 0
		s.ListLeases(func(int) error { return nil }, func(*store.Lease) error { k++; return nil })
		return k
	})
	named := func(from int) []Opening {
		var ops []Opening
		for i := from; i < from+10; i++ {
			ops = append(ops, Opening{Protocol: 6, InternalAddr: ls[i*(n/20)].InternalAddr, InternalPort: 443})
		}
		return ops
	}
	measure("revoke 10 named: copy + Revoke by key (before)", func() int {
		want := map[Opening]bool{}
		for _, o := range named(0) {
			want[o] = true
		}
		done := 0
		for _, l := range leasesOneHold(s) {
			if want[Opening{Protocol: l.Protocol, InternalAddr: l.InternalAddr.Unmap(), InternalPort: l.InternalPort}] {
				k := l.Key
				m, err := s.Revoke(context.Background(), RevokeFilter{Key: &k})
				if err != nil {
					t.Fatal(err)
				}
				done += m
			}
		}
		return done
	})
	measure("revoke 10 named: Revoke's Opens (after)", func() int {
		m, err := s.Revoke(context.Background(), RevokeFilter{Opens: named(10)})
		if err != nil {
			t.Fatal(err)
		}
		return m
	})
}
