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

// RevokeFilter selects leases for Revoke: all of them, one by key, or
// every lease of one owner. Exactly one of All, Key and Owner must be set.
type RevokeFilter struct {
	Owner string
	Key   *store.Key
	All   bool
}

// Revoke ends the selected leases now: pinholes out of the kernel, leases
// out of the store, in one transaction. It returns how many it ended.
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
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	s.expireLocked(now)
	var keys []store.Key
	switch {
	case f.Key != nil:
		if _, ok := s.tab.get(*f.Key); ok {
			keys = append(keys, *f.Key)
		}
	default:
		for k := range s.tab.all() {
			if f.All || k.Owner == f.Owner {
				keys = append(keys, k)
			}
		}
	}
	if len(keys) == 0 {
		return 0, nil
	}
	slices.SortFunc(keys, compareKeys)
	t := s.begin(now)
	var gone []store.Lease
	for _, k := range keys {
		l, _ := s.tab.get(k)
		gone = append(gone, *l)
		t.set(k, nil, true)
	}
	if err := t.commit(); err != nil {
		t.rollback()
		return 0, err
	}
	for _, l := range gone {
		s.m.revocations.WithLabelValues("operator").Inc()
		s.log.Info("revoked by the operator", leaseFields(&l, l.ClientAddr)...)
	}
	return len(keys), nil
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
