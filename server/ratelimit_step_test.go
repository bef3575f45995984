package server

import (
	"net/netip"
	"testing"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/policy"
)

// TestRateLimiterEvictionAfterStepBack: a full set of the per-source
// limiter evicts the entry with the oldest last use. Its clock used to be
// the running clock, which the rebase after a wall-clock step moves
// (clock.go): after a step back every entry made before it looked newer
// than any made since, so the idle pre-step sources were never evicted
// (for as long as the step) and the new sources evicted each other, each
// coming back with a fresh burst. Two sources taking turns then got a
// burst each turn; with no step the second evicts an idle source and the
// first stays limited. The readers' clock is now the steady one.
func TestRateLimiterEvictionAfterStepBack(t *testing.T) {
	for _, step := range []time.Duration{0, -time.Hour} {
		c := &stepClocks{}
		c.wall.Store(time.Date(2026, 12, 4, 20, 0, 0, 0, time.UTC).UnixNano())
		// One set of 4; a token, no refill to speak of.
		h := runClockHarness(t, c, func(cfg *Config, _ *policy.Config) { cfg.RateLimit, cfg.RateBurst, cfg.RateSources = 1e-6, 1, 4 })
		clock := h.s.lis.clock // what the readers pass to admit
		ann := pcp.AppendRequest(nil, pcp.NewAnnounce(addrA))
		for _, s := range []string{"2001:db8:1::1", "2001:db8:2::1", "2001:db8:3::1", "2001:db8:4::1"} {
			h.s.admit(ann, netip.AddrPortFrom(netip.MustParseAddr(s), 5000), 0, clock()) // idle from now on
			c.advance(time.Millisecond)
		}
		c.step(step)
		h.s.checkClock() // the engine rebases
		c.advance(time.Second)
		e := netip.AddrPortFrom(netip.MustParseAddr("2001:db8:e::1"), 5000)
		f := netip.AddrPortFrom(netip.MustParseAddr("2001:db8:f::1"), 5000)
		allowed := 0
		for i := range 10 {
			c.advance(time.Millisecond)
			src := e
			if i%2 == 1 {
				src = f
			}
			if h.s.admit(ann, src, 0, clock()) == "" {
				allowed++
			}
		}
		if allowed != 2 {
			t.Errorf("clock stepped %v: two sources taking turns 10 times at a burst of 1: %d allowed, want 2", step, allowed)
		}
	}
}

// TestHandleAdmitAfterStepBack: the engine admits the requests the readers
// did not (Request.admitted false) with the same per-source bucket, at the
// batch's time on the running clock converted to the readers' steady
// clock (steadyAt). On the running clock itself, a rebase after a step
// back put the engine's time an hour behind the readers' entries: no
// refill for the source until the clock had caught up, an hour.
func TestHandleAdmitAfterStepBack(t *testing.T) {
	for _, step := range []time.Duration{0, -time.Hour, time.Hour} {
		c := &stepClocks{}
		c.wall.Store(time.Date(2026, 12, 4, 20, 0, 0, 0, time.UTC).UnixNano())
		h := runClockHarness(t, c, func(cfg *Config, _ *policy.Config) { cfg.RateLimit, cfg.RateBurst = 1, 1 })
		c.advance(time.Second)
		c.step(step)
		h.s.checkClock() // the engine rebases
		src := netip.AddrPortFrom(addrA, 5000)
		ann := pcp.AppendRequest(nil, pcp.NewAnnounce(addrA))
		if h.s.admit(ann, src, 0, h.s.lis.clock()) != "" { // a reader: the bucket's one token
			t.Fatalf("step %v: first request refused", step)
		}
		c.advance(1500 * time.Millisecond) // a token back at 1/s
		handled := 0
		for range 2 {
			rs := h.s.HandleBatch([]Request{{Local: local6, Source: src, Data: ann}})
			if rs[0] != nil {
				handled++
			}
		}
		if handled != 1 {
			t.Errorf("step %v: 1.5 s after the reader spent the only token at 1/s, the engine answered %d of 2 requests, want 1", step, handled)
		}
	}
}
