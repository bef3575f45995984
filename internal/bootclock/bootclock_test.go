package bootclock

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// fake is a machine whose wall clock steps and whose CLOCK_BOOTTIME does
// not.
type fake struct {
	wall time.Time
	boot time.Duration
	id   string
}

func (f *fake) clocks() Clocks {
	return Clocks{
		Wall:     func() time.Time { return f.wall },
		Boottime: func() (time.Duration, error) { return f.boot, nil },
		BootID:   func() (string, error) { return f.id, nil },
	}
}

func (f *fake) advance(d time.Duration) { f.wall = f.wall.Add(d); f.boot += d }

// TestStep: an anchor saved by one run and read by the next gives the
// wall clock's step since, measured by CLOCK_BOOTTIME; every reason not
// to trust it is its error.
func TestStep(t *testing.T) {
	t0 := time.Date(2026, 12, 5, 4, 0, 0, 0, time.UTC)
	origin := t0.Add(-time.Hour)
	for _, tc := range []struct {
		name    string
		between func(t *testing.T, f *fake, k *Keeper) // after Save, before Step
		origin  time.Time                              // Step's; zero: origin
		want    time.Duration
		err     error
	}{
		{name: "no step", between: func(t *testing.T, f *fake, k *Keeper) { f.advance(time.Minute) }},
		{name: "step back", want: -2 * time.Hour, between: func(t *testing.T, f *fake, k *Keeper) {
			f.advance(time.Minute)
			f.wall = f.wall.Add(-2 * time.Hour)
		}},
		{name: "step forward", want: 90 * time.Second, between: func(t *testing.T, f *fake, k *Keeper) {
			f.wall = f.wall.Add(90 * time.Second)
			f.advance(time.Minute)
		}},
		{name: "suspended: boot clock counted it", between: func(t *testing.T, f *fake, k *Keeper) { f.advance(8 * time.Hour) }},
		{name: "another boot", err: ErrOtherBoot, between: func(t *testing.T, f *fake, k *Keeper) {
			f.id, f.boot = "other", time.Second
		}},
		{name: "boot clock behind the anchor", err: ErrDamaged, between: func(t *testing.T, f *fake, k *Keeper) { f.boot -= time.Second }},
		{name: "another state", origin: origin.Add(time.Second), err: ErrMismatch},
		{name: "state without an origin", origin: time.Unix(0, 0), err: ErrMismatch},
		{name: "missing", err: ErrMissing, between: func(t *testing.T, f *fake, k *Keeper) {
			if err := os.Remove(k.Path()); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "empty", err: ErrDamaged, between: func(t *testing.T, f *fake, k *Keeper) { truncate(t, k, 0) }},
		{name: "truncated", err: ErrDamaged, between: func(t *testing.T, f *fake, k *Keeper) { truncate(t, k, 40) }},
		{name: "bit flipped", err: ErrDamaged, between: func(t *testing.T, f *fake, k *Keeper) {
			b, _ := os.ReadFile(k.Path())
			b[len(b)-20] ^= 1
			if err := os.WriteFile(k.Path(), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "unreadable", err: ErrDamaged, between: func(t *testing.T, f *fake, k *Keeper) {
			if err := os.Remove(k.Path()); err != nil {
				t.Fatal(err)
			}
			if err := os.Mkdir(k.Path(), 0o700); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &fake{wall: t0, boot: 3 * time.Hour, id: "b1"}
			dir := t.TempDir()
			k := New(dir, f.clocks())
			run := t0.Add(-400 * time.Millisecond) // the running clock, a little behind the wall
			if err := k.Save(func() time.Time { return run }, origin); err != nil {
				t.Fatal(err)
			}
			if tc.between != nil {
				tc.between(t, f, k)
			}
			o := origin
			if !tc.origin.IsZero() {
				o = tc.origin
				if o.Equal(time.Unix(0, 0)) {
					o = time.Time{}
				}
			}
			got, err := New(dir, f.clocks()).Step(o) // a new process's Keeper
			want := tc.want + 400*time.Millisecond
			if tc.err != nil {
				want = 0
			}
			if !errors.Is(err, tc.err) || got != want {
				t.Errorf("Step = %v, %v; want %v, %v", got, err, want, tc.err)
			}
			if tc.err == nil && k.Unseen(o) != want || tc.err != nil && k.Unseen(o) != 0 {
				t.Errorf("Unseen = %v, want %v", k.Unseen(o), want)
			}
			if _, err := os.Stat(k.Path() + ".tmp"); !os.IsNotExist(err) {
				t.Errorf("temporary file left: %v", err)
			}
		})
	}
}

// TestStepPaused: a measurement whose boot-clock readings stay apart (the
// goroutine, or the VM's thread, paused between them each time) gives no
// step, where the wall clock did not step: an error (the anchor is not
// used) or one within stepThreshold's 1 s. Before review h/revboot the
// midpoint was used anyway: a 4 s pause each time read as a step of +2 s
// (every lease 2 s longer after the rebase), one in Save as -2 s.
func TestStepPaused(t *testing.T) {
	for _, paused := range []string{"Step", "Save"} {
		t.Run(paused, func(t *testing.T) {
			wall, boot := time.Unix(1e9, 0), 3*time.Hour
			pause := false
			c := Clocks{
				Wall: func() time.Time { return wall },
				Boottime: func() (time.Duration, error) {
					b := boot
					if pause { // before the next reading
						boot += 4 * time.Second
						wall = wall.Add(4 * time.Second)
					}
					return b, nil
				},
				BootID: func() (string, error) { return "b1", nil },
			}
			k := New(t.TempDir(), c)
			origin := wall.Add(-time.Hour)
			pause = paused == "Save"
			serr := k.Save(func() time.Time { return wall }, origin)
			pause = paused == "Step"
			d, err := k.Step(origin)
			if serr == nil && err == nil && (d > time.Second || d < -time.Second) {
				t.Errorf("Step = %v with the %s paused 4 s between its readings; the wall clock did not step", d, paused)
			}
		})
	}
}

func truncate(t *testing.T, k *Keeper, n int64) {
	t.Helper()
	if err := os.Truncate(k.Path(), n); err != nil {
		t.Fatal(err)
	}
}

// TestSaveReplaces: a second Save replaces the anchor whole; a Save that
// cannot write removes the old one (it describes the last run's running
// clock, not the one this run stores its times by: kept, a later start
// restored those in the old frame, TestBootClockStaleAnchor), and says
// ErrStale if that fails too. Before review h/revboot a failed Save left
// the old anchor (the rows "temporary file blocked" and "boot id
// unreadable" fail then: "anchor left").
func TestSaveReplaces(t *testing.T) {
	for _, tc := range []struct {
		name  string
		block func(t *testing.T, f *fake, k *Keeper) // makes the second Save fail
		stale bool                                   // ErrStale: the old one cannot be removed
	}{
		{name: "temporary file blocked", block: func(t *testing.T, f *fake, k *Keeper) {
			if err := os.Mkdir(k.Path()+".tmp", 0o700); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "boot id unreadable", block: func(t *testing.T, f *fake, k *Keeper) { f.id = "" }},
		{name: "anchor not replaceable", stale: true, block: func(t *testing.T, f *fake, k *Keeper) {
			// A non-empty directory where the anchor is: neither
			// renamed over nor removed.
			if err := os.Remove(k.Path()); err != nil {
				t.Fatal(err)
			}
			if err := os.MkdirAll(filepath.Join(k.Path(), "x"), 0o700); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &fake{wall: time.Unix(1e9, 0), boot: time.Hour, id: "b1"}
			c := f.clocks()
			c.BootID = func() (string, error) {
				if f.id == "" {
					return "", errors.New("unreadable")
				}
				return f.id, nil
			}
			dir := t.TempDir()
			k := New(dir, c)
			o1, o2 := time.Unix(9e8, 0), time.Unix(9e8+5, 0)
			if err := k.Save(c.Wall, o1); err != nil {
				t.Fatal(err)
			}
			f.advance(time.Minute)
			if err := k.Save(c.Wall, o2); err != nil {
				t.Fatal(err)
			}
			a, err := k.Load()
			if err != nil || !a.Origin.Equal(o2) || a.Boot != time.Hour+time.Minute || a.BootID != "b1" || !a.Run.Equal(f.wall) {
				t.Fatalf("Load = %+v, %v", a, err)
			}
			tc.block(t, f, k)
			err = k.Save(c.Wall, o1)
			if err == nil || errors.Is(err, ErrStale) != tc.stale {
				t.Fatalf("blocked Save: %v, want an error (ErrStale %v)", err, tc.stale)
			}
			if a, err := k.Load(); !tc.stale && !errors.Is(err, ErrMissing) {
				t.Errorf("after a failed Save: anchor left (%+v, %v)", a, err)
			}
		})
	}
}

// TestSystem: this machine's boot id and CLOCK_BOOTTIME are readable, and
// an anchor saved on them is of this boot.
func TestSystem(t *testing.T) {
	c := System()
	id, err := c.BootID()
	if err != nil || id == "" {
		t.Fatalf("boot id %q: %v", id, err)
	}
	b1, err := c.Boottime()
	if err != nil || b1 <= 0 {
		t.Fatalf("boottime %v: %v", b1, err)
	}
	k := New(t.TempDir(), c)
	origin := time.Now().Add(-time.Hour)
	if err := k.Save(time.Now, origin); err != nil {
		t.Fatal(err)
	}
	if _, err := k.Step(origin); err != nil {
		t.Errorf("Step on this boot: %v", err)
	}
	if _, err := os.Stat(filepath.Join(k.dir, FileName)); err != nil {
		t.Error(err)
	}
}
