// Package servertest has in-memory stand-ins for the engine's kernel and
// disk collaborators, for fast protocol tests and fuzzing without root. The
// end-to-end tests in package server use the real nftables backend and
// store instead.
package servertest

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/pcpd/pcpd/pinhole"
	"github.com/pcpd/pcpd/store"
)

// ErrInjected is the error returned by a Fail* hook.
var ErrInjected = errors.New("servertest: injected failure")

// Firewall is an in-memory pinhole.Backend: pinholes with expiry times on
// the given clock. Apply is all-or-nothing, like one netlink transaction.
type Firewall struct {
	mu      sync.Mutex
	Now     func() time.Time
	holes   map[pinhole.Pinhole]time.Time
	broken  bool
	Applies int // successful Apply calls
	Ops     int // ops in successful Apply calls
	// FailApply, if set, is consulted before each Apply; a non-nil error
	// fails it with nothing applied.
	FailApply func(ops []pinhole.Op) error
	Protected []string
	// Owners is what SetOwners was last given, "id=prefix" each,
	// OwnerHoles its holes, and OwnerSets how often it was called.
	Owners     []string
	OwnerHoles []string
	OwnerSets  int
	// FailOwners, if set, is consulted by Setup and RepairOwners (when
	// SetOwners has been called) and SetOwners, as the real backend writes the
	// owner meter in each: a non-nil error leaves the owner meter off (Setup
	// still restores the rest, as pinhole's does, and returns the error
	// wrapping pinhole.ErrOwnerMeter); Healthy then reports the owner
	// meter alone until a write succeeds.
	FailOwners   func() error
	OwnerRepairs int // successful RepairOwners calls
	meterOff     bool
	// hasOwners: SetOwners was called, failed or not. As pinhole's, the
	// owners given are what the meter should hold from then on: Setup and
	// RepairOwners write them; before any, both leave the meter alone.
	hasOwners bool
	// FailProtected, if set, is consulted by SetProtected, Setup (once
	// SetProtected was called) and RepairProtected, as the real backend
	// writes the protected sets in each: a non-nil error leaves them other
	// than given (the prefixes given are adopted all the same, as
	// pinhole's), Setup restores the rest and returns it wrapping
	// pinhole.ErrProtected, and Healthy reports the protected sets alone
	// until a write succeeds. ProtectedRepairs counts successful
	// RepairProtected calls, Setups successful Setup calls.
	FailProtected    func() error
	ProtectedRepairs int
	Setups           int
	protectedOff     bool
	hasProtected     bool
	// Drops is what MeterDrops reports.
	Drops pinhole.MeterDrops
	// LookedUp is what RouteLookupOwners reports.
	LookedUp []pinhole.Owner
	// RouteFollows counts FollowRoutes calls; FailRoutes, if set, is
	// what they return.
	RouteFollows int
	FailRoutes   func() error
	// Changes is what RouteChanges returns (server.RouteChanger).
	Changes chan struct{}
	// FailHealthy, if set, is consulted first by Healthy: a non-nil error
	// is what it returns.
	FailHealthy func() error
}

// RouteChanges returns Changes (server.RouteChanger).
func (f *Firewall) RouteChanges() <-chan struct{} { return f.Changes }

// Follows is RouteFollows, read under the lock.
func (f *Firewall) Follows() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.RouteFollows
}

// FollowRoutes counts the call (server.RouteFollower).
func (f *Firewall) FollowRoutes() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.RouteFollows++
	if f.FailRoutes != nil {
		return f.FailRoutes()
	}
	return nil
}

// NewFirewall returns an empty firewall on clock now.
func NewFirewall(now func() time.Time) *Firewall {
	return &Firewall{Now: now, holes: map[pinhole.Pinhole]time.Time{}}
}

func (f *Firewall) Setup() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.broken = false
	f.Setups++
	var perr error
	if f.hasProtected {
		if err := f.writeProtected(); err != nil {
			perr = fmt.Errorf("servertest: setup: %w: %w", pinhole.ErrProtected, err)
		}
	}
	if f.hasOwners {
		if err := f.writeOwners(); err != nil {
			return errors.Join(perr, fmt.Errorf("servertest: setup: %w: %w", pinhole.ErrOwnerMeter, err))
		}
	}
	return perr
}

// writeProtected is a write of the protected sets, under f.mu.
func (f *Firewall) writeProtected() error {
	if f.FailProtected != nil {
		if err := f.FailProtected(); err != nil {
			f.protectedOff = true
			return err
		}
	}
	f.protectedOff = false
	return nil
}

// RepairProtected writes the protected sets again
// (server.ProtectedRepairer).
func (f *Firewall) RepairProtected() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.hasProtected {
		return nil
	}
	if err := f.writeProtected(); err != nil {
		return fmt.Errorf("servertest: repair protected sets: %w: %w", pinhole.ErrProtected, err)
	}
	f.ProtectedRepairs++
	return nil
}

// writeOwners is a write of the owner meter, under f.mu.
func (f *Firewall) writeOwners() error {
	if f.FailOwners != nil {
		if err := f.FailOwners(); err != nil {
			f.meterOff = true
			return err
		}
	}
	f.meterOff = false
	return nil
}

// RepairOwners writes the owner meter again (server.OwnerMeter).
func (f *Firewall) RepairOwners() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.hasOwners {
		return nil
	}
	if err := f.writeOwners(); err != nil {
		return fmt.Errorf("servertest: repair owner meter: %w: %w", pinhole.ErrOwnerMeter, err)
	}
	f.OwnerRepairs++
	return nil
}

// RouteLookupOwners reports LookedUp (server.RouteLookups).
func (f *Firewall) RouteLookupOwners() []pinhole.Owner {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.LookedUp
}

// MeterDrops reports Drops (server.OwnerMeter).
func (f *Firewall) MeterDrops() pinhole.MeterDrops {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.Drops
}

func (f *Firewall) SetProtected(p []netip.Prefix) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.Protected = f.Protected[:0]
	for _, x := range p {
		f.Protected = append(f.Protected, x.String())
	}
	f.hasProtected = true
	if err := f.writeProtected(); err != nil {
		return fmt.Errorf("servertest: set protected: %w: %w", pinhole.ErrProtected, err)
	}
	return nil
}

// SetOwners records the owner meter's prefixes (server.OwnerMeter).
func (f *Firewall) SetOwners(owners []pinhole.Owner, holes []netip.Prefix) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.hasOwners = true
	if err := f.writeOwners(); err != nil {
		return err
	}
	f.OwnerSets++
	f.Owners = f.Owners[:0]
	for _, o := range owners {
		for _, p := range o.Prefixes {
			f.Owners = append(f.Owners, o.ID+"="+p.String())
		}
	}
	f.OwnerHoles = f.OwnerHoles[:0]
	for _, p := range holes {
		f.OwnerHoles = append(f.OwnerHoles, p.String())
	}
	return nil
}

func (f *Firewall) Apply(ops []pinhole.Op) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.FailApply != nil {
		if err := f.FailApply(ops); err != nil {
			return err
		}
	}
	if f.broken {
		return fmt.Errorf("servertest: table missing: %w", pinhole.ErrMissing)
	}
	if len(ops) > pinhole.MaxBatch {
		// As the real backend: a transaction must fit one sendmsg.
		return fmt.Errorf("servertest: batch of %d ops exceeds MaxBatch: %w", len(ops), pinhole.ErrInvalid)
	}
	for i, op := range ops {
		switch op.Kind {
		case pinhole.Install, pinhole.Refresh:
			if op.Timeout < time.Millisecond {
				return &pinhole.OpError{Index: i, Op: op, Err: pinhole.ErrInvalid}
			}
		case pinhole.Delete:
		default:
			return &pinhole.OpError{Index: i, Op: op, Err: pinhole.ErrInvalid}
		}
	}
	now := f.Now()
	for _, op := range ops {
		if op.Kind == pinhole.Delete {
			delete(f.holes, op.Pinhole)
		} else {
			f.holes[op.Pinhole] = now.Add(op.Timeout)
		}
	}
	f.Applies++
	f.Ops += len(ops)
	return nil
}

func (f *Firewall) List() ([]pinhole.Entry, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.broken {
		return nil, pinhole.ErrMissing
	}
	now := f.Now()
	var out []pinhole.Entry
	for p, exp := range f.holes {
		if exp.After(now) {
			out = append(out, pinhole.Entry{Pinhole: p, Remaining: exp.Sub(now)})
		}
	}
	slices.SortFunc(out, func(a, b pinhole.Entry) int { return a.Pinhole.InternalAddr.Compare(b.Pinhole.InternalAddr) })
	return out, nil
}

func (f *Firewall) Healthy() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.FailHealthy != nil {
		if err := f.FailHealthy(); err != nil {
			return err
		}
	}
	if f.broken {
		return pinhole.ErrUnhealthy
	}
	var errs []error
	if f.protectedOff {
		errs = append(errs, fmt.Errorf("servertest: protected sets differ: %w (%w)", pinhole.ErrUnhealthy, pinhole.ErrProtected))
	}
	if f.meterOff {
		errs = append(errs, fmt.Errorf("servertest: owner meter missing: %w (%w)", pinhole.ErrUnhealthy, pinhole.ErrOwnerMeter))
	}
	return errors.Join(errs...)
}

// Tamper simulates someone deleting the table: every pinhole is gone and
// Healthy fails until Setup.
func (f *Firewall) Tamper() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.broken = true
	clear(f.holes)
}

// Holes returns the live pinholes and their remaining time.
func (f *Firewall) Holes() map[pinhole.Pinhole]time.Duration {
	f.mu.Lock()
	defer f.mu.Unlock()
	now := f.Now()
	out := map[pinhole.Pinhole]time.Duration{}
	for p, exp := range f.holes {
		if exp.After(now) {
			out[p] = exp.Sub(now)
		}
	}
	return out
}

// Store is an in-memory store.Store.
type Store struct {
	mu      sync.Mutex
	leases  map[store.Key]store.Lease
	quar    map[store.Endpoint]store.Quarantine
	origin  time.Time
	Commits int

	touches, snapshots int
	// FailCommit, if set, fails Commit when it returns non-nil.
	FailCommit func(put []store.Lease, del []store.Key) error
}

// NewStore returns an empty store.
func NewStore() *Store {
	return &Store{leases: map[store.Key]store.Lease{}, quar: map[store.Endpoint]store.Quarantine{}}
}

func (s *Store) Commit(put []store.Lease, del []store.Key) error {
	return s.CommitQuar(put, del, nil)
}

// CommitQuar is Commit with MAP-22 quarantine changes (store.Store.CommitQuar);
// FailCommit sees the lease part.
func (s *Store) CommitQuar(put []store.Lease, del []store.Key, q *store.QuarChange) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.FailCommit != nil {
		if err := s.FailCommit(put, del); err != nil {
			return err
		}
	}
	for _, k := range del {
		delete(s.leases, k)
	}
	for _, l := range put {
		l.Filters = slices.Clone(l.Filters)
		s.leases[l.Key] = l
	}
	if q != nil {
		for _, e := range q.Del {
			delete(s.quar, e)
		}
		for _, x := range q.Put {
			s.quar[x.Endpoint] = x
		}
	}
	s.Commits++
	return nil
}

func (s *Store) ResetEpoch(origin time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.origin = origin
	return nil
}

// Touch counts liveness marks (store.Store.Touch).
func (s *Store) Touch(now time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.touches++
	return nil
}

// Snapshot counts backup copies (store.Store.Snapshot).
func (s *Store) Snapshot() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.snapshots++
	return nil
}

// Housekeeping returns how often Touch and Snapshot were called.
func (s *Store) Housekeeping() (touches, snapshots int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.touches, s.snapshots
}

// State is what store.Open would return for this store's contents.
func (s *Store) State() store.State {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := store.State{EpochOrigin: s.origin, Fresh: s.origin.IsZero()}
	for _, l := range s.leases {
		st.Leases = append(st.Leases, l)
	}
	for _, q := range s.quar {
		st.Quarantines = append(st.Quarantines, q)
	}
	return st
}

// Quarantines returns the stored MAP-22 quarantines.
func (s *Store) Quarantines() map[store.Endpoint]store.Quarantine {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.quar)
}

// Leases returns the stored leases.
func (s *Store) Leases() map[store.Key]store.Lease {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.leases)
}
