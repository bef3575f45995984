package server

import (
	"context"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// TestRevokeLetsEngineIn (h/lowfix): an operator's revoke of a client's
// many leases holds the engine (s.mu) a chunk at a time, not for the
// whole revoke. The engine (here a goroutine taking s.mu, as a request
// batch does) that starts waiting during the revoke's first kernel
// transaction gets in before the revoke is done: pinholes of the client
// are still in the kernel when it does.
//
// Fails before (one transaction under one hold of s.mu): the engine got
// in only after the last pinhole was gone ("0 of 2000 pinholes left").
// Measured with a real kernel and store (TestRevokeOwnerHold,
// PCPD_REVOKE_HOLD=100000): the engine waited 2.67 s before, ≤ 30 ms after.
func TestRevokeLetsEngineIn(t *testing.T) {
	const n = 2000
	h := newHarness(t, func(c *Config, p *policy.Config) { p.MaxLeasesPerClient, c.RateBurst = 2*n, 100*n })
	var reqs []Request
	for i := range n {
		r := mapReq(addrA, pcp.ProtoTCP, uint16(1000+i), 0, time.Hour, 1)
		reqs = append(reqs, Request{Local: local6, Source: netip.AddrPortFrom(addrA, 5000), Data: pcp.AppendRequest(nil, r)})
	}
	for i, r := range h.s.HandleBatch(reqs) {
		if len(r) < 4 || r[3] != 0 {
			t.Fatalf("reply %d: % x", i, r)
		}
	}
	if got := len(h.fw.Holes()); got != n {
		t.Fatalf("%d pinholes, want %d", got, n)
	}
	left := -1
	in := make(chan struct{})
	var gotIn atomic.Bool
	armed := true
	h.fw.FailApply = func([]pinhole.Op) error {
		if !armed {
			if !gotIn.Load() {
				// As slow as a real kernel transaction: the engine,
				// woken at an Unlock the revoke won again, gets the CPU
				// to ask for the mutex's hand-off (starvation mode).
				time.Sleep(10 * time.Millisecond)
			}
			return nil
		}
		armed = false
		waiting := make(chan struct{})
		go func() {
			defer close(in)
			close(waiting)
			h.s.mu.Lock() // the engine, as for a request batch
			gotIn.Store(true)
			left = len(h.fw.Holes())
			h.s.mu.Unlock()
		}()
		<-waiting
		// Until it waits on s.mu (its stack in the mutex's slow path),
		// and over 1 ms more: a waiter that long is handed the mutex at
		// the Unlock after its next lost race (sync.Mutex's starvation
		// mode), if the revoke lets go of it between transactions.
		buf := make([]byte, 1<<20)
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
			if slices.ContainsFunc(strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n"), func(g string) bool {
				return strings.Contains(g, "sync.(*Mutex).Lock") && strings.Contains(g, "TestRevokeLetsEngineIn")
			}) {
				break
			}
		}
		time.Sleep(5 * time.Millisecond)
		return nil
	}
	got, err := h.s.Revoke(context.Background(), RevokeFilter{Owner: "static:a"})
	<-in
	if got != n || err != nil {
		t.Fatalf("Revoke: %d, %v; want %d", got, err, n)
	}
	if left := len(h.fw.Holes()); left != 0 || len(h.st.Leases()) != 0 {
		t.Fatalf("after the revoke: %d pinholes, %d stored leases", left, len(h.st.Leases()))
	}
	t.Logf("the engine got in with %d of %d pinholes left", left, n)
	if left == 0 {
		t.Errorf("the engine got in only after the whole revoke (0 of %d pinholes left): one hold of s.mu", n)
	}
}

// TestRevokeOwnerHold measures (PCPD_REVOKE_HOLD=N; root: a real kernel
// in a namespace of its own and a real store) how long the engine waits
// for s.mu while Revoke ends one client's N leases (a probe taking s.mu
// every millisecond), and how long Leases() holds it. A figure, not an
// assertion: run it under the bench lock.
func TestRevokeOwnerHold(t *testing.T) {
	netlab.RequireRoot(t)
	n, _ := strconv.Atoi(os.Getenv("PCPD_REVOKE_HOLD"))
	if n == 0 {
		t.Skip("PCPD_REVOKE_HOLD=N not set")
	}
	s := storedLeasesServer(t, n, "revhold")
	// What control's revoke --client took before Revoke until h/lowfix:
	// resolveOwner's Leases(), a copy of every lease under s.mu.
	t1 := time.Now()
	all := len(s.Leases())
	t.Logf("Leases() (revoke --client's owner lookup before h/lowfix): %d leases copied under s.mu in %v", all, time.Since(t1))
	endProbe := probeLockWait(s)
	t0 := time.Now()
	got, err := s.Revoke(context.Background(), RevokeFilter{Owner: "static:bench"})
	took := time.Since(t0)
	maxWait, probes := endProbe()
	t.Logf("revoked %d (%v) in %v; engine's longest wait for s.mu %v (%d probes)", got, err, took, maxWait, probes)
}

// probeLockWait starts a prober that takes s.mu every millisecond, as a
// request would, and returns the function that stops it and reports the
// longest it waited for the lock and how many times it took it.
func probeLockWait(s *Server) (end func() (time.Duration, int)) {
	var maxWait atomic.Int64
	stop := make(chan struct{})
	done := make(chan struct{})
	probes := 0
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			t0 := time.Now()
			s.mu.Lock()
			s.mu.Unlock()
			if w := int64(time.Since(t0)); w > maxWait.Load() {
				maxWait.Store(w)
			}
			probes++
			time.Sleep(time.Millisecond)
		}
	}()
	return func() (time.Duration, int) {
		close(stop)
		<-done
		return time.Duration(maxWait.Load()), probes
	}
}

// commitStartLeases commits n bench leases (startLeases, from now) to a
// new store in dir, in chunks, closes it and returns the leases.
func commitStartLeases(t testing.TB, dir string, n int) []store.Lease {
	t.Helper()
	ls := startLeases(n, time.Now())
	commitLeases(t, dir, ls)
	return ls
}

// commitLeases commits ls to a new store in dir, 16 384 a commit (one
// commit of a million would hold them all in one write), and closes it.
func commitLeases(t testing.TB, dir string, ls []store.Lease) {
	t.Helper()
	st, _, err := store.Open(dir, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < len(ls); i += 1 << 14 {
		if err := st.Commit(ls[i:min(i+1<<14, len(ls))], nil); err != nil {
			t.Fatal(err)
		}
	}
	st.Close()
}

// storedLeasesServer is a Server over n leases committed to a real store
// and read back by a fresh Open (as a start reads them), on a kernel
// firewall in a namespace of its own named ns.
func storedLeasesServer(t *testing.T, n int, ns string) *Server {
	t.Helper()
	dir := t.TempDir()
	commitStartLeases(t, dir, n)
	st, state, err := store.Open(dir, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return benchServerCfg(t, lastingFirewall(t, ns), st, state, Config{})
}
