// Package store keeps pcpd's leases and epoch on disk so that kill -9 and a
// restart lose nothing (DESIGN.md "Properties that must hold", EPO-04), and
// so that a real loss of state is noticed and reported as one (ANN-03,
// EPO-03) instead of silently starting empty.
//
// Files in the state directory:
//
//	leases.db            bbolt: leases, epoch origin, heartbeat, digest, walgen,
//	                     MAP-22 quarantines and their digest (quarantine.go)
//	leases.wal.0, .1     write-ahead log segments (wal.go); generation g in .<g%2>
//	leases.db.bak        last good copy of leases.db
//	leases.lock          empty, 0600: flocked by the pcpd using the directory (lockState)
//	*.corrupt-<time>     a damaged file moved aside for inspection
//
// A Commit appends one record (its puts and deletes, the heartbeat, an
// epoch change) to the active log segment and returns after one
// fdatasync. The record goes into space the file already has written
// (zeros when a segment grows, older generations' records when it is
// reused), so the sync writes data only, no size or extent metadata.
// Committer folds concurrent commits into one record (group commit), so
// durability costs one fdatasync per group, not per request.
//
// A checkpoint (in the background once a segment holds 16 MiB or every
// 30 s while anything is logged, WithCheckpoint; and on Snapshot and
// Close) starts the next generation in the other segment and folds the
// finished one into leases.db in one bbolt transaction, which also
// records walgen, the lowest generation not folded: a folded segment is
// never replayed. Commits wait for a checkpoint only when the active
// segment reaches four times the checkpoint size. bbolt writes
// copy-on-write pages and switches between two checksummed meta pages, so
// a checkpoint is all-or-nothing even when the process dies or the
// machine loses power in the middle of it; fsync is never switched off.
//
// Open reads leases.db and applies the log's records of generation ≥
// walgen on top in the same pass, then folds them into leases.db and
// starts a new generation. A record cut short or failing its CRC-32C at
// the end of the log is a write that was never acknowledged (Commit
// returns only after the sync) and is dropped. A damaged record followed
// by valid records of the same generation, a damaged segment header, or a
// log that does not continue the state file is damage at rest: Open keeps
// what precedes it, moves the segment aside and resets the epoch with a
// clear message. (Damage to the very last record can not be told from a
// torn write and drops that record without a reset; a kill -9 never tears
// a write.)
//
// <dir>/leases.db.bak is the last good copy: written after Open has read and
// checked the whole file, and whenever the engine calls Snapshot (which
// folds the log first, so the copy holds every commit acknowledged before
// the call). When leases.db is unreadable, Open moves it aside
// (leases.db.corrupt-<time>) and restores the copy, or starts empty, and
// starts a log generation above every existing segment (which of them the
// copy already holds can not be told, so none is replayed); either way
// State.Fresh tells the engine to reset the epoch, because leases may have
// been lost.
//
// Each record carries a CRC-32C over its key and value, and the meta bucket
// holds a count and checksum sum of all records, because bbolt checksums
// only its meta pages: a flipped bit in a data page would otherwise go
// unnoticed, or silently drop records. Before bbolt sees a file, its page
// tree is checked with plain reads (meta.go), so damage can not crash or
// hang the daemon.
//
// Damage confined to the MAP-22 quarantines (a record failing its checks,
// a record, the bucket or qdigest lost or wrong, a logged quarantine entry
// that does not decode) is not damage of the state file: the leases and
// the epoch stay, the quarantines that check out are kept, State.Recovered
// (logged at error level) names those lost, and Open's fold rebuilds the
// bucket and its digest (readQuarantines). A quarantine holds a freed port
// for at most ≈ 124 min; reverting the leases to the backup and resetting
// the epoch for it would cost far more. Damage to the leases, their
// digest, the meta records or the log goes the ways described above.
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
// later calls, so service resumes by itself. A log segment claims disk
// space 16 KiB at a time (doubling as it grows), so on a full disk commits
// fail once what a segment already holds is used up; a segment that has
// reached its size is reused, so a long-running store keeps accepting
// commits on a full disk until the log is full and a checkpoint can not
// grow leases.db. While the file system has room to spare (64 MiB beyond
// it), a background grower zero-fills the segment that is not active to
// its full size, and a commit that finds the active segment out of
// written room switches the log to it (an early rotation): the file that
// commits sync never grows under them, since every concurrent commit's
// fdatasync would carry the growth's pages and size change.
//
// The package is a leaf: it knows nothing of PCP, nftables or the engine.
package store
