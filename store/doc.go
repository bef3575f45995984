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
// The package is a leaf: it knows nothing of PCP, nftables or the engine.
package store
