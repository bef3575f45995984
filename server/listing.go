package server

import (
	"bytes"
	"cmp"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/pcpd/pcpd/store"
)

// listChunk is how many leases ListLeases decodes per hold of s.mu.
const listChunk = 1024

// listScan is how many table slots ListLeases walks per hold of s.mu for
// the keys (a var: tests make it small).
var listScan = 8192

// testHookListHold, when set, runs after each of ListLeases' key walk's
// holds of s.mu (released) with the slots it walked in it.
var testHookListHold func(slots int)

// listKey is what ListLeases sorts by: a lease's key in compact form (the
// owner as its rank among the owners' IDs), ≈ 52 bytes, and its slot.
type listKey struct {
	rank, ref     uint32
	iaddr, remote caddr
	iport, rport  uint16
	proto         uint8
}

// ListLeases gives every live lease to each, in Leases' order (by owner,
// internal address, protocol, port and remote), after count has been told
// how many there are. Unlike Leases it copies no lease whole: it sorts
// compact keys (≈ 52 bytes a lease instead of 288) and decodes listChunk
// leases at a time, holding s.mu only for that, so the engine serves on
// while a slow reader takes the list; the table is pinned meanwhile
// (table.pin) and each sees the leases as they were when the listing
// began (on the wall-clock base it began on, if a step is rebased
// meanwhile). At 1 000 000 leases that is ≈ 55 MB beside the table instead of a
// 290 MB snapshot (resident memory: README, "Memory"). The lease given to
// each is reused afterwards.
func (s *Server) ListLeases(count func(n int) error, each func(*store.Lease) error) error {
	// The keys are gathered listScan slots a hold (h/ops2; before, one
	// hold walked the whole table: 1.1-4.1 ms at 100 000 leases). The
	// table is pinned from the first hold, so the slots up to its top
	// then are the leases of that moment: none is reused or cleared, a
	// lease made since is in a slot above, and one ended since (its slot
	// in pend past mark, fLive cleared) still counts.
	s.mu.Lock()
	t := s.tab
	now := s.now().UnixNano()
	rank := ownerRanks(t)
	top, mark, n := t.top, len(t.pend), t.len()
	epoch := t.pin()
	shift0 := s.shifted()
	s.mu.Unlock()
	keys := make([]listKey, 0, n)
	defer func() {
		s.mu.Lock()
		t.unpin(epoch)
		s.mu.Unlock()
	}()
	var ended map[uint32]bool // slots ≤ top whose lease ended since the pin
	var zones []string
	for from := uint32(1); from <= top; from += uint32(listScan) {
		end := min(uint64(from)+uint64(listScan)-1, uint64(top))
		s.mu.Lock()
		if !t.pinned(epoch) {
			s.mu.Unlock()
			return fmt.Errorf("server: lease listing read too slowly: the table changed too much meanwhile")
		}
		for _, ref := range t.pend[mark:] {
			if ref <= top {
				if ended == nil {
					ended = map[uint32]bool{}
				}
				ended[ref] = true
			}
		}
		mark = len(t.pend)
		// A rebase since the first hold shifted every slot's times (the
		// listing's expiry test is on the first hold's base).
		d := int64(s.shifted() - shift0)
		for ref := from; uint64(ref) <= end; ref++ {
			r := t.rec(ref)
			if (r.flags&fLive == 0 && !ended[ref]) || r.exp == zeroTime || r.exp-d <= now {
				continue // Leases lists live leases only (Expires after now)
			}
			keys = append(keys, listKey{rank: rank[r.owner], ref: ref, iaddr: r.iaddr, remote: r.remote,
				iport: r.iport, rport: r.rport, proto: r.proto})
		}
		zones = t.zones // append-only: the entries the keys use stay
		s.mu.Unlock()
		if testHookListHold != nil {
			testHookListHold(int(end - uint64(from) + 1))
		}
	}

	slices.SortFunc(keys, func(a, b listKey) int { return a.compare(&b, zones) })
	if err := count(len(keys)); err != nil {
		return err
	}
	buf := make([]store.Lease, min(listChunk, len(keys)))
	for i := 0; i < len(keys); i += listChunk {
		chunk := keys[i:min(i+listChunk, len(keys))]
		s.mu.Lock()
		if !t.pinned(epoch) {
			s.mu.Unlock()
			return fmt.Errorf("server: lease listing read too slowly: the table changed too much meanwhile")
		}
		for j := range chunk {
			t.decode(chunk[j].ref, &buf[j])
		}
		// A wall-clock step rebased since the listing began (clock.go)
		// shifted the table under the pin: its times go back to the
		// base the listing began on, so that one listing has one base
		// (`pcpd leases` computes the time left from its own clock read
		// before the listing: the start's base).
		if d := s.shifted() - shift0; d != 0 {
			for j := range chunk {
				unshift(&buf[j], d)
			}
		}
		s.mu.Unlock()
		for j := range chunk {
			if err := each(&buf[j]); err != nil {
				return err
			}
		}
	}
	return nil
}

// unshift takes the rebases' shift d back off l's times.
func unshift(l *store.Lease, d time.Duration) {
	if !l.Expires.IsZero() {
		l.Expires = l.Expires.Add(-d)
	}
	if !l.Created.IsZero() {
		l.Created = l.Created.Add(-d)
	}
}

// ownerRanks maps each owner number in use to its ID's rank in string
// order.
func ownerRanks(t *table) []uint32 {
	ids := make([]string, 0, len(t.ownerNo))
	for id := range t.ownerNo {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	rank := make([]uint32, len(t.owners))
	for i, id := range ids {
		rank[t.ownerNo[id]] = uint32(i)
	}
	return rank
}

// compare orders as compareKeys does on the decoded keys.
func (a *listKey) compare(b *listKey, zones []string) int {
	if c := cmp.Compare(a.rank, b.rank); c != 0 {
		return c
	}
	if c := compareAddr(a.iaddr, b.iaddr, zones); c != 0 {
		return c
	}
	if c := cmp.Compare(a.proto, b.proto); c != 0 {
		return c
	}
	if c := cmp.Compare(a.iport, b.iport); c != 0 {
		return c
	}
	if c := compareAddr(a.remote, b.remote, zones); c != 0 {
		return c
	}
	return cmp.Compare(a.rport, b.rport)
}

// compareAddr orders encoded addresses as netip.Addr.Compare: by family
// (invalid, IPv4, IPv6), then address, then zone.
func compareAddr(a, b caddr, zones []string) int {
	if c := cmp.Compare(a.m&3, b.m&3); c != 0 {
		return c
	}
	if c := bytes.Compare(a.a[:], b.a[:]); c != 0 {
		return c
	}
	zone := func(m uint16) string {
		if z := m >> 2; z != 0 {
			return zones[z-1]
		}
		return ""
	}
	return strings.Compare(zone(a.m), zone(b.m))
}
