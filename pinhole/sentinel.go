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
func sentinelElement(k kind) nftables.SetElement {
	size := func(ts []nftables.SetDatatype) int {
		n := 0
		for _, t := range ts {
			n += (int(t.Bytes) + 3) &^ 3
		}
		return n
	}
	e := nftables.SetElement{Key: make([]byte, size(specs[k].key))}
	if specs[k].interval {
		e.KeyEnd = make([]byte, len(e.Key))
	}
	if specs[k].data != nil {
		e.Val = make([]byte, size(specs[k].data))
	}
	return e
}

// isSentinel reports whether e (as the kernel lists it) is a sentinel.
func isSentinel(k kind, e nftables.SetElement) bool {
	s := sentinelElement(k)
	return bytes.Equal(e.Key, s.Key) && (!specs[k].interval || bytes.Equal(e.KeyEnd, s.KeyEnd))
}

// queueSentinels queues adding every set's sentinel (no timeout: it stays
// until the set is flushed or deleted). Adding one that is there is a no-op.
func (b *Backend) queueSentinels() error {
	for k := range numKinds {
		if err := b.conn.SetAddElements(b.sets[k], []nftables.SetElement{sentinelElement(k)}); err != nil {
			return fmt.Errorf("pinhole: sentinel of %s: %w", b.sets[k].Name, err)
		}
	}
	return nil
}

// checkSentinels is one transaction that deletes and re-adds every set's
// sentinel: it succeeds, changing nothing, iff every sentinel is there; the
// kernel refuses deleting an absent element (ENOENT) and then applies
// nothing. Its cost does not grow with the sets' sizes.
func (b *Backend) checkSentinels() error {
	for k := range numKinds {
		el := []nftables.SetElement{sentinelElement(k)}
		if err := b.conn.SetDeleteElements(b.sets[k], el); err != nil {
			return fmt.Errorf("pinhole: sentinel of %s: %w", b.sets[k].Name, err)
		}
		if err := b.conn.SetAddElements(b.sets[k], el); err != nil {
			return fmt.Errorf("pinhole: sentinel of %s: %w", b.sets[k].Name, err)
		}
	}
	if err := b.conn.Flush(); err != nil {
		return fmt.Errorf("pinhole: a pinhole set lost its sentinel (flushed?): %w: %w", ErrUnhealthy, classify(err))
	}
	return nil
}
