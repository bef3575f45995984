package pinhole

import (
	"bytes"
	"fmt"

	"github.com/google/nftables"
)

// Every pinhole set holds one sentinel element of pcpd's, without timeout:
// an all-zero key (internal address :: or 0.0.0.0, which no Pinhole may
// have, so it never matches real traffic or collides with a lease). A set
// that was flushed ("nft flush set", a firewall reload that re-creates it)
// has lost its sentinel, so Healthy notices tampering with the pinholes
// without dumping the set: a dump of a large hash set costs the kernel time
// quadratic in its size (each dump message restarts the hash walk), ~2-7 s
// at 100 000 elements.

// sentinelElement is set k's sentinel: every field zero, with the key (and
// map data) lengths of the set's types, each field padded to 4 bytes.
func sentinelElement(k kind) nftables.SetElement { return sentinelOf(specs[k]) }

func sentinelOf(spec setSpec) nftables.SetElement {
	size := func(ts []nftables.SetDatatype) int {
		n := 0
		for _, t := range ts {
			n += (int(t.Bytes) + 3) &^ 3
		}
		return n
	}
	e := nftables.SetElement{Key: make([]byte, size(spec.key))}
	if spec.interval {
		e.KeyEnd = make([]byte, len(e.Key))
	}
	if spec.data != nil {
		e.Val = make([]byte, size(spec.data))
	}
	return e
}

// isSentinel reports whether e (as the kernel lists it) is a sentinel.
func isSentinel(k kind, e nftables.SetElement) bool {
	s := sentinelElement(k)
	return bytes.Equal(e.Key, s.Key) && (!specs[k].interval || bytes.Equal(e.KeyEnd, s.KeyEnd))
}

// isSNATSentinel reports whether e (as the kernel lists it) is SNAT map
// i's sentinel.
func isSNATSentinel(i int, e nftables.SetElement) bool {
	s := sentinelOf(snatSpecs[i])
	return bytes.Equal(e.Key, s.Key) && bytes.Equal(e.KeyEnd, s.KeyEnd)
}

// sentineled lists the sets that carry a sentinel, with its element: the
// pinhole sets and their SNAT companions.
func (b *Backend) sentineled() ([]*nftables.Set, []nftables.SetElement) {
	var sets []*nftables.Set
	var elems []nftables.SetElement
	for k := range numKinds {
		sets, elems = append(sets, b.sets[k]), append(elems, sentinelElement(k))
	}
	for i := range numSNAT {
		sets, elems = append(sets, b.snat[i]), append(elems, sentinelOf(snatSpecs[i]))
	}
	return sets, elems
}

// queueSentinels queues adding every set's sentinel (no timeout: it stays
// until the set is flushed or deleted). Adding one that is there is a no-op.
func (b *Backend) queueSentinels() error {
	sets, elems := b.sentineled()
	for i, s := range sets {
		if err := b.conn.SetAddElements(s, elems[i:i+1]); err != nil {
			return fmt.Errorf("pinhole: sentinel of %s: %w", s.Name, err)
		}
	}
	return nil
}

// sentinelHook, when set (tests only: QueueOversizedSentinelSet), runs on
// the connection just before checkSentinels sends its transaction.
var sentinelHook func(*nftables.Conn)

// checkSentinels is one transaction that deletes and re-adds every set's
// sentinel: it succeeds, changing nothing, iff every sentinel is there; the
// kernel refuses deleting an absent element (ENOENT) and then applies
// nothing. Its cost does not grow with the sets' sizes.
//
// Its replies are read as Apply's (flushConn): an ENOMEM message aborts it
// with one reply, which ends the read (review h/revdeadline, h/nftenomem).
// Only per-message errors (a sentinel or set missing: ENOENT) are damage.
//
// It runs on Healthy's own connection, beside Apply's transactions on the
// Backend's: those never touch a sentinel, and the kernel serializes
// transactions.
func (w *healthWant) checkSentinels(v kview) error {
	elems := w.sentinels
	for i := range w.sentineled {
		s := &w.sentineled[i]
		if err := v.conn.SetDeleteElements(s, elems[i:i+1]); err != nil {
			return fmt.Errorf("pinhole: sentinel of %s: %w", s.Name, err)
		}
		if err := v.conn.SetAddElements(s, elems[i:i+1]); err != nil {
			return fmt.Errorf("pinhole: sentinel of %s: %w", s.Name, err)
		}
	}
	if sentinelHook != nil {
		sentinelHook(v.conn)
	}
	inStep, err := flushConn(v.conn, v.nl)
	if err != nil && !inStep {
		// No per-message answer: the transaction ended with an error for
		// the whole of it (ENOMEM under memory pressure), its replies
		// missing, or more than it sent messages: it says nothing of the
		// sentinels, so it is a failed check (ErrCheckFailed), not damage (ErrUnhealthy
		// made the server run Setup and re-install every lease's pinholes
		// for a transient ENOMEM: TestHealthySentinelENOMEM, h/nftenomem).
		return fmt.Errorf("pinhole: sentinel transaction: %w: %w", ErrCheckFailed, classify(err))
	}
	if err != nil {
		return fmt.Errorf("pinhole: a pinhole set lost its sentinel (flushed?): %w: %w", ErrUnhealthy, classify(err))
	}
	return nil
}
