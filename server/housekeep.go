package server

import (
	"context"
	"time"

	"go.uber.org/zap"
)

// storeDebtRetry is how often housekeep retries writing the store's debt
// (Server.storeDebt); a variable for tests.
var storeDebtRetry = 5 * time.Second

// housekeep keeps the store's liveness mark and backup copy fresh while
// the engine serves: Touch every TouchInterval, so a clock that went
// backwards while pcpd was down is noticed at the next start instead of
// continuing the epoch from a bogus origin (EPO-04); Snapshot every
// SnapshotInterval, once the store's rewrite after a wall-clock step is
// done (the copy held the old frame's times: rewriteStep) and once more
// when ctx ends (graceful shutdown), so the copy a damaged state file is
// restored from is recent. It also rescans the host's ports every
// hostPortsTTL while IPv4 ports are being allocated, so the engine does
// not wait for that dump, and every storeDebtRetry writes the leases the
// store could not be told about (payStoreDebt), so a debt does not wait
// for the next request, and bounds the record of ended NAT mappings
// (pruneNATPrior: a conntrack dump once it doubled). All of it runs here, off the engine loop: a
// Snapshot copies the whole file, and the store lets commits go on
// meanwhile. Stores without Touch or Snapshot are left alone.
func (s *Server) housekeep(ctx context.Context) {
	toucher, _ := s.st.(Toucher)
	snap, _ := s.st.(Snapshotter)
	s.hostPorts.setBackground(true)
	defer s.hostPorts.setBackground(false)
	ports := time.NewTicker(s.hostPorts.ttl())
	defer ports.Stop()
	debt := time.NewTicker(storeDebtRetry)
	defer debt.Stop()
	var touchC, backupC <-chan time.Time
	if toucher != nil {
		touch := time.NewTicker(s.cfg.TouchInterval)
		defer touch.Stop()
		touchC = touch.C
	}
	if snap != nil {
		backup := time.NewTicker(s.cfg.SnapshotInterval)
		defer backup.Stop()
		backupC = backup.C
	}
	snapshot := func(why string) {
		if snap == nil {
			return
		}
		if err := snap.Snapshot(); err != nil {
			s.log.Warn("cannot write the state backup copy", zap.String("when", why), zap.Error(err))
			return
		}
		s.log.Debug("state backup copy written", zap.String("when", why))
	}
	for {
		select {
		case <-ctx.Done():
			snapshot("shutdown")
			return
		case <-ports.C:
			s.hostPorts.refresh()
			s.endForwarded() // PREFER_FAILURE MAPs and PEERs off forwarded ports (forwardend.go)
		case <-s.hostPorts.kick:
			s.hostPorts.onKick()
			s.endForwarded() // the kicked read may have found a new forward
		case <-debt.C:
			s.payStoreDebt()
			s.pruneNATPrior()
		case <-touchC:
			if err := toucher.Touch(s.now()); err != nil {
				s.log.Warn("cannot record that the daemon is alive; a clock step while down may go unnoticed", zap.Error(err))
			}
		case <-backupC:
			snapshot("periodic")
		case <-s.rebased:
			snapshot("after a wall-clock step")
		}
	}
}
