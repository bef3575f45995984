package server

import (
	"net/netip"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// sweepReal is a server started on a real store in dir and a real kernel
// (a namespace of its own) from n stored leases no longer owned
// (static:bench's, startLeases; their prefix now static:other's) and
// owned more that are static:other's. The first n are static:bench's
// while the start restores them, lost once it is done (a start revokes
// what is unowned already: restoring.owned).
func sweepReal(t *testing.T, name, dir string, n, owned int) (*Server, *pinhole.Backend, *store.Store) {
	t.Helper()
	ls := startLeases(n+owned, time.Now())
	for i := n; i < n+owned; i++ {
		ls[i].Owner = "static:other"
	}
	commitLeases(t, dir, ls)
	ls = nil
	st, state, err := store.Open(dir, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	fw := lastingFirewall(t, name)
	after, err := policy.NewStatic(map[string][]netip.Prefix{"other": {netip.MustParsePrefix("2001:db8::/32")}})
	if err != nil {
		t.Fatal(err)
	}
	own := &lossOwnership{after: after, before: ownershipFunc(func(a netip.Addr) (policy.Owner, bool) {
		b := a.As16()
		if i := int(b[12])<<24 | int(b[13])<<16 | int(b[14])<<8 | int(b[15]); i < n {
			return policy.Owner{ID: "static:bench"}, true
		}
		return after.Lookup(a)
	})}
	pol, err := policy.New(policy.Config{MaxLeasesPerClient: 1 << 21, MaxLeases: 1 << 21}, own)
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(Config{RateLimit: 1e12, RateBurst: 1 << 30, KeepConnections: true}, Deps{Firewall: fw, Store: st, State: state, Policy: pol}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t1 := time.Now()
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Logf("start (restore of %d leases): %v", len(s.Leases()), time.Since(t1))
	own.lost.Store(true)
	return s, fw, st
}

// TestSweepRevokesInKernel (h/sweepchunk; root): the full sweep, a step
// at a time, ends every lease no longer owned in the kernel and in the
// store (reopened), and keeps every owned one.
func TestSweepRevokesInKernel(t *testing.T) {
	netlab.RequireRoot(t)
	const n, owned = 3000, 300
	dir := t.TempDir()
	s, fw, st := sweepReal(t, "sweepchunk-kern", dir, n, owned)
	s.sweepOwnership()
	es, err := fw.List()
	if err != nil {
		t.Fatal(err)
	}
	var own []netip.Addr
	for _, l := range s.Leases() {
		if l.Owner != "static:other" {
			t.Errorf("lease %v kept", l.Key)
		}
		own = append(own, l.InternalAddr)
	}
	if len(own) != owned || len(es) != owned {
		t.Fatalf("%d leases, %d kernel elements left; want the %d owned", len(own), len(es), owned)
	}
	for _, e := range es {
		if !slices.Contains(own, e.Pinhole.InternalAddr) {
			t.Errorf("kernel element %v of no owned lease", e.Pinhole)
		}
	}
	st.Close()
	st2, state, err := store.Open(dir, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer st2.Close()
	if len(state.Leases) != owned {
		t.Fatalf("%d stored leases, want %d", len(state.Leases), owned)
	}
	for _, l := range state.Leases {
		if l.Owner != "static:other" {
			t.Errorf("stored lease %v kept", l.Key)
		}
	}
}

// TestSweepStartHold measures (PCPD_SWEEP_HOLD=N; root: a real kernel in
// a namespace of its own and a real store) the ownership sweep at start
// over N restored leases no longer owned: the whole sweep, and how long
// the engine waits for s.mu meanwhile (a probe taking it every
// millisecond). A figure, not an assertion: run it under the bench lock.
func TestSweepStartHold(t *testing.T) {
	netlab.RequireRoot(t)
	n, _ := strconv.Atoi(os.Getenv("PCPD_SWEEP_HOLD"))
	if n == 0 {
		t.Skip("PCPD_SWEEP_HOLD=N not set")
	}
	s, _, _ := sweepReal(t, "sweepchunk-hold", t.TempDir(), n, 0)
	endProbe := probeLockWait(s)
	t0 := time.Now()
	s.sweepOwnership()
	took := time.Since(t0)
	maxWait, probes := endProbe()
	left := len(s.Leases())
	t.Logf("swept %d unowned leases in %v (%d left); engine's longest wait for s.mu %v (%d probes)", n, took, left, maxWait, probes)
	if left != 0 {
		t.Errorf("%d leases left", left)
	}
}
