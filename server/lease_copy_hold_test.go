package server

import (
	"context"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/store"
)

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
	s := storedLeasesServer(t, n, "opsleft-copy")
	ls := startLeases(n, time.Now()) // the same keys the store holds
	measure := func(what string, f func() int) {
		end := probeLockWait(s)
		time.Sleep(5 * time.Millisecond) // the prober under way
		t0 := time.Now()
		got := f()
		took := time.Since(t0)
		maxWait, probes := end()
		t.Logf("%-44s %7d in %8v; engine's longest wait for s.mu %8v (%d probes)", what, got, took.Round(time.Microsecond), maxWait.Round(time.Microsecond), probes)
	}
	measure("every lease copied in one hold (before)", func() int { return len(s.leasesOneHold()) })
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
		for _, l := range s.leasesOneHold() {
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
