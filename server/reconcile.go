package server

import (
	"fmt"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/store"
)

// restore brings the kernel in line with the stored leases before anything
// is served: expired leases are dropped, missing pinholes re-added, stale
// timeouts refreshed, and pinholes of ours that no lease explains removed.
// The epoch continues only if every live lease is back in the kernel and
// the store vouches for its state (EPO-04); otherwise it resets (EPO-03)
// and clients learn of it from the unsolicited ANNOUNCE (ANN-03).
func (s *Server) restore() error {
	now := s.now()
	st := s.deps.State
	s.started = now
	lost := st.Fresh
	why := "fresh or recovered state"
	if st.Recovered != "" {
		s.log.Warn("store recovered", zap.String("detail", st.Recovered))
	}
	if err := s.fw.Setup(); err != nil {
		return fmt.Errorf("server: firewall setup: %w", err)
	}
	s.updateProtected()

	var live []store.Lease
	var expired []store.Key
	moved := 0
	for _, l := range st.Leases {
		switch {
		case !l.Expires.After(now):
			expired = append(expired, l.Key)
		case l.ExternalAddr.Is4() && l.ExternalAddr != s.cfg.ExternalIPv4:
			// The external IPv4 changed (or is gone): these mappings
			// cannot be kept, which is a loss of mapping state (EPO-03).
			expired = append(expired, l.Key)
			moved++
		default:
			live = append(live, l)
		}
	}
	if moved > 0 {
		lost, why = true, "external IPv4 address changed"
	}
	kept, ok := s.reconcile(live, now)
	if !ok {
		lost, why = true, "some leases could not be restored into the kernel"
	}
	var drop []store.Key
	drop = append(drop, expired...)
	for _, l := range live {
		if !slices.ContainsFunc(kept, func(k store.Lease) bool { return k.Key == l.Key }) {
			drop = append(drop, l.Key)
		}
	}
	if len(drop) > 0 {
		if err := s.st.Commit(nil, drop); err != nil {
			s.log.Warn("cannot drop expired or unrestorable leases from the store", zap.Error(err))
		}
	}
	for _, l := range kept {
		s.tab.put(l)
	}
	if !lost && s.epoch.resume(st.EpochOrigin, now) {
		s.restarted = true
		s.log.Info("state restored; epoch continues", zap.Int("leases", len(kept)), zap.Int("expired", len(expired)),
			zap.Uint32("epoch", uint32(s.epoch.at(now))))
	} else {
		if !lost {
			why = "stored epoch origin is not believable (clock?)"
		}
		s.epoch.reset(now)
		if err := s.st.ResetEpoch(now); err != nil {
			return fmt.Errorf("server: reset epoch: %w", err)
		}
		s.log.Warn("mapping state lost or doubtful: epoch reset to 0", zap.String("why", why), zap.Int("leases", len(kept)))
	}
	return nil
}

// maxOrphanTargets bounds the addresses announced to from orphan pinholes.
const maxOrphanTargets = 4096

// reconcile makes the kernel hold exactly the pinholes of leases, with
// their remaining lifetimes. It returns the leases it could put in place
// and whether all could.
func (s *Server) reconcile(leases []store.Lease, now time.Time) ([]store.Lease, bool) {
	want := map[pinhole.Pinhole]time.Duration{}
	for i := range leases {
		for _, p := range pinholesOf(&leases[i]) {
			want[p] = max(want[p], leases[i].Expires.Sub(now))
		}
	}
	have, err := s.fw.List()
	if err != nil {
		s.log.Warn("cannot list the kernel's pinholes; re-installing all", zap.Error(err))
	}
	var ops []pinhole.Op
	for _, e := range have {
		if _, ok := want[e.Pinhole]; !ok {
			ops = append(ops, pinhole.Op{Kind: pinhole.Delete, Pinhole: e.Pinhole})
		}
	}
	orphans := len(ops)
	// Pinholes nobody's lease explains belonged to clients whose state we
	// lost (or whose leases ended while pcpd was down): they are told by
	// the unsolicited ANNOUNCE, which is all they need to re-map (ANN-03).
	for _, op := range ops {
		a := op.Pinhole.InternalAddr
		if !slices.Contains(s.orphans, a) && len(s.orphans) < maxOrphanTargets {
			s.orphans = append(s.orphans, a)
		}
	}
	for i := range leases {
		for _, p := range pinholesOf(&leases[i]) {
			ops = append(ops, pinhole.Op{Kind: pinhole.Install, Pinhole: p, Timeout: want[p]})
		}
	}
	if len(ops) == 0 {
		return leases, true
	}
	if err := s.applyAtomic(ops, nil); err == nil {
		if orphans > 0 {
			s.log.Info("removed pinholes no lease explains", zap.Int("count", orphans))
		}
		return leases, true
	} else {
		s.log.Warn("restoring all pinholes in one transaction failed; trying lease by lease", zap.Error(err))
	}
	if orphans > 0 {
		if err := s.applyAll(ops[:orphans]); err != nil {
			s.log.Error("cannot remove orphan pinholes", zap.Error(err))
		}
	}
	var kept []store.Lease
	for i := range leases {
		var lops []pinhole.Op
		for _, p := range pinholesOf(&leases[i]) {
			lops = append(lops, pinhole.Op{Kind: pinhole.Install, Pinhole: p, Timeout: want[p]})
		}
		if err := s.fw.Apply(lops); err != nil {
			s.log.Error("cannot restore lease; dropped", append(leaseFields(&leases[i], leases[i].ClientAddr), zap.Error(err))...)
			continue
		}
		kept = append(kept, leases[i])
	}
	return kept, len(kept) == len(leases)
}

// checkFirewall restores pcpd's nftables objects and pinholes when someone
// deleted or damaged them (tamper watch): Healthy, and a comparison of the
// kernel's pinholes with the lease table.
func (s *Server) checkFirewall() {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	s.expireLocked(now)
	herr := s.fw.Healthy()
	if herr != nil {
		s.log.Warn("firewall objects damaged or missing; restoring", zap.Error(herr))
		if err := s.fw.Setup(); err != nil {
			s.log.Error("cannot restore firewall objects", zap.Error(err))
			return
		}
		s.protected = nil
		s.updateProtected()
	}
	have, err := s.fw.List()
	if err != nil {
		s.log.Warn("cannot list pinholes", zap.Error(err))
		return
	}
	present := make(map[pinhole.Pinhole]bool, len(have))
	for _, e := range have {
		present[e.Pinhole] = true
	}
	var ops []pinhole.Op
	for _, l := range s.tab.byKey {
		for _, p := range pinholesOf(l) {
			if !present[p] {
				ops = append(ops, pinhole.Op{Kind: pinhole.Install, Pinhole: p, Timeout: max(l.Expires.Sub(now), time.Millisecond)})
			}
		}
	}
	if len(ops) == 0 {
		if herr != nil {
			s.m.restores.Inc()
		}
		return
	}
	if err := s.applyAll(ops); err != nil {
		s.log.Error("cannot re-install missing pinholes", zap.Int("missing", len(ops)), zap.Error(err))
		return
	}
	s.m.restores.Inc()
	s.log.Warn("re-installed pinholes missing from the kernel", zap.Int("count", len(ops)))
}
