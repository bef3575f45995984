package server

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/pcpd/pcpd/pcp"
	"github.com/pcpd/pcpd/store"
)

// Leases returns a copy of every live lease, sorted by owner, internal
// address, protocol, port and remote. It is ListLeases collected: the
// engine is held for the listing's compact key walk and then listChunk
// leases at a time, not for the whole copy (before h/opsleft one hold
// copied and sorted them all: 132 ms at 100 000 leases, BENCHMARKS.md
// item 50). Should the listing's pin be broken meanwhile (the table
// changed too much: ListLeases' error), the copy is made in one hold.
func (s *Server) Leases() []store.Lease {
	var out []store.Lease
	err := s.ListLeases(func(n int) error {
		out = make([]store.Lease, 0, n)
		return nil
	}, func(l *store.Lease) error {
		c := *l
		c.Filters = slices.Clone(l.Filters)
		out = append(out, c)
		return nil
	})
	if err == nil {
		return out
	}
	return s.leasesOneHold()
}

// leasesOneHold copies every live lease, sorted, in one hold of s.mu:
// Leases' fallback (and, until h/opsleft, Leases itself).
func (s *Server) leasesOneHold() []store.Lease {
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

// RevokeFilter selects leases for Revoke: all of them, one by key, every
// lease of one owner, or every lease, whoever holds it, on one of Opens.
// Exactly one of All, Key, Owner and Opens must be set.
type RevokeFilter struct {
	Owner string
	Key   *store.Key
	All   bool
	Opens []Opening
}

// Opening is what a lease opens, as the operator names it (pcpd revoke
// PROTO/ADDR/PORT): every lease on it is selected (MAP, NAT-PMP and PEER
// alike; the address compared unmapped).
type Opening struct {
	Protocol     uint8
	InternalAddr netip.Addr
	InternalPort uint16
}

// ErrRevokeStopped is Revoke's error when it was cut short: its context
// ended (pcpd stopping) or Serve returned before every lease it selected
// was ended. The leases ended before stay ended (out of the kernel and
// the store), the others stay leases.
var ErrRevokeStopped = errors.New("revoke cut short (pcpd is stopping)")

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
//
// ctx (control's: Serve's life in pcpd serve) is looked at before each
// step, and a chunk is not begun once Serve has returned (stopServing):
// the revoke stops between chunks with ErrRevokeStopped and how many it
// ended. Before (h/opsleft), a revoke went on after a SIGTERM, its later
// chunks' conntrack flushes handed to the flusher Serve's end had closed
// (TestRevokeStopsWithServe); a revoke of 1 000 000 leases (≈ 13 s)
// neared systemd's TimeoutStopSec.
func (s *Server) Revoke(ctx context.Context, f RevokeFilter) (int, error) {
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
	if len(f.Opens) > 0 {
		n++
	}
	if n != 1 {
		return 0, fmt.Errorf("server: revoke needs exactly one of all, key, owner or openings: %w", ErrInvalidConfig)
	}
	stopped := func(done, of int) error {
		err := ctx.Err()
		if err == nil {
			err = errServeEnded
		}
		return fmt.Errorf("server: %w: %d of the %d lease(s) selected ended, the others kept: %w", ErrRevokeStopped, done, of, err)
	}
	var keys []store.Key
	if f.Key != nil {
		keys = append(keys, *f.Key)
	} else {
		match := openingMatch(f.Opens)
		for at := uint32(0); ; {
			if ctx.Err() != nil {
				return 0, fmt.Errorf("server: %w: no lease ended: %w", ErrRevokeStopped, ctx.Err())
			}
			s.mu.Lock()
			if keys == nil {
				// Sized once: growing it by append copied it under s.mu.
				want := s.tab.byOwner[f.Owner]
				if f.All {
					want = s.tab.len()
				} else if match != nil {
					want = min(s.tab.len(), 64)
				}
				keys = make([]store.Key, 0, want)
			}
			if match != nil {
				keys, at = s.tab.selectedBy(at, sweepSlots, match, keys)
			} else {
				keys, at = s.tab.selected(at, sweepSlots, f.Owner, f.All, keys)
			}
			s.mu.Unlock()
			if at == 0 {
				break
			}
		}
	}
	slices.SortFunc(keys, compareKeys)
	done, of := 0, len(keys)
	for len(keys) > 0 {
		if ctx.Err() != nil {
			return done, stopped(done, of)
		}
		chunk := keys[:min(len(keys), revokeChunk)]
		keys = keys[len(chunk):]
		gone, err := s.revokeKeys(chunk)
		if errors.Is(err, errServeEnded) {
			return done, stopped(done, of)
		}
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
		if s.revokeStepHook != nil {
			s.revokeStepHook(done)
		}
	}
	return done, nil
}

// errServeEnded: Serve has returned (stopServing); an operator's revoke
// begins no chunk after it.
var errServeEnded = errors.New("the engine has stopped serving")

// openingMatch is the table.selectedBy test of a revoke by openings (nil
// with none): the protocol and port looked at first, the address decoded
// only for a lease on one of them.
func openingMatch(ops []Opening) func(t *table, r *rec) bool {
	if len(ops) == 0 {
		return nil
	}
	type pp struct {
		proto uint8
		port  uint16
	}
	ports := map[pp]bool{}
	want := map[Opening]bool{}
	for _, o := range ops {
		o.InternalAddr = o.InternalAddr.Unmap()
		want[o] = true
		ports[pp{o.Protocol, o.InternalPort}] = true
	}
	return func(t *table, r *rec) bool {
		if !ports[pp{r.proto, r.iport}] {
			return false
		}
		return want[Opening{Protocol: r.proto, InternalAddr: t.dec(r.iaddr).Unmap(), InternalPort: r.iport}]
	}
}

// revokeChunk is how many leases one transaction of Revoke ends, under
// s.mu (≈ 27 µs a lease with the kernel and the store: ≈ 7 ms a chunk).
const revokeChunk = 256

// revokeKeys ends, in one transaction under s.mu, the leases at keys that
// are still live, queues their clients' unsolicited NOT_AUTHORIZED
// (UPD-03, updates.go), and returns them (to log).
//
// Once Serve has returned (stopServing) it ends nothing: errServeEnded.
// Its conntrack flushes would go to the flusher Serve's end closed (no
// retry, no waiting), their walk's socket closed.
func (s *Server) revokeKeys(keys []store.Key) ([]store.Lease, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.serveEnded {
		return nil, errServeEnded
	}
	gone, err := s.revokeKeysLocked(keys, nil, false)
	if err == nil {
		s.queueUpdates(gone, pcp.NotAuthorized) // UPD-03 (updates.go)
	}
	return gone, err
}

// revokeKeysLocked is revokeKeys under s.mu held by the caller; with
// still, only the leases it still selects are ended (the ownership
// sweep: those still unowned). unowned: the ownership sweep's, whose
// kernel deletes stand if the store fails (tx.revoking); an operator's
// revoke is refused then, as before (its leases are still owned: a
// restart would restore them, and nothing would revoke them again).
func (s *Server) revokeKeysLocked(keys []store.Key, still func(*store.Lease) bool, unowned bool) ([]store.Lease, error) {
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
			t.revoking = unowned
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
