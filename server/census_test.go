package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/policy"
	"github.com/pcpd/pcpd/store"
)

// censusRestart restarts a harness holding streamStartLeases through
// State.Stream with a Census of them (tweak may change it; nil census:
// none), and returns it with how many passes Start read the leases in.
func censusRestart(t *testing.T, tweak func(c *Census, now time.Time) *Census) (*harness, int) {
	t.Helper()
	h := newHarness(t, func(_ *Config, p *policy.Config) {
		p.DenyPorts = []policy.PortRange{{First: 22, Last: 22}}
	})
	if err := h.st.Commit(streamStartLeases(h.clock.Now()), nil); err != nil {
		t.Fatal(err)
	}
	passes := 0
	h.startWith(func(d *Deps) {
		ls := d.State.Leases
		c := NewCensus(h.cfg, h.clock.Now())
		c.Add(&store.Lease{Key: store.Key{Owner: "counted before a start over"}})
		c.Add(nil) // store.WithCensus: another file's check starts
		for i := range ls {
			c.Add(&ls[i])
		}
		if tweak != nil {
			c = tweak(c, h.clock.Now())
		}
		d.Census = c
		read := scratchStream(ls, 0)
		d.State.Stream = func(fn func(*store.Lease) error) error { passes++; return read(fn) }
		d.State.Leases = nil
	}, nil)
	return h, passes
}

// TestRestoreCensusOnePass: with the census store.Open took as it checked
// the stored leases (Deps.Census, store.WithCensus), Start reads them once
// (the adding pass), not twice (presize's sizing pass, 0.7-1.0 s of a 1M
// start on the bench machine: BENCHMARKS.md item 62), sizes the table and
// drop buffers as presize does, and ends as a start without it: the same
// table, store, quarantines and pinholes, every lease's fate the same
// (kept, expired, moved, refused). A census that does not fit (another
// external IPv4, taken long before the restore's clock) is not used: two
// passes, same end. Before the census, a streamed start always took two.
func TestRestoreCensusOnePass(t *testing.T) {
	base, basePasses := censusRestart(t, func(*Census, time.Time) *Census { return nil })
	if basePasses != 2 {
		t.Fatalf("without a census: %d passes over the stored leases, want 2 (presize, add)", basePasses)
	}
	for _, c := range []struct {
		name   string
		tweak  func(*Census, time.Time) *Census
		passes int
	}{
		{"census", nil, 1},
		{"other external IPv4", func(c *Census, _ time.Time) *Census {
			c.ext4 = netip.MustParseAddr("198.51.100.77")
			return c
		}, 2},
		{"taken long before", func(c *Census, now time.Time) *Census {
			c.now = now.Add(-censusAge - time.Second)
			return c
		}, 2},
		{"taken after the restore's clock", func(c *Census, now time.Time) *Census {
			c.now = now.Add(time.Second)
			return c
		}, 2},
	} {
		t.Run(c.name, func(t *testing.T) {
			h, passes := censusRestart(t, c.tweak)
			if passes != c.passes {
				t.Errorf("%d passes over the stored leases, want %d", passes, c.passes)
			}
			if h.s.deps.Census != nil {
				t.Error("the census is kept after the start")
			}
			sameRestart(t, base, h, "(-presize pass +"+c.name+")",
				restartPart{"key index buckets", len(base.s.tab.byKey.b), len(h.s.tab.byKey.b)},
				restartPart{"expiry heap capacity", cap(base.s.tab.exp), cap(h.s.tab.exp)},
				restartPart{"record pages capacity", cap(base.s.tab.pages), cap(h.s.tab.pages)})
		})
	}
}

// TestCensusCounts: a census counts as presize does: every lease, those
// expired or moved, and their connection filters (none with
// KeepConnections); Add(nil) starts over.
func TestCensusCounts(t *testing.T) {
	h := newHarness(t, func(*Config, *policy.Config) {})
	now := h.clock.Now()
	ls := streamStartLeases(now)
	for _, keep := range []bool{false, true} {
		cfg := h.cfg
		cfg.KeepConnections = keep
		c := NewCensus(cfg, now)
		for i := range ls {
			c.Add(&ls[i])
		}
		c.Add(nil)
		for i := range ls {
			c.Add(&ls[i])
		}
		r := &restoring{s: &Server{cfg: cfg, tab: newTable()}, now: now, ctx: t.Context()}
		var n, drops, ends int
		if err := r.presize(eachOf(ls)); err != nil {
			t.Fatal(err)
		}
		n = len(ls)
		for i := range ls {
			if r.expiredOrMoved(&ls[i]) {
				drops++
			}
		}
		ends = cap(r.expEnds)
		if c.n != n || c.drops != drops || c.ends != ends {
			t.Errorf("keep %v: census n %d drops %d ends %d, want %d %d %d (presize)", keep, c.n, c.drops, c.ends, n, drops, ends)
		}
		if drops != 3 || keep == (ends > 0) {
			t.Errorf("keep %v: %d drops %d ends: the fixture has 3 expired or moved leases, each with a connection to end", keep, drops, ends)
		}
	}
}
