package server

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/internal/bootclock"
	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/store"
)

// TestBootClockBackupAfterRebase (review h/revlock, left by h/revboot):
// the backup copy (leases.db.bak) must follow a rebase. Before, it was
// written by store.Open, before the start's rebase onto a step made
// while pcpd was down, and not again until the next periodic snapshot
// (an hour) or a clean stop; a rebase seen while running left it as
// well. A damaged leases.db restored from it meanwhile read every time in
// the old wall-clock frame (a restored state has no anchor: the times are
// taken as they are): a forward step of 1 h dropped the 600 s lease as
// expired, a step back made it 1 h longer (clamped to its lifetime, the
// pinhole outliving what the client was told). Now the engine has the
// backup written again once the rewrite after a rebase is done
// (housekeep: snapshot "after a wall-clock step"). Real store and boot
// anchor (fake clocks and boot), the engine's housekeeping running; the
// backup is read back as a restore would read it (a directory holding
// only the copy). On main every row fails: the copy holds the lease with
// 490 s (500 s) left minus the step.
func TestBootClockBackupAfterRebase(t *testing.T) {
	const lifetime = 600 * time.Second
	for _, tc := range []struct {
		name string
		step time.Duration
		down bool // the step made while pcpd was down (seen at the start)
	}{
		{"while down, forward", time.Hour, true},
		{"while down, back", -time.Hour, true},
		{"while running, forward", time.Hour, false},
		{"while running, back", -time.Hour, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rig := newBootRig(t, "8d1c2a4e-0000-4000-8000-000000000003")
			c, k := rig.c, rig.k
			open := func() (*store.Store, store.State) { return rig.open(t) }
			h := newHarness(t)
			st, state := open()
			rig.startOn(h, k, st, state)
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 8080, 0, lifetime, 1)), pcp.Success)
			c.advance(100 * time.Second)
			// A periodic backup copy with the lease in it.
			if err := st.Snapshot(); err != nil {
				t.Fatal(err)
			}
			left := lifetime - 100*time.Second
			if tc.down {
				// Stopped (what a kill -9 leaves once the log is
				// replayed: Close folds it), the step while down.
				st.Close()
				c.advance(10 * time.Second)
				c.step(tc.step)
				left -= 10 * time.Second
				st, state = open()
				rig.startOn(h, k, st, state) // rebases by the step the anchor measures
			} else {
				c.step(tc.step)
				h.s.checkClock() // a sweep tick: the rebase
			}
			ctx, cancel := context.WithCancel(context.Background())
			hk := make(chan struct{})
			go func() { defer close(hk); h.s.housekeep(ctx) }()
			defer func() { cancel(); <-hk; st.Close() }()
			h.s.finishRebase() // the rewrite, to its end

			if ls := h.s.Leases(); len(ls) != 1 || ls[0].Expires.Sub(c.Now()) != left {
				t.Fatalf("engine's leases %+v, want one with %v left", ls, left)
			}
			// Checked while the engine runs: its shutdown snapshot
			// would write the copy anew anyway.
			var got time.Duration
			err := netlab.Eventually(10*time.Second, func() error {
				ls, err := restoredFromBackup(rig.dir, c.Now)
				if err != nil {
					return err
				}
				if len(ls) != 1 {
					return fmt.Errorf("backup holds %d leases, want 1", len(ls))
				}
				if got = ls[0].Expires.Sub(c.Now()); got != left {
					return fmt.Errorf("backup's lease has %v left, want %v (step %v)", got, left, tc.step)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}

// restoredFromBackup is what a start restoring dir's backup copy reads:
// the copy alone in a directory of its own, opened (state file missing:
// the copy is restored).
func restoredFromBackup(dir string, now func() time.Time) ([]store.Lease, error) {
	tmp, err := os.MkdirTemp("", "pcpd-bak-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	in, err := os.Open(filepath.Join(dir, store.BackupName))
	if err != nil {
		return nil, err
	}
	defer in.Close()
	out, err := os.Create(filepath.Join(tmp, store.BackupName))
	if err != nil {
		return nil, err
	}
	_, err = io.Copy(out, in)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}
	st, state, err := store.Open(tmp, zap.NewNop(), store.WithClock(now), store.WithoutOpenSnapshot())
	if err != nil {
		return nil, err
	}
	defer st.Close()
	return state.Leases, nil
}

// crashAnchor is a boot anchor whose next Save is lost: pcpd was killed
// before it wrote it.
type crashAnchor struct {
	k    *bootclock.Keeper
	lose atomic.Bool
}

// crashRun is a server on a boot rig (bootRig) with a crashAnchor, its
// store opened without the open snapshot, holding two leases of addrA
// (TCP 8080 and 8081) mapped for lifetime 100 s before the wall clock
// stepped by step; before is the epoch just before the step.
type crashRun struct {
	rig    *bootRig
	anchor *crashAnchor
	h      *harness
	st     *store.Store
	before pcp.Epoch
}

func newCrashRun(t *testing.T, bootID string, lifetime, step time.Duration) *crashRun {
	t.Helper()
	r := &crashRun{rig: newBootRig(t, bootID), h: newHarness(t)}
	r.anchor = &crashAnchor{k: r.rig.k}
	st, state := r.rig.open(t, store.WithoutOpenSnapshot())
	r.st = st
	t.Cleanup(func() { r.st.Close() })
	r.rig.startOn(r.h, r.anchor, st, state)
	for _, port := range []uint16{8080, 8081} {
		r.h.expect(r.h.do(mapReq(addrA, pcp.ProtoTCP, port, 0, lifetime, 1)), pcp.Success)
	}
	r.rig.c.advance(100 * time.Second)
	r.before = r.h.s.Status().Epoch
	r.rig.c.step(step)
	return r
}

// restart is a kill -9 (Close folds the log a start would replay), with
// the anchor no longer losing its saves, and a start 10 s later.
func (r *crashRun) restart(t *testing.T) {
	t.Helper()
	r.st.Close()
	r.anchor.lose.Store(false)
	r.rig.c.advance(10 * time.Second)
	st, state := r.rig.open(t, store.WithoutOpenSnapshot())
	r.st = st
	r.rig.startOn(r.h, r.anchor, st, state)
}

func (a *crashAnchor) Step(origin time.Time) (time.Duration, error) { return a.k.Step(origin) }
func (a *crashAnchor) Save(run func() time.Time, origin time.Time) error {
	if a.lose.Load() {
		return nil
	}
	return a.k.Save(run, origin)
}

// TestBootClockKillDuringRewrite (review h/revlock, edge (b) of
// h/revboot; fixed by h/rwpend): what a kill -9 at each point of a rebase
// leaves for the next start in the same boot (no step while down). Two
// 600 s leases, 490 s left each at the restart when all is right. The
// rebase clears the stored epoch origin, saves the boot anchor, rewrites
// the leases a chunk (rewriteChunk) a tick, and then stores the moved
// origin. A lease carries no frame, so the start cannot tell which leases
// the rewrite reached; it must not claim continuity then (issue 9, ANN-03):
//   - killed before the rebase wrote anything: the anchor measures the
//     step (an unseen step), both right, the epoch goes on;
//   - killed after the clear, before the anchor, or with one lease of two
//     rewritten: the stored origin is cleared, so the epoch resets (the
//     store's "epoch reset still pending", naming the rewrite); the
//     leases are as the wall clock reads them (forward: those not
//     rewritten dropped; back: clamped to their whole 600 s);
//   - the rewrite done: both right, the epoch goes on.
//
// Then a second kill, 10 s later, before any sweep tick: the reset was
// stored (its epoch goes on from it, 10), except where a clamped lease's
// creation still lies in the future (a step back: doubtful again, reset
// again, as after any restore by the wall clock over a step back), and
// where the first start rebased by the anchor's step: that start's own
// rewrite had not begun, so the epoch resets.
//
// On main (the moved origin stored at the rebase) the forward rows killed
// after the rebase fail: the epoch went on (110) with a lease, or both,
// dropped silently.
func TestBootClockKillDuringRewrite(t *testing.T) {
	const lifetime = 600 * time.Second
	const right = lifetime - 110*time.Second
	const right2 = right - 10*time.Second
	type point int
	const (
		beforeRebase point = iota
		beforeAnchor
		halfRewritten
		rewritten
	)
	for _, tc := range []struct {
		name  string
		step  time.Duration
		kill  point
		left  []time.Duration // the leases' remaining lifetimes after the restart, sorted
		reset bool            // the epoch reset
		// after a second kill and start 10 s later: the epoch reset again
		reset2 bool
	}{
		{"forward, killed before the rebase", time.Hour, beforeRebase, []time.Duration{right, right}, false, true},
		{"forward, killed before the anchor", time.Hour, beforeAnchor, nil, true, false},
		{"forward, killed half rewritten", time.Hour, halfRewritten, []time.Duration{right}, true, false},
		{"forward, rewritten", time.Hour, rewritten, []time.Duration{right, right}, false, false},
		{"back, killed before the rebase", -time.Hour, beforeRebase, []time.Duration{right, right}, false, true},
		{"back, killed before the anchor", -time.Hour, beforeAnchor, []time.Duration{lifetime, lifetime}, true, true},
		{"back, killed half rewritten", -time.Hour, halfRewritten, []time.Duration{right, lifetime}, true, true},
		{"back, rewritten", -time.Hour, rewritten, []time.Duration{right, right}, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newCrashRun(t, "8d1c2a4e-0000-4000-8000-000000000004", lifetime, tc.step)
			c, h, anchor, before := r.rig.c, r.h, r.anchor, r.before
			if tc.kill != beforeRebase {
				h.s.mu.Lock()
				d, ok := h.s.clk.stepped()
				if !ok {
					t.Fatal("no step measured")
				}
				anchor.lose.Store(tc.kill == beforeAnchor)
				h.s.rebase(d)
				switch tc.kill {
				case halfRewritten:
					h.s.rewriteStep(1)
				case rewritten:
					for h.s.rewriteAt != 0 {
						h.s.rewriteStep(rewriteChunk)
					}
				}
				h.s.mu.Unlock()
			}
			r.restart(t)

			if left := leasesLeft(h, c.Now()); !slices.Equal(left, tc.left) {
				t.Errorf("leases left %v, want %v", left, tc.left)
			}
			status := h.s.Status()
			if reset := !status.Restarted; reset != tc.reset {
				t.Errorf("epoch %d after %d (restarted %v), want reset %v", status.Epoch, before, status.Restarted, tc.reset)
			}
			if !tc.reset && status.Epoch != before+10 {
				t.Errorf("epoch %d, want %d", status.Epoch, before+10)
			}
			// The reason is logged: the store's, naming the rewrite.
			logged := false
			for _, e := range h.logs.FilterMessage("store recovered").All() {
				if d, ok := e.ContextMap()["detail"].(string); ok && strings.Contains(d, "wall-clock step") {
					logged = true
				}
			}
			if logged != tc.reset {
				t.Errorf("store recovered, naming the rewrite after a wall-clock step, logged %v, want %v", logged, tc.reset)
			}

			// A second kill -9, 10 s on (no sweep tick ran: a start that
			// rebased has not rewritten a lease yet).
			epoch := h.s.Status().Epoch
			h.s.mu.Lock()
			rewriting := h.s.rewriteAt != 0
			h.s.mu.Unlock()
			if rewriting != (tc.kill == beforeRebase) {
				t.Errorf("the start's rewrite pending %v, want %v", rewriting, tc.kill == beforeRebase)
			}
			r.restart(t)
			status = h.s.Status()
			if reset := !status.Restarted; reset != tc.reset2 {
				t.Errorf("second start: epoch %d after %d (restarted %v), want reset %v", status.Epoch, epoch, status.Restarted, tc.reset2)
			}
			if !tc.reset2 && status.Epoch != epoch+10 {
				t.Errorf("second start: epoch %d, want %d", status.Epoch, epoch+10)
			}
			if !tc.reset && !tc.reset2 {
				for _, l := range h.s.Leases() {
					if got := l.Expires.Sub(c.Now()); got != right2 {
						t.Errorf("second start: lease %d has %v left, want %v", l.ExternalPort, got, right2)
					}
				}
			}
		})
	}
}
