package server

import (
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// TestPacketLogSamplesOnSteadyClock: the per-packet logger's one-second
// sampling windows follow the steady clock, not the wall clock, and its
// lines still carry the wall time. With zap's sampler timed on the wall
// clock, a step back of 1 h kept the first window open for the hour:
// after its first 20 lines, one in 1000 was logged (the "step back" row
// logs 0 of its second 30, want 20); a step forward opened a new window
// at once (the "step forward" row logs 20 more, want 0).
func TestPacketLogSamplesOnSteadyClock(t *testing.T) {
	start := time.Date(2026, 12, 5, 12, 0, 0, 0, time.UTC)
	for _, c := range []struct {
		name          string
		wallStep      time.Duration // between the two bursts
		steadyAdvance time.Duration
		want          int // lines logged of the second burst of 30
	}{
		{"step back 1 h, a second later", -time.Hour, 1100 * time.Millisecond, packetLogFirst},
		{"step forward 1 h, same second", time.Hour, 100 * time.Millisecond, 0},
		{"no step, a second later", 1100 * time.Millisecond, 1100 * time.Millisecond, packetLogFirst},
		{"no step, same second", 100 * time.Millisecond, 100 * time.Millisecond, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			var wall, steady atomic.Int64
			wall.Store(start.UnixNano())
			steady.Store(start.UnixNano())
			wallNow := func() time.Time { return time.Unix(0, wall.Load()) }
			steadyNow := func() time.Time { return time.Unix(0, steady.Load()) }
			core, logs := observer.New(zapcore.DebugLevel)
			log := packetLogger(zap.New(core), steadyNow, wallNow).With(zap.String("iface", "wg0"))
			burst := func() int {
				n := logs.Len()
				for range 30 {
					log.Debug("dropped: rate limit")
				}
				return logs.Len() - n
			}
			if got := burst(); got != packetLogFirst {
				t.Fatalf("first burst: %d lines logged, want %d", got, packetLogFirst)
			}
			wall.Add(int64(c.wallStep))
			steady.Add(int64(c.steadyAdvance))
			if got := burst(); got != c.want {
				t.Errorf("second burst, wall %+v, steady %+v: %d lines logged, want %d", c.wallStep, c.steadyAdvance, got, c.want)
			}
			all := logs.All()
			if last := all[len(all)-1]; !last.Time.Equal(wallNow()) && c.want > 0 {
				t.Errorf("a line logged after the step carries %v, want the wall clock's %v", last.Time, wallNow())
			}
			if first := all[0]; !first.Time.Equal(start) {
				t.Errorf("the first line carries %v, want the wall clock's %v", first.Time, start)
			}
		})
	}
}
