package server

import (
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/store"
)

// Leases returns a snapshot of every live lease, sorted by owner, internal
// address, protocol, port and remote.
func (s *Server) Leases() []store.Lease {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	out := make([]store.Lease, 0, s.tab.len())
	for _, l := range s.tab.all() {
		if !l.Expires.After(now) {
			continue
		}
		c := *l
		c.Filters = slices.Clone(l.Filters)
		out = append(out, c)
	}
	slices.SortFunc(out, func(a, b store.Lease) int { return compareKeys(a.Key, b.Key) })
	return out
}

// HasOwner reports whether owner id holds a lease (control's revoke
// --client: without a copy of every lease, Leases).
func (s *Server) HasOwner(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.tab.byOwner[id] > 0
}

// RevokeFilter selects leases for Revoke: all of them, one by key, or
// every lease of one owner. Exactly one of All, Key and Owner must be set.
type RevokeFilter struct {
	Owner string
	Key   *store.Key
	All   bool
}

// Revoke ends the selected leases now: pinholes out of the kernel, leases
// out of the store. It returns how many it ended.
//
// The engine is held a step at a time (h/lowfix): the leases selected are
// found sweepSlots table slots per hold of s.mu, then ended revokeChunk
// per transaction, each under s.mu, and logged after it; requests are
// served between steps. Before, the whole revoke was one hold: 100 000
// leases of one client kept the engine waiting 2.7 s (TestRevokeOwnerHold),
// every request queued behind it. A lease selected that is gone by its
// chunk (expired, deleted meanwhile) is not counted; one made after the
// walk passed its slot is not selected. A chunk that fails ends the
// revoke: the error says how many earlier chunks ended, and those stay
// ended (before: one transaction, all or nothing).
func (s *Server) Revoke(f RevokeFilter) (int, error) {
	n := 0
	if f.All {
		n++
	}
	if f.Key != nil {
		n++
	}
	if f.Owner != "" {
		n++
	}
	if n != 1 {
		return 0, fmt.Errorf("server: revoke needs exactly one of all, key or owner: %w", ErrInvalidConfig)
	}
	var keys []store.Key
	if f.Key != nil {
		keys = append(keys, *f.Key)
	} else {
		for at := uint32(0); ; {
			s.mu.Lock()
			if keys == nil {
				// Sized once: growing it by append copied it under s.mu.
				want := s.tab.byOwner[f.Owner]
				if f.All {
					want = s.tab.len()
				}
				keys = make([]store.Key, 0, want)
			}
			keys, at = s.tab.selected(at, sweepSlots, f.Owner, f.All, keys)
			s.mu.Unlock()
			if at == 0 {
				break
			}
		}
	}
	slices.SortFunc(keys, compareKeys)
	done := 0
	for len(keys) > 0 {
		chunk := keys[:min(len(keys), revokeChunk)]
		keys = keys[len(chunk):]
		gone, err := s.revokeKeys(chunk)
		if err != nil {
			if done > 0 {
				return done, fmt.Errorf("server: revoke stopped after %d lease(s): %w", done, err)
			}
			return 0, err
		}
		for i := range gone {
			s.m.revocations.WithLabelValues("operator").Inc()
			s.log.Info("revoked by the operator", leaseFields(&gone[i], gone[i].ClientAddr)...)
		}
		done += len(gone)
	}
	return done, nil
}

// revokeChunk is how many leases one transaction of Revoke ends, under
// s.mu (≈ 27 µs a lease with the kernel and the store: ≈ 7 ms a chunk).
const revokeChunk = 256

// revokeKeys ends, in one transaction under s.mu, the leases at keys that
// are still live, and returns them (to log).
func (s *Server) revokeKeys(keys []store.Key) ([]store.Lease, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.revokeKeysLocked(keys, nil)
}

// revokeKeysLocked is revokeKeys under s.mu held by the caller; with
// still, only the leases it still selects are ended (the ownership
// sweep: those still unowned).
func (s *Server) revokeKeysLocked(keys []store.Key, still func(*store.Lease) bool) ([]store.Lease, error) {
	now := s.now()
	s.expireLocked(now)
	var gone []store.Lease
	var t *tx
	for _, k := range keys {
		l, ok := s.tab.get(k)
		if !ok || still != nil && !still(l) {
			continue
		}
		if t == nil {
			t = s.begin(now)
		}
		gone = append(gone, *l)
		t.set(k, nil, true)
	}
	if t == nil {
		return nil, nil
	}
	if err := t.commit(); err != nil {
		t.rollback()
		s.release(t)
		return nil, err
	}
	s.release(t)
	return gone, nil
}

// Status is the daemon's state for `pcpd status`.
type Status struct {
	Epoch           pcp.Epoch
	Leases          int
	Owners          int // owners holding leases
	OwnershipSource string
	Listen          []netip.AddrPort
	Started         time.Time
	// Restarted is true when the epoch continued from stored state.
	Restarted bool
}

// Status reports the epoch, counts and serving addresses.
func (s *Server) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	return Status{
		Epoch:           s.epoch.at(s.now()),
		Leases:          s.tab.len(),
		Owners:          len(s.tab.byOwner),
		OwnershipSource: s.deps.OwnershipSource,
		Listen:          s.lis.addrs(),
		Started:         s.started,
		Restarted:       s.restarted,
	}
}
