package server

import (
	"time"

	"github.com/pcpd/pcpd/pcp"
)

// epochClock is the one shared PCP epoch (EPO-01): seconds since origin,
// +1 per second (EPO-02). origin carries the monotonic reading of the
// moment it was set, so a wall-clock step never moves the epoch.
type epochClock struct {
	origin time.Time
}

// resume continues an epoch whose origin was persisted as wall time
// (EPO-04). It reports false when the origin is not believable (in the
// future, or unset): the caller must reset.
func (e *epochClock) resume(origin, now time.Time) bool {
	if origin.IsZero() || origin.After(now) {
		return false
	}
	// now.Sub(origin) uses wall time (origin came from disk); the result
	// keeps now's monotonic reading for every later subtraction.
	e.origin = now.Add(-now.Sub(origin))
	return true
}

// reset starts the epoch at 0 now (EPO-03).
func (e *epochClock) reset(now time.Time) { e.origin = now }

// at is the epoch value at now.
func (e *epochClock) at(now time.Time) pcp.Epoch {
	d := now.Sub(e.origin)
	if d < 0 {
		return 0
	}
	return pcp.Epoch(d / time.Second)
}
