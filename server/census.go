package server

import (
	"net/netip"
	"time"

	"github.com/pcpd/pcpd/store"
)

// Census counts the stored leases while store.Open checks them (pass Add
// to store.WithCensus, and the Census to Deps.Census): how many, and how
// many the restore will drop as expired or moved, with their connections
// to end. Start sizes the lease table and its drop buffers from it
// (restoring.size) instead of reading every stored lease once more for
// that (restoring.presize): at 1 000 000 leases that pass took 0.7-1.0 s
// of the 9 s start on the bench machine (BENCHMARKS.md item 62). The
// counts only size buffers: a lease that expires between the census and
// the restore is dropped all the same, into buffers that then grow.
type Census struct {
	now  time.Time
	ext4 netip.Addr
	keep bool
	// n leases, drops of them expired or moved, ends connection filters
	// of those (none with KeepConnections).
	n, drops, ends int
}

// censusAge is how far before the restore's clock reading a census may
// have been taken and still size it (beyond: a clock step seen at the
// start moves the restore's frame; presize reads the leases instead).
const censusAge = time.Minute

// NewCensus is a census of leases as a Server with cfg restores them at
// about now (the wall clock: the restore reads its own).
func NewCensus(cfg Config, now time.Time) *Census {
	return &Census{now: now, ext4: cfg.ExternalIPv4.Unmap(), keep: cfg.KeepConnections}
}

// Add counts l; nil starts over (store.WithCensus: a check of another
// file). l is not kept.
func (c *Census) Add(l *store.Lease) {
	if l == nil {
		c.n, c.drops, c.ends = 0, 0, 0
		return
	}
	c.n++
	if expiredOrMoved(l, c.now, c.ext4) {
		c.drops++
		if !c.keep {
			var scratch [2]ctFilter // appendCtFilters adds at most two
			c.ends += len(appendCtFilters(scratch[:0], l))
		}
	}
}

// fits reports whether c may size the restore of s at now: taken with
// s's external IPv4 and connection policy, at most censusAge before now.
func (c *Census) fits(s *Server, now time.Time) bool {
	return c != nil && c.n > 0 && c.ext4 == s.cfg.ExternalIPv4 && c.keep == s.cfg.KeepConnections &&
		!c.now.After(now) && now.Sub(c.now) <= censusAge
}
