package server

import (
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// stepClocks is a wall clock (Now) that steps and a monotonic clock (Mono)
// that does not, both moved by hand.
type stepClocks struct {
	wall atomic.Int64 // Unix ns
	mono atomic.Int64
}

func (c *stepClocks) Now() time.Time          { return time.Unix(0, c.wall.Load()).UTC() }
func (c *stepClocks) Mono() time.Duration     { return time.Duration(c.mono.Load()) }
func (c *stepClocks) advance(d time.Duration) { c.wall.Add(int64(d)); c.mono.Add(int64(d)) }
func (c *stepClocks) step(d time.Duration)    { c.wall.Add(int64(d)) }

// runClockHarness is newHarness's server on the running clock of c (Deps.Mono
// set, as in production where both default to the runtime's clocks).
func runClockHarness(t *testing.T, c *stepClocks, opts ...option) *harness {
	t.Helper()
	h := newHarness(t, opts...)
	h.startWith(c.deps, nil)
	return h
}

func announceEpoch(t *testing.T, b []byte) pcp.Epoch {
	t.Helper()
	var r pcp.Response
	if err := pcp.ParseResponse(b, &r); err != nil {
		t.Fatalf("early ANNOUNCE reply: %v", err)
	}
	return r.Epoch
}

// TestEarlyEpochWallStep: the socket readers answer ANNOUNCE (and their
// early errors) with the epoch at the time they pass, the wall clock
// (listen.go: now := time.Now()). The epoch origin used to carry a
// monotonic reading, so that was step-immune; on the running clock
// (clock.go) the origin is a plain wall time, so between a wall-clock step
// and the engine's rebase (up to a sweep tick, 125 ms, longer while the
// engine is busy) the early answers carry the epoch moved by the step: 0
// after a step back longer than the uptime, +3600 after an hour forward,
// while the engine answers 100. A client that sees the epoch go back
// (RFC 6887 §8.5) re-creates all its mappings; after a forward jump the
// next right epoch looks like a reset. The readers now pass their steady
// clock (listener.clock, Server.steady), and early answers the epoch at
// the running clock's reading that corresponds to it (epochAt); the test
// passes what the readers pass.
func TestEarlyEpochWallStep(t *testing.T) {
	for _, step := range []time.Duration{-time.Hour, time.Hour, -5 * time.Second} {
		c := &stepClocks{}
		c.wall.Store(time.Date(2026, 12, 4, 20, 0, 0, 0, time.UTC).UnixNano())
		h := runClockHarness(t, c)
		c.advance(100 * time.Second)
		src := netip.AddrPortFrom(addrA, 40000)
		ann := pcp.AppendRequest(nil, pcp.NewAnnounce(addrA))
		before, _ := h.s.early(nil, ann, src, h.s.lis.clock())
		want := announceEpoch(t, before)
		r0 := h.s.lis.clock()
		c.step(step) // not seen yet: no sweep tick since
		h.s.mu.Lock()
		engine := h.s.epoch.at(h.s.now())
		h.s.mu.Unlock()
		got, handled := h.s.early(nil, ann, src, h.s.lis.clock())
		if !handled {
			t.Fatalf("step %v: ANNOUNCE not answered early", step)
		}
		if e := announceEpoch(t, got); engine != want || e != want {
			t.Errorf("step %v not yet rebased: early ANNOUNCE epoch %d, engine's %d, want both %d (as before the step)", step, e, engine, want)
		}
		h.s.checkClock() // the next sweep tick
		got, _ = h.s.early(nil, ann, src, h.s.lis.clock())
		if e := announceEpoch(t, got); e != want {
			t.Errorf("step %v, rebased: early ANNOUNCE epoch %d, want %d", step, e, want)
		}
		// The readers' clock is not the wall clock, and the rebase does
		// not move it either (the owner gate and buckets measure
		// durations on it: TestOwnerGateClockStepBack).
		if d := h.s.lis.clock().Sub(r0); d != 0 {
			t.Errorf("step %v: the readers' clock moved %v across the step and its rebase, no time passing", step, d)
		}
	}
}

// TestEarlyEpochRebaseRace: rebase (engine, under s.mu) writes the epoch
// origin that the socket readers read without a lock (early's epoch.at):
// a data race, a torn time.Time (wall, ext, loc) read. Fails under -race.
// The origin is now an atomic, and epochAt reads it with the rebases'
// shift under a sequence lock (clock.go).
func TestEarlyEpochRebaseRace(t *testing.T) {
	if !raceEnabled {
		t.Skip("needs -race")
	}
	c := &stepClocks{}
	c.wall.Store(time.Date(2026, 12, 4, 20, 0, 0, 0, time.UTC).UnixNano())
	h := runClockHarness(t, c)
	ann := pcp.AppendRequest(nil, pcp.NewAnnounce(addrA))
	src := netip.AddrPortFrom(addrA, 40000)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // a socket reader
		defer wg.Done()
		for range 200 {
			h.s.early(nil, ann, src, h.s.lis.clock())
		}
	}()
	for range 20 { // the engine's sweep ticks, each seeing a step
		c.step(2 * time.Second)
		h.s.checkClock()
	}
	wg.Wait()
}
