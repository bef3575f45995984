// Package store keeps pcpd's leases and epoch on disk so that kill -9 and a
// restart lose nothing (DESIGN.md "Properties that must hold", EPO-04), and
// so that a real loss of state is noticed and reported as one (ANN-03,
// EPO-03) instead of silently starting empty.
//
// The state is one bbolt file, <dir>/leases.db. bbolt writes copy-on-write
// pages and switches between two checksummed meta pages, so a transaction is
// all-or-nothing even when the process dies or the machine loses power in
// the middle of it; fsync is never switched off. Each Commit is one
// transaction; Committer folds concurrent commits into one transaction (group
// commit) so durability costs one fsync round per batch, not per request.
//
// <dir>/leases.db.bak is the last good copy: written after Open has read and
// checked the whole file, and whenever the engine calls Snapshot. When
// leases.db is unreadable, Open moves it aside (leases.db.corrupt-<time>) and
// restores the copy, or starts empty; either way State.Fresh tells the engine
// to reset the epoch, because leases may have been lost.
//
// Each record carries a CRC-32C over its key and value, and the meta bucket
// holds a count and checksum sum of all records, because bbolt checksums
// only its meta pages: a flipped bit in a data page would otherwise go
// unnoticed, or silently drop records. Before bbolt sees a file, its page
// tree is checked with plain reads (meta.go), so damage can not crash or
// hang the daemon.
//
// How the engine uses it:
//
//	st, state, err := store.Open(dir, log)   // once, before serving
//	if state.Fresh { st.ResetEpoch(now) }    // and announce (ANN-03)
//	// restore state.Leases into the kernel; expired ones are included,
//	// drop them (Commit(nil, keys)).
//	c := st.NewCommitter()                   // per request: c.Commit(put, del)
//	// every minute or so: st.Touch(now); every hour or so: st.Snapshot()
//
// Commit and Committer.Commit return an error wrapping ErrUnavailable when
// the change is not durable (disk full, read-only, I/O error): answer
// NO_RESOURCES and roll the kernel back (choice (g)). They keep trying on
// later calls, so service resumes by itself.
//
// The package is a leaf: it knows nothing of PCP, nftables or the engine.
package store
