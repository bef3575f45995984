package server

import (
	"sync/atomic"
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// epochClock is the one shared PCP epoch (EPO-01): seconds since origin,
// +1 per second (EPO-02). origin is a time of the engine's running clock
// (clock.go), which no wall-clock step moves: a rebase moves the running
// clock and origin by the same step. It is an atomic (Unix nanoseconds, 0:
// unset) because the socket readers read it without s.mu (early) while
// the engine's rebase writes it.
type epochClock struct {
	origin atomic.Int64
}

// resume continues an epoch whose origin was persisted as wall time
// (EPO-04). It reports false when the origin is not believable (in the
// future, or unset): the caller must reset.
func (e *epochClock) resume(origin, now time.Time) bool {
	if origin.IsZero() || origin.After(now) {
		return false
	}
	e.origin.Store(origin.UnixNano())
	return true
}

// reset starts the epoch at 0 now (EPO-03).
func (e *epochClock) reset(now time.Time) { e.origin.Store(now.UnixNano()) }

// get returns the origin, and whether there is one.
func (e *epochClock) get() (time.Time, bool) {
	o := e.origin.Load()
	if o == 0 {
		return time.Time{}, false
	}
	return time.Unix(0, o), true
}

// at is the epoch value at now, a reading of the running clock.
func (e *epochClock) at(now time.Time) pcp.Epoch { return e.atNs(now.UnixNano()) }

// atNs is at for Unix nanoseconds.
func (e *epochClock) atNs(now int64) pcp.Epoch {
	d := now - e.origin.Load()
	if d < 0 {
		return 0
	}
	return pcp.Epoch(d / int64(time.Second))
}
