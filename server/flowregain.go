package server

import (
	"errors"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/pinhole"
)

// Regaining the record (pinhole/flowedlife.go). Once untrusted (an
// upgrade, a failed add, damage, a flush of flowed6 by hand), the record
// was untrusted for good and every delete walked conntrack (≈ 9 ms of a
// core each) until the table was deleted by hand. Now each firewall
// check that found the layout intact asks the recorder to rebuild it
// (FlowRegainer.RegainFlowed: one read of conntrack); failed, the next
// tries are 1, 2, 4 ... 64 checks apart. Trusted, it is rebuilt anyway
// every flowedRebuildEvery (counted from the first check after a start):
// addresses whose last lease ended while the record was untrusted, or
// before a restart, leave the set then, so it does not drift to full.

// flowedRebuildEvery is how often a trusted record is rebuilt.
const flowedRebuildEvery = time.Hour

// maxRegainSkip bounds the checks skipped after failed rebuilds.
const maxRegainSkip = 64

// regain is regainFlowed's state, the checker's goroutine's own.
type regain struct {
	skip, wait int
	last       time.Time // the last rebuild asked that left the record trusted
}

// regainFlowed is a firewall check's (checkFirewall: the layout found
// intact) turn at the record.
func (s *Server) regainFlowed() {
	g, ok := s.recorder.(FlowRegainer)
	if !ok {
		return
	}
	r := &s.regain
	if r.skip > 0 {
		r.skip--
		return
	}
	if r.last.IsZero() {
		r.last = time.Now() // the first rebuild of a trusted record an hour after the start
	}
	rebuild := time.Since(r.last) >= flowedRebuildEvery
	if !g.FlowedTrusted() {
		// Filters left out since this check started may have been
		// left out over what made the record untrusted (a flush of
		// flowed6 the watch told after their skip): a rebuild that
		// trusts now would have the next check's release drop them
		// unwalked (review h/revlife). Walked now, as release does
		// for a record untrusted at a check's end.
		s.walkUnflowed()
	}
	start := time.Now()
	trusted, err := g.RegainFlowed(rebuild)
	switch {
	case trusted:
		r.wait = 0
		if rebuild {
			r.last = time.Now()
		}
		s.log.Debug("flowed6 record trusted", zap.Bool("rebuilt", rebuild), zap.Duration("took", time.Since(start)))
	case errors.Is(err, pinhole.ErrRegainNotNow):
	default:
		r.wait = min(max(1, 2*r.wait), maxRegainSkip)
		r.skip = r.wait
		s.log.Info("flowed6 record not trusted yet; conntrack walks run for every ended mapping", zap.Error(err),
			zap.Int("next_in_checks", r.wait))
	}
}
