package server

import (
	"context"
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

	// Sized up front: growing a slice of a million leases (288 MB) step
	// by step cost 2.4 s of a 1 000 000-lease start.
	live := make([]store.Lease, 0, len(st.Leases))
	var movedLeases []store.Lease
	var expired []store.Key
	moved, doubtful := 0, 0
	for _, l := range st.Leases {
		switch {
		case !l.Expires.After(now):
			expired = append(expired, l.Key)
		case l.ExternalAddr.Is4() && l.ExternalAddr != s.cfg.ExternalIPv4:
			// The external IPv4 changed (or is gone): these mappings
			// cannot be kept, which is a loss of mapping state (EPO-03).
			expired = append(expired, l.Key)
			movedLeases = append(movedLeases, l)
			moved++
		default:
			if s.clampRestored(&l, now) {
				doubtful++
			}
			live = append(live, l)
		}
	}
	if doubtful > 0 {
		lost, why = true, "restored leases reach beyond the max lifetime (clock behind?)"
	}
	if moved > 0 {
		lost, why = true, "external IPv4 address changed"
	}
	kept, ok := s.reconcile(live, movedLeases, now)
	if !ok {
		lost, why = true, "some leases could not be restored into the kernel"
	}
	var drop []store.Key
	drop = append(drop, expired...)
	if len(kept) < len(live) {
		// A set of the kept keys: comparing each live lease with every kept
		// one was quadratic (45 s for 107 000 leases).
		in := make(map[store.Key]struct{}, len(kept))
		for i := range kept {
			in[kept[i].Key] = struct{}{}
		}
		for _, l := range live {
			if _, ok := in[l.Key]; !ok {
				drop = append(drop, l.Key)
			}
		}
	}
	if len(drop) > 0 {
		if err := s.st.Commit(nil, drop); err != nil {
			s.log.Warn("cannot drop expired or unrestorable leases from the store", zap.Error(err))
		}
	}
	s.tab.putAll(kept)
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

// reconcile puts the pinholes of leases back into the kernel with their
// remaining lifetimes, in transactions of pinhole.MaxBatch ops (re-adding a
// pinhole that is there only resets its timeout). It returns the leases it
// could put in place and whether all could.
//
// It does not list the kernel's pinholes: a dump of a large set takes the
// kernel time quadratic in its size (~2-7 s per 100 000, minutes at
// 1 000 000), while re-installing is linear (~0.4 s per 100 000). Pinholes
// of ours that no lease explains (orphans) are removed by the first
// firewall audit, in the background once serving has started
// (auditFirewall); until then, and for ever above auditMaxLeases, they are
// left to their kernel timeouts.
//
// The pinholes of gone (leases dropped because the external IPv4 changed)
// are removed: they are known without a dump.
func (s *Server) reconcile(leases, gone []store.Lease, now time.Time) ([]store.Lease, bool) {
	// Leases share a pinhole only on one internal tuple (a PEER and a
	// filtered MAP): only those pinholes need a map, for the latest expiry
	// among their holders. A map of every pinhole (≈ 110 bytes an entry)
	// and a list of every op cost ≈ 250 MB and seconds at 1 000 000 leases;
	// the ops now go to the kernel as they are made.
	perTuple := make(map[tuple]int32, len(leases))
	for i := range leases {
		perTuple[tupleOf(leases[i].Key)]++
	}
	for i := range gone {
		// Their pinholes are deleted below unless a live lease holds one.
		if tp := tupleOf(gone[i].Key); perTuple[tp] > 0 {
			perTuple[tp]++
		}
	}
	shared := map[pinhole.Pinhole]time.Duration{}
	for i := range leases {
		if perTuple[tupleOf(leases[i].Key)] < 2 {
			continue
		}
		for _, p := range pinholesOf(&leases[i]) {
			shared[p] = max(shared[p], leases[i].Expires.Sub(now))
		}
	}
	timeout := func(l *store.Lease, p pinhole.Pinhole) time.Duration {
		if d, ok := shared[p]; ok {
			return d
		}
		return l.Expires.Sub(now)
	}
	var dels []pinhole.Op
	for i := range gone {
		for _, p := range pinholesOf(&gone[i]) {
			if _, ok := shared[p]; !ok {
				dels = append(dels, pinhole.Op{Kind: pinhole.Delete, Pinhole: p})
			}
		}
	}
	if len(dels) > 0 {
		if err := s.applyAll(dels); err != nil {
			s.log.Error("cannot remove the pinholes of dropped leases; they end with their timeouts", zap.Error(err))
		}
	}
	ops := make([]pinhole.Op, 0, pinhole.MaxBatch)
	var err error
	apply := func() {
		if len(ops) > 0 && err == nil {
			err = s.fw.Apply(ops)
		}
		ops = ops[:0]
	}
	done := map[pinhole.Pinhole]bool{}
	for i := 0; i < len(leases) && err == nil; i++ {
		for _, p := range pinholesOf(&leases[i]) {
			if _, ok := shared[p]; ok {
				if done[p] {
					continue
				}
				done[p] = true
			}
			ops = append(ops, pinhole.Op{Kind: pinhole.Install, Pinhole: p, Timeout: timeout(&leases[i], p)})
			if len(ops) == pinhole.MaxBatch {
				apply()
			}
		}
	}
	apply()
	if err == nil {
		return leases, true
	}
	// Re-installing what went in already is harmless (it only resets the
	// timeout to the same value).
	s.log.Warn("restoring all pinholes failed; trying lease by lease", zap.Error(err))
	var kept []store.Lease
	for i := range leases {
		var lops []pinhole.Op
		for _, p := range pinholesOf(&leases[i]) {
			lops = append(lops, pinhole.Op{Kind: pinhole.Install, Pinhole: p, Timeout: timeout(&leases[i], p)})
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
// deleted or damaged them (tamper watch). The check itself (Healthy:
// objects, rule counts and every set's sentinel element) dumps nothing and
// runs without s.mu, so serving goes on; only a repair takes the lock, and
// re-installs every lease's pinholes (a flushed set or a re-created table
// has lost them all).
func (s *Server) checkFirewall() {
	herr := s.fw.Healthy()
	if herr == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	s.expireLocked(now)
	s.log.Warn("firewall objects damaged or missing; restoring", zap.Error(herr))
	if err := s.fw.Setup(); err != nil {
		s.log.Error("cannot restore firewall objects", zap.Error(err))
		return
	}
	s.protected = nil
	s.updateProtected()
	var ops []pinhole.Op
	for _, l := range s.tab.byKey {
		for _, p := range pinholesOf(l) {
			ops = append(ops, pinhole.Op{Kind: pinhole.Install, Pinhole: p, Timeout: max(l.Expires.Sub(now), time.Millisecond)})
		}
	}
	s.m.restores.Inc()
	if err := s.applyAll(ops); err != nil {
		s.log.Error("cannot re-install pinholes", zap.Int("pinholes", len(ops)), zap.Error(err))
		return
	}
	s.log.Warn("re-installed every lease's pinholes", zap.Int("count", len(ops)))
}

// auditMaxLeases: above this many leases the audit is skipped. The kernel's
// dump of a hash set is quadratic in its size (~2-7 s of kernel CPU at
// 100 000 pinholes, minutes at 1 000 000).
const auditMaxLeases = 200_000

// auditFirewall compares the kernel's pinholes with the lease table: it
// re-installs pinholes no dump showed and removes pinholes of ours that no
// lease explains (orphans: leases lost with the store, or ended while pcpd
// was down, or elements someone deleted by hand). It runs rarely
// (AuditInterval, and once after start), in the background: the dump goes
// on its own socket without s.mu (the backend lets Apply go on meanwhile),
// and only the comparison and the fix take the lock. A pinhole changed
// while the dump ran may be seen as missing; re-installing it is harmless.
func (s *Server) auditFirewall(ctx context.Context) {
	s.mu.Lock()
	n := s.tab.len()
	s.mu.Unlock()
	if n > auditMaxLeases {
		s.log.Info("firewall audit skipped: too many leases to dump the kernel's sets; orphan pinholes end with their timeouts",
			zap.Int("leases", n), zap.Int("max", auditMaxLeases))
		return
	}
	start := time.Now()
	have, err := s.fw.List()
	if err != nil {
		s.log.Warn("firewall audit: cannot list pinholes", zap.Error(err))
		return
	}
	dumped := time.Since(start)
	if ctx.Err() != nil {
		return
	}
	present := make(map[pinhole.Pinhole]struct{}, len(have))
	for _, e := range have {
		present[e.Pinhole] = struct{}{}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	wanted := make(map[pinhole.Pinhole]struct{}, len(present))
	var missing []pinhole.Op
	for _, l := range s.tab.byKey {
		if !l.Expires.After(now) {
			continue
		}
		for _, p := range pinholesOf(l) {
			wanted[p] = struct{}{}
			if _, ok := present[p]; !ok {
				missing = append(missing, pinhole.Op{Kind: pinhole.Install, Pinhole: p, Timeout: max(l.Expires.Sub(now), time.Millisecond)})
			}
		}
	}
	var orphans []pinhole.Op
	for _, e := range have {
		p := e.Pinhole
		if _, ok := wanted[p]; ok {
			continue
		}
		// An external endpoint a lease holds now (a port handed out again
		// since the dump) is not deleted: the kernel would refuse the
		// delete of a redirect whose target changed.
		if _, held := s.tab.holder(endpoint{addr: p.ExternalAddr, proto: p.Protocol, port: p.ExternalPort}); held {
			continue
		}
		orphans = append(orphans, pinhole.Op{Kind: pinhole.Delete, Pinhole: p})
		if a := p.InternalAddr; !slices.Contains(s.orphans, a) && len(s.orphans) < maxOrphanTargets {
			s.orphans = append(s.orphans, a)
		}
	}
	if err := s.applyAll(append(orphans, missing...)); err != nil {
		s.log.Error("firewall audit: cannot fix the kernel's pinholes", zap.Error(err))
	}
	if len(orphans) > 0 {
		s.log.Info("removed pinholes no lease explains", zap.Int("count", len(orphans)))
	}
	if len(missing) > 0 {
		s.log.Info("firewall audit: re-installed pinholes the dump did not show (changed during it, or deleted by hand)", zap.Int("count", len(missing)))
	}
	s.log.Debug("firewall audit done", zap.Int("pinholes", len(have)), zap.Duration("dump", dumped))
}

// watchFirewall runs the tamper check every TamperInterval and the audit
// once at start and then every AuditInterval, off the engine loop.
func (s *Server) watchFirewall(ctx context.Context) {
	s.auditFirewall(ctx)
	tamper := time.NewTicker(s.cfg.TamperInterval)
	defer tamper.Stop()
	audit := time.NewTicker(s.cfg.AuditInterval)
	defer audit.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tamper.C:
			s.checkFirewall()
		case <-audit.C:
			s.auditFirewall(ctx)
		}
	}
}
