package server

import (
	"math"
	"time"

	"github.com/pcpd/pcpd/store"
)

// clockSlack is how far a restored lease may seem to reach beyond what any
// grant allows before the clock is doubted.
const clockSlack = time.Minute

// clampRestored caps a stored lease's expiry before it goes back into the
// kernel (LIFE-04): no lease can have more left than the maximum lifetime,
// nor more than it had when it was created (a renewal only comes later).
// With the clock behind (a reboot without RTC, NTP not yet synced) Expires
// − now is inflated, and an unclamped kernel timeout would let the pinhole
// outlive its lease by the clock's error. It reports whether the lease
// makes the clock doubtful, which resets the epoch (EPO-04). (A lowered
// --max-lifetime looks the same: clamping and a reset are right then too.)
func (s *Server) clampRestored(l *store.Lease, now time.Time) (doubtful bool) {
	left := l.Expires.Sub(now)
	maxLife := s.pol.ClampLifetime(math.MaxInt64) // the policy's maximum
	maxLeft := maxLife
	if !l.Created.IsZero() {
		maxLeft = min(maxLeft, l.Expires.Sub(l.Created))
		doubtful = l.Created.After(now.Add(clockSlack))
	}
	doubtful = doubtful || left > maxLife+clockSlack
	if left > maxLeft {
		l.Expires = now.Add(maxLeft)
	}
	return doubtful
}
