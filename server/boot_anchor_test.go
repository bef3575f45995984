package server

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/internal/bootclock"
	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// fakeBoot is a machine's boot for bootclock: its id and CLOCK_BOOTTIME,
// which runs with the stepClocks' monotonic clock (never stepped).
type fakeBoot struct {
	c          *stepClocks
	id         atomic.Value // string
	unreadable atomic.Bool  // the boot id cannot be read
}

func (b *fakeBoot) Boottime() (time.Duration, error) { return b.c.Mono() + 7*time.Minute, nil }
func (b *fakeBoot) BootID() (string, error) {
	if b.unreadable.Load() {
		return "", errors.New("open /proc/sys/kernel/random/boot_id: permission denied")
	}
	return b.id.Load().(string), nil
}

// bootHarness is runClockHarness with a boot anchor kept in a real state
// directory (bootclock.Keeper on the fake boot).
func bootHarness(t *testing.T, c *stepClocks) (*harness, *bootclock.Keeper, *fakeBoot, func(*Deps)) {
	t.Helper()
	b := &fakeBoot{c: c}
	b.id.Store("8d1c2a4e-0000-4000-8000-000000000001")
	k := bootclock.New(t.TempDir(), bootclock.Clocks{Wall: c.Now, Boottime: b.Boottime, BootID: b.BootID})
	deps := func(d *Deps) { c.deps(d); d.Boot = k }
	h := newHarness(t)
	h.startWith(deps, nil)
	return h, k, b, deps
}

// TestBootClockUnseenStep (issue 9: "the epoch never resets while state
// is intact"): a wall-clock step made while pcpd is down (after a kill -9:
// no finishRebase) is seen at the next start in the same boot through the
// boot anchor, and handled as a step seen while running: the epoch goes on
// by CLOCK_BOOTTIME (before + the 10 s down) and the lease keeps its
// remaining lifetime in the table, the kernel and, once rewritten, the
// store. Without an anchor that can be trusted (another boot, none,
// damaged, another state's) the start logs why and restores as before:
// the step counts in the epoch and the lease (TestEpochAcrossKillWallStep).
// The same-boot rows fail without the anchor (Start ignoring Deps.Boot:
// epoch reset to 0 for the step back, 3710 instead of 110 forward; the
// lease's remaining lifetime off by the step); the fallback rows then
// miss the log line.
func TestBootClockUnseenStep(t *testing.T) {
	const (
		lifetime = 600 * time.Second
		down     = 10 * time.Second
	)
	for _, tc := range []struct {
		name   string
		step   time.Duration
		tamper func(t *testing.T, h *harness, k *bootclock.Keeper, b *fakeBoot)
		used   bool   // the anchor is used: the step is not counted
		why    string // else the log line's reason
		extra  time.Duration
	}{
		{name: "same boot, step back", step: -time.Hour, used: true},
		{name: "same boot, step forward", step: time.Hour, used: true},
		{name: "same boot, small step back", step: -3 * time.Second, used: true},
		{name: "another boot", step: 200 * time.Second, why: "another boot",
			tamper: func(t *testing.T, h *harness, k *bootclock.Keeper, b *fakeBoot) {
				b.id.Store("8d1c2a4e-0000-4000-8000-000000000002")
			}},
		{name: "no anchor", step: 200 * time.Second, why: "no boot anchor",
			tamper: func(t *testing.T, h *harness, k *bootclock.Keeper, b *fakeBoot) {
				if err := os.Remove(k.Path()); err != nil {
					t.Fatal(err)
				}
			}},
		{name: "damaged anchor", step: 200 * time.Second, why: "checksum",
			tamper: func(t *testing.T, h *harness, k *bootclock.Keeper, b *fakeBoot) {
				raw, err := os.ReadFile(k.Path())
				if err != nil {
					t.Fatal(err)
				}
				raw[len(raw)-9] ^= 0x10 // in the origin
				if err := os.WriteFile(k.Path(), raw, 0o600); err != nil {
					t.Fatal(err)
				}
			}},
		{name: "truncated anchor", step: 200 * time.Second, why: "damaged",
			tamper: func(t *testing.T, h *harness, k *bootclock.Keeper, b *fakeBoot) {
				if err := os.Truncate(k.Path(), 20); err != nil {
					t.Fatal(err)
				}
			}},
		{name: "another state (restored from a backup)", step: 200 * time.Second, why: "does not match", extra: 50 * time.Second,
			tamper: func(t *testing.T, h *harness, k *bootclock.Keeper, b *fakeBoot) {
				origin := h.st.State().EpochOrigin
				if err := h.st.ResetEpoch(origin.Add(-50 * time.Second)); err != nil {
					t.Fatal(err)
				}
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &stepClocks{}
			c.wall.Store(time.Date(2026, 12, 4, 20, 0, 0, 0, time.UTC).UnixNano())
			h, k, b, deps := bootHarness(t, c)
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 8080, 0, lifetime, 1)), pcp.Success)
			c.advance(100 * time.Second)
			before := h.s.Status().Epoch
			left := lifetime - 100*time.Second - down
			// kill -9, then the step while down.
			c.advance(down)
			c.step(tc.step)
			if tc.tamper != nil {
				tc.tamper(t, h, k, b)
			}
			h.startWith(deps, nil)

			want := before + pcp.Epoch((down+tc.extra)/time.Second)
			wantLeft := left
			if !tc.used {
				want += pcp.Epoch(tc.step / time.Second)
				wantLeft -= tc.step
			}
			if st := h.s.Status(); !st.Restarted || st.Epoch != want {
				t.Errorf("epoch after the restart %d (continued %v), want %d (%d before, %v down, step %v)",
					st.Epoch, st.Restarted, want, before, down, tc.step)
			}
			ls := h.s.Leases()
			if len(ls) != 1 {
				t.Fatalf("%d leases after the restart, want 1", len(ls))
			}
			if got := ls[0].Expires.Sub(c.Now()); got != wantLeft {
				t.Errorf("lease has %v left after the restart, want %v", got, wantLeft)
			}
			for p, got := range h.fw.Holes() {
				if got != wantLeft {
					t.Errorf("pinhole %v re-installed with %v, want %v", p, got, wantLeft)
				}
			}
			h.s.finishRebase() // the rewrite after the rebase
			for _, l := range h.st.Leases() {
				if got := l.Expires.Sub(c.Now()); got != wantLeft {
					t.Errorf("stored lease has %v left, want %v", got, wantLeft)
				}
			}
			if o := h.st.State().EpochOrigin; pcp.Epoch(c.Now().Sub(o)/time.Second) != want {
				t.Errorf("stored epoch origin %v gives epoch %d, want %d", o, c.Now().Sub(o)/time.Second, want)
			}
			var logged string
			for _, e := range h.logs.FilterMessageSnippet("boot anchor not used").All() {
				logged += e.ContextMap()["error"].(string)
			}
			switch {
			case tc.used && logged != "":
				t.Errorf("anchor not used: %s", logged)
			case !tc.used && !strings.Contains(logged, tc.why):
				t.Errorf("log line %q, want one with %q", logged, tc.why)
			}
			// The start anchored the running clock anew, for the
			// state as it now is.
			a, err := k.Load()
			if err != nil {
				t.Fatal(err)
			}
			if o, _ := h.s.epoch.get(); !a.Origin.Equal(o) {
				t.Errorf("anchor's origin %v, the epoch's %v", a.Origin, o)
			}
			if d, err := k.Step(h.st.State().EpochOrigin); err != nil || d != 0 {
				t.Errorf("step right after the start %v (%v), want 0", d, err)
			}
		})
	}
}

// TestBootClockAfterRebase: a rebase (a step seen while running) writes
// the anchor anew with the moved epoch origin, so a second step, made
// while pcpd is down, is measured from the frame the store now holds:
// the epoch goes on. Fails without rebase's saveAnchor: the anchor then
// holds the origin of before the rebase ("anchor's origin 09:00:00 after
// the rebase, the epoch's 09:05:00") and would not match the store at
// the restart, which would then count the step made while down.
func TestBootClockAfterRebase(t *testing.T) {
	for _, tc := range []struct {
		name       string
		seen, down time.Duration
	}{
		{"forward seen, back while down", 300 * time.Second, -time.Hour},
		{"back seen, forward while down", -300 * time.Second, time.Hour},
		{"back seen, back while down", -300 * time.Second, -30 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &stepClocks{}
			c.wall.Store(time.Date(2026, 12, 4, 20, 0, 0, 0, time.UTC).UnixNano())
			h, k, _, deps := bootHarness(t, c)
			c.advance(1000 * time.Second)
			c.step(tc.seen)
			h.s.checkClock()
			origin, _ := h.s.epoch.get()
			a, err := k.Load()
			if err != nil {
				t.Fatal(err)
			}
			if !a.Origin.Equal(origin) {
				t.Fatalf("anchor's origin %v after the rebase, the epoch's %v", a.Origin, origin)
			}
			if d, err := k.Step(origin); err != nil || d != 0 {
				t.Errorf("step right after the rebase %v (%v), want 0", d, err)
			}
			before := h.s.Status().Epoch
			c.advance(5 * time.Second)
			c.step(tc.down)
			h.startWith(deps, nil)
			if st := h.s.Status(); !st.Restarted || st.Epoch != before+5 {
				t.Errorf("epoch after the restart %d (continued %v), want %d", st.Epoch, st.Restarted, before+5)
			}
		})
	}
}

var _ BootAnchor = (*bootclock.Keeper)(nil)

// TestBootClockOneMeasurement: pcpd's store.Open measures the step made
// while down (store.WithUnseenStep: Keeper.Unseen) and keeps the epoch
// for a step back it accounts for; the engine's Start must act on the
// same measurement. Here its own read of the boot id fails a moment
// later: measured again, the anchor was not used, the state the store
// had kept was restored by the wall clock, 1 h behind its frame: the
// lease looked 1 h longer, was clamped to its whole 600 s (pinhole
// 110 s longer than its lease) and made the clock doubtful, epoch reset
// to 0. Now Start uses Unseen's step: epoch before + 10, 490 s left.
func TestBootClockOneMeasurement(t *testing.T) {
	const lifetime = 600 * time.Second
	c := &stepClocks{}
	c.wall.Store(time.Date(2026, 12, 4, 20, 0, 0, 0, time.UTC).UnixNano())
	h, k, b, deps := bootHarness(t, c)
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 8080, 0, lifetime, 1)), pcp.Success)
	c.advance(100 * time.Second)
	before := h.s.Status().Epoch
	// kill -9; 10 s down, the wall clock stepped back 1 h meanwhile.
	c.advance(10 * time.Second)
	c.step(-time.Hour)
	if d := k.Unseen(h.st.State().EpochOrigin); d != -time.Hour {
		t.Fatalf("store.Open's measurement %v, want -1h", d)
	}
	b.unreadable.Store(true)
	h.startWith(deps, nil)
	checkContinued(t, h, c, before+10, lifetime-110*time.Second)
}

// TestBootClockAnchorRetry: a Save that failed at the start (the boot id
// unreadable a moment: the anchor removed) is tried again every tick, so
// a step made while pcpd is down later is measured: the epoch goes on,
// the lease keeps what it had left. Without the retry the restart found
// no anchor and counted the step back of 1 h (lease 1 h longer: clamped
// to its 600 s, doubtful, epoch reset to 0).
func TestBootClockAnchorRetry(t *testing.T) {
	const lifetime = 600 * time.Second
	c := &stepClocks{}
	c.wall.Store(time.Date(2026, 12, 4, 20, 0, 0, 0, time.UTC).UnixNano())
	h, _, b, deps := bootHarness(t, c)
	b.unreadable.Store(true)
	h.startWith(deps, nil) // Save fails
	b.unreadable.Store(false)
	h.s.checkClock() // a sweep tick
	h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 8080, 0, lifetime, 1)), pcp.Success)
	c.advance(100 * time.Second)
	before := h.s.Status().Epoch
	// kill -9; 10 s down, the wall clock stepped back 1 h meanwhile.
	c.advance(10 * time.Second)
	c.step(-time.Hour)
	h.startWith(deps, nil)
	checkContinued(t, h, c, before+10, lifetime-110*time.Second)
}

// checkContinued checks a restart that continued: the epoch went on to
// epoch, and every lease and its pinholes have left what they had.
func checkContinued(t *testing.T, h *harness, c *stepClocks, epoch pcp.Epoch, left time.Duration) {
	t.Helper()
	if st := h.s.Status(); !st.Restarted || st.Epoch != epoch {
		t.Errorf("epoch after the restart %d (continued %v), want %d", st.Epoch, st.Restarted, epoch)
	}
	for _, l := range h.s.Leases() {
		if got := l.Expires.Sub(c.Now()); got != left {
			t.Errorf("lease has %v left after the restart, want %v", got, left)
		}
	}
	for p, got := range h.fw.Holes() {
		if got != left {
			t.Errorf("pinhole %v re-installed with %v, want %v", p, got, left)
		}
	}
}

// blockedAnchor is a boot anchor in a directory pcpd cannot write for a
// while (and whose boot id it cannot read meanwhile): Save fails leaving
// the old anchor, Step cannot measure.
type blockedAnchor struct {
	k       *bootclock.Keeper
	blocked atomic.Bool
}

func (b *blockedAnchor) Step(origin time.Time) (time.Duration, error) {
	if b.blocked.Load() {
		return 0, fmt.Errorf("%w: boot id: permission denied", bootclock.ErrClock)
	}
	return b.k.Step(origin)
}

func (b *blockedAnchor) Save(run func() time.Time, origin time.Time) error {
	if b.blocked.Load() {
		return fmt.Errorf("read-only file system; %w", bootclock.ErrStale)
	}
	return b.k.Save(run, origin)
}

// TestBootClockStaleAnchor: a run that could not measure a step made
// before it (its boot id unreadable: ProcSubset=pid, a container without
// /proc/sys) runs on the wall clock as it is, and stores its leases in
// that frame; the anchor of the run before describes another one. Left
// in place (its Save failed too), the next start in the same boot (the
// boot id readable again) used it: the step was counted again, every
// lease the middle run wrote came back 40 s longer than it had (table,
// kernel), the epoch 40 s lower; a step over a minute made them all
// doubtful (epoch reset) and clamped up to their whole lifetime. Now a
// failed Save removes the old anchor, or, if it cannot (the directory
// not writable), the engine retries every tick. A restart with nothing
// between changes no lease's remaining lifetime and no epoch. "boot id
// unreadable" fails without Keeper.Save's removal (leases 9m0s and 6m30s
// left, pinholes too, after 8m20s and 5m50s; epoch 40 lower),
// "directory not writable, back before the kill" likewise without
// checkClock's retry.
func TestBootClockStaleAnchor(t *testing.T) {
	const (
		lifetime = 600 * time.Second
		step     = 40 * time.Second // forward, while down: under clockSlack
	)
	for _, tc := range []struct {
		name    string
		blocked bool // blockedAnchor, unblocked and a tick before the kill
	}{
		{name: "boot id unreadable"},
		{name: "directory not writable, back before the kill", blocked: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &stepClocks{}
			c.wall.Store(time.Date(2026, 12, 4, 20, 0, 0, 0, time.UTC).UnixNano())
			h, k, b, deps := bootHarness(t, c)
			h.expect(h.do(mapReq(addrA, pcp.ProtoTCP, 8080, 0, lifetime, 1)), pcp.Success)
			c.advance(100 * time.Second)
			// kill -9; the wall clock steps while pcpd is down; the
			// next run cannot measure it.
			c.advance(10 * time.Second)
			c.step(step)
			ba := &blockedAnchor{k: k}
			if tc.blocked {
				ba.blocked.Store(true)
				h.startWith(func(d *Deps) { c.deps(d); d.Boot = ba }, nil)
			} else {
				b.unreadable.Store(true)
				h.startWith(deps, nil)
			}
			h.expect(h.do(mapReq(addrB, pcp.ProtoTCP, 8081, 0, lifetime, 2)), pcp.Success)
			c.advance(100 * time.Second)
			if tc.blocked {
				ba.blocked.Store(false)
				h.s.checkClock() // a sweep tick
			}
			left := map[store.Key]time.Duration{}
			for _, l := range h.s.Leases() {
				left[l.Key] = l.Expires.Sub(c.Now())
			}
			epoch := h.s.Status().Epoch
			// kill -9, restart at once in the same boot, boot id readable.
			b.unreadable.Store(false)
			h.startWith(deps, nil)
			if st := h.s.Status(); !st.Restarted || st.Epoch != epoch {
				t.Errorf("epoch after the restart %d (continued %v), %d before it", st.Epoch, st.Restarted, epoch)
			}
			ls := h.s.Leases()
			if len(ls) != len(left) {
				t.Fatalf("%d leases after the restart, %d before", len(ls), len(left))
			}
			for _, l := range ls {
				if got, want := l.Expires.Sub(c.Now()), left[l.Key]; got != want {
					t.Errorf("lease %v has %v left after the restart, %v before", l.Key, got, want)
				}
			}
			// Each lease's one pinhole, re-installed with what it had left.
			var want, got []time.Duration
			for _, d := range left {
				want = append(want, d)
			}
			for _, d := range h.fw.Holes() {
				got = append(got, d)
			}
			slices.Sort(want)
			slices.Sort(got)
			if !slices.Equal(got, want) {
				t.Errorf("pinholes re-installed with %v, the leases had %v left before the restart", got, want)
			}
		})
	}
}

// TestBootClockRestartWallStepLab is TestBootClockUnseenStep end to end:
// the real store (its clock-doubt check included) and the kernel, the
// engine and store on a steppedClock whose wall clock is stepped while
// pcpd is stopped (the host's clock is not touched; the fake
// CLOCK_BOOTTIME is the steppedClock's monotonic one). After the restart
// the epoch goes on (by at most the real time elapsed, plus 1), the
// pinhole's kernel timeout is what is left of the 600 s lease, and it
// passes traffic. Without Deps.Boot and store.WithUnseenStep (lab.boot
// nil) the step back resets the epoch (the store: "clock doubtful") and
// the forward step counts 3600 s in it and ends the lease: both rows
// fail.
func TestBootClockRestartWallStepLab(t *testing.T) {
	for _, step := range []time.Duration{-time.Hour, time.Hour} {
		t.Run(step.String(), func(t *testing.T) {
			l := newLab(t, func(_ *Config, p *policy.Config) { p.MinLifetime = time.Second })
			clock := newSteppedClock()
			l.stop()
			// An epoch begun 1 h ago: a reset cannot hide in the bounds.
			db, _, err := store.Open(l.dir, zap.NewNop())
			if err != nil {
				t.Fatal(err)
			}
			if err := db.ResetEpoch(time.Now().Add(-time.Hour)); err != nil {
				t.Fatal(err)
			}
			db.Close()
			l.now, l.mono = clock.Now, clock.Mono
			l.boot = bootclock.New(l.dir, bootclock.Clocks{
				Wall:     clock.Now,
				Boottime: func() (time.Duration, error) { return clock.Mono() + time.Hour, nil },
				BootID:   func() (string, error) { return "8d1c2a4e-0000-4000-8000-00000000000a", nil },
			})
			l.start()
			svc := netip.AddrPortFrom(l.topo.ClientV6, 443)
			l.topo.Client.ServeTCP(t, svc.String())
			mapped := time.Now()
			resp := l.pcp(mapReq(svc.Addr(), pcp.ProtoTCP, svc.Port(), 0, 600*time.Second, 1))
			if resp.Result != pcp.Success || resp.Lifetime != 600*time.Second {
				t.Fatalf("MAP: %+v", resp)
			}
			before, at := l.srv.Status().Epoch, time.Now()
			l.stop()
			clock.step(step)
			l.start()
			st := l.srv.Status()
			elapsed := time.Since(at)
			if !st.Restarted || st.Epoch < before || time.Duration(st.Epoch-before)*time.Second > elapsed+time.Second {
				t.Errorf("epoch %d after the restart (continued %v), %d before, %v ago; wall clock stepped %v while stopped",
					st.Epoch, st.Restarted, before, elapsed.Round(time.Millisecond), step)
			}
			left, ok := l.kernelHas(svc)
			used := time.Since(mapped)
			if !ok || left > 600*time.Second-used+time.Second || left < 600*time.Second-used-2*time.Second {
				t.Errorf("kernel pinhole present %v with %v left, %v into a 600 s lease", ok, left, used.Round(time.Millisecond))
			}
			if !l.reach(svc) {
				t.Error("traffic refused after the restart")
			}
		})
	}
}

// bootRig is a state directory with stepped clocks and a boot anchor of
// one boot, as the tests of a restart in the same boot after a
// wall-clock step need.
type bootRig struct {
	c   *stepClocks
	dir string
	k   *bootclock.Keeper
}

// newBootRig starts the rig's clocks at 2026-12-04 20:00 UTC, in the boot
// bootID.
func newBootRig(t *testing.T, bootID string) *bootRig {
	c := &stepClocks{}
	c.wall.Store(time.Date(2026, 12, 4, 20, 0, 0, 0, time.UTC).UnixNano())
	b := &fakeBoot{c: c}
	b.id.Store(bootID)
	dir := t.TempDir()
	return &bootRig{c: c, dir: dir, k: bootclock.New(dir, bootclock.Clocks{Wall: c.Now, Boottime: b.Boottime, BootID: b.BootID})}
}

// start starts a harness on st (the rig's store, or a wrapper that fails
// it on demand) and state, with the rig's clocks and boot anchor.
func (r *bootRig) start(t *testing.T, st LeaseStore, state store.State) *harness {
	t.Helper()
	h := newHarness(t)
	r.startOn(h, r.k, st, state)
	return h
}

// startOn (re)starts the engine on h, as pcpd starting again on the same
// host does (h's firewall kept): the rig's clocks, boot as its boot anchor
// (the rig's, or a wrapper of it), st and state.
func (r *bootRig) startOn(h *harness, boot BootAnchor, st LeaseStore, state store.State) {
	h.t.Helper()
	h.startWith(func(d *Deps) {
		r.c.deps(d)
		d.Boot, d.Store, d.State = boot, st, state
	}, nil)
}

// startErrStore starts a harness on the rig's store (opened without the
// open snapshot, closed at the test's end) wrapped in an errStore, whose
// commits the test fails at will.
func (r *bootRig) startErrStore(t *testing.T) (*harness, *errStore) {
	t.Helper()
	st, state := r.open(t, store.WithoutOpenSnapshot())
	t.Cleanup(func() { st.Close() })
	fst := &errStore{Store: st}
	return r.start(t, fst, state), fst
}

// leasesLeft is the remaining lifetimes of h's leases at now, sorted.
func leasesLeft(h *harness, now time.Time) []time.Duration {
	var left []time.Duration
	for _, l := range h.s.Leases() {
		left = append(left, l.Expires.Sub(now))
	}
	slices.Sort(left)
	return left
}

// open opens the rig's store as pcpd does (the rig's clock, the anchor's
// unseen step, the leases streamed), with opts.
func (r *bootRig) open(t *testing.T, opts ...store.Option) (*store.Store, store.State) {
	t.Helper()
	st, state, err := store.Open(r.dir, zap.NewNop(),
		append([]store.Option{store.WithClock(r.c.Now), store.WithUnseenStep(r.k.Unseen), store.WithLeasesLater()}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	return st, state
}
