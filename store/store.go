package store

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"
	"go.uber.org/zap"
)

// Sentinel errors; every error of this package wraps one of them (or an
// error from the file system) and starts with "store: ".
var (
	// ErrUnavailable: the state could not be made durable (disk full, state
	// directory read-only, I/O error). Nothing of the failed call was
	// applied; the engine answers NO_RESOURCES (choice (g)). Later calls try
	// again, so service resumes when the disk does.
	ErrUnavailable = errors.New("state not writable")
	// ErrInvalidLease: a lease the format cannot hold (see the Max*
	// limits). Nothing was written.
	ErrInvalidLease = errors.New("invalid lease")
	// ErrCorrupt: stored data failed a check. Open handles it itself; it
	// surfaces from the decoder and in State.Recovered.
	ErrCorrupt = errors.New("corrupt state")
	// ErrLocked: another process holds the state directory.
	ErrLocked = errors.New("state directory in use by another process")
	// ErrClosed: the store was closed.
	ErrClosed = errors.New("store closed")
	// ErrOpenStopped: Open's context (WithContext) ended before the state
	// was read; nothing was changed in the directory that a kill at that
	// moment would not have left.
	ErrOpenStopped = errors.New("store: open stopped before the state was read")
)

// File names inside the state directory.
const (
	DBName     = "leases.db"
	BackupName = "leases.db.bak"
	LockName   = "leases.lock" // flocked by the pcpd using the directory (lockState)
	tmpSuffix  = ".tmp"
)

var (
	bucketMeta   = []byte("meta")
	bucketLeases = []byte("leases")

	metaFormat = []byte("format") // store format version, 1 octet
	metaEpoch  = []byte("epoch")  // epoch origin, Unix ns; absent = reset pending
	metaSeen   = []byte("seen")   // latest wall time the daemon was alive, Unix ns
	metaDigest = []byte("digest") // lease count(8) and sum of record checksums(8)
)

// digest summarises the leases bucket: how many records and the sum of their
// checksums. bbolt does not checksum its data pages, and a flipped bit in a
// page header's element count drops records without any error (the page
// sweep test found this); the digest, kept in the same transactions as the
// records, turns that into detected corruption.
type digest struct {
	count uint64
	sum   uint64
}

func (d *digest) add(val []byte, sign int) {
	c := uint64(recordCRC(val))
	if sign > 0 {
		d.count++
		d.sum += c
	} else {
		d.count--
		d.sum -= c
	}
}

func (d digest) bytes() []byte {
	return binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, d.count), d.sum)
}

func parseDigest(b []byte) (digest, bool) {
	if len(b) != 16 {
		return digest{}, false
	}
	return digest{binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])}, true
}

func recordCRC(val []byte) uint32 {
	if len(val) < 4 {
		return 0
	}
	return binary.BigEndian.Uint32(val[len(val)-4:])
}

const formatVersion = 1

// ClockSlack is how far a stored time may lie in the future before Open
// distrusts the clock and asks for an epoch reset (EPO-04 "doubtful clock").
const ClockSlack = 5 * time.Second

// Option changes how Open works; for tests and tuning.
type Option func(*options)

type options struct {
	now         func() time.Time
	lockTimeout time.Duration
	noSnapshot  bool
	ckptBytes   int64
	ckptEvery   time.Duration
	stream      func(*Lease) error
	later       bool
	census      func(*Lease)                         // WithCensus; nil: none
	unseen      func(origin time.Time) time.Duration // WithUnseenStep
	ctx         context.Context                      // WithContext; nil: none
}

// stopped is ErrOpenStopped, as a streamError (never taken for damage),
// once WithContext's context has ended; else nil.
func (o *options) stopped() error {
	if o.ctx == nil {
		return nil
	}
	if err := o.ctx.Err(); err != nil {
		return &streamError{fmt.Errorf("%w: %w", ErrOpenStopped, err)}
	}
	return nil
}

// done is WithContext's context's Done (nil without one).
func (o *options) done() <-chan struct{} {
	if o.ctx == nil {
		return nil
	}
	return o.ctx.Done()
}

// unstoppable is o without its context: the read of a state file Open
// has just created (empty), which it finishes.
func (o *options) unstoppable() *options {
	c := *o
	c.ctx = nil
	return &c
}

// WithContext gives Open up when ctx ends (pcpd serve: SIGTERM during a
// slow start): it looks at ctx before reading the state file, every
// stopPages pages of its own walk of the file's pages (inspectFile), before
// bbolt's consistency check and all through it (ctx.Done), after it, every
// stopEvery leases it checks, and before folding the log into the state
// file, and returns ErrOpenStopped with ctx's error, its handles and the
// directory's lock released (stopped during bbolt's check, which can not
// be cut short: released once the check, left to run on, has ended,
// ≈ 140 ms at most at 1 000 000 leases). What it leaves is what a kill at
// that moment leaves (Open is safe to kill at any point). Before, Open of
// 1 000 000 leases (≈ 1 s) ran to its end.
func WithContext(ctx context.Context) Option { return func(o *options) { o.ctx = ctx } }

// Checkpoint defaults: fold the log into bbolt once a segment holds this
// much, or this long after the last checkpoint when anything was logged.
// Commits wait for a checkpoint only when the active segment reaches
// logFullFactor × the size (the previous checkpoint has not finished).
const (
	DefaultCheckpointBytes    = 16 << 20
	DefaultCheckpointInterval = 30 * time.Second
	logFullFactor             = 4
	// logRunway: how far a segment file is zero-filled past what a record
	// needs when it grows. Small, so that a full disk turns into ENOSPC
	// within a few dozen commits of a new state directory; a segment's
	// growth doubles, so the metadata-carrying sync of growing happens a
	// handful of times per segment, and never once both segments have
	// reached their size (they are reused, never truncated).
	logRunway = 16 << 10
)

// WithClock replaces time.Now (tests of the epoch rules).
func WithClock(now func() time.Time) Option { return func(o *options) { o.now = now } }

// WithUnseenStep tells Open of a wall-clock step that the running pcpd
// never saw (made while it was down, or after its last clock check),
// measured since the state with epoch origin origin was written: step
// returns it, or 0 if none is known (pcpd's boot anchor,
// internal/bootclock). Open's clock-doubt check (EPO-04) then does not
// take a step back that step accounts for as a clock gone backwards: the
// engine moves the stored times with it instead of resetting the epoch.
func WithUnseenStep(step func(origin time.Time) time.Duration) Option {
	return func(o *options) { o.unseen = step }
}

// WithLockTimeout bounds how long Open waits for another process to release
// the state directory (default 2 s; 0 waits for ever): its lock on the
// directory (lockState), then bbolt's on leases.db.
func WithLockTimeout(d time.Duration) Option { return func(o *options) { o.lockTimeout = d } }

// WithoutOpenSnapshot skips the backup copy Open normally writes after a
// clean load (benchmarks of Open alone).
func WithoutOpenSnapshot() Option { return func(o *options) { o.noSnapshot = true } }

// WithStream makes Open hand each live lease to fn instead of collecting
// them in State.Leases (which stays nil), so a restart with a million
// leases never holds them all decoded at once. *Lease is valid only during
// the call: copy what must outlive it. Leases come in no particular order
// and only after the whole state was read and checked (Open reads it
// twice), so fn never sees a lease of a file Open then replaces; when Open
// restores the backup, fn gets the backup's leases. An error from fn ends
// Open with that error.
func WithStream(fn func(*Lease) error) Option { return func(o *options) { o.stream = fn } }

// WithLeasesLater makes Open check every stored lease as usual but keep
// none: State.Leases stays nil and State.Stream hands them out later,
// decoded one at a time into the same scratch lease, so that the caller
// can build its own table from them without all of them decoded beside it
// (at 1 000 000 leases ≈ 280 MB: the restart's peak, BENCHMARKS.md "Peak
// memory while restoring 1 000 000 leases"). So is a state restored from
// the backup copy (checked in full before Open returns; a damaged copy is
// moved aside and reported as without the option) and one read from a
// read-only directory (read through a read-only handle kept until the
// first write). Only a new state has State.Stream nil (and no leases).
// Ignored with WithStream.
func WithLeasesLater() Option { return func(o *options) { o.later = true } }

// WithCensus, with WithLeasesLater, hands fn each live lease as Open
// checks it, so that the caller can count what it needs before
// State.Stream hands them out (the restart sizes its lease table from it
// instead of reading every lease once more: BENCHMARKS.md item 62).
// fn(nil) says a check starts over (another file: the backup copy, the
// read-only handle): forget what was counted. The lease passed is valid
// only during the call. Nothing is handed to fn with WithStream or
// without WithLeasesLater.
func WithCensus(fn func(*Lease)) Option { return func(o *options) { o.census = fn } }

// WithCheckpoint sets when the log is folded into the state file: once
// the active log segment holds size octets, and every interval while
// anything is logged (defaults DefaultCheckpointBytes,
// DefaultCheckpointInterval).
func WithCheckpoint(size int64, interval time.Duration) Option {
	return func(o *options) {
		if size > 0 {
			o.ckptBytes = size
		}
		if interval > 0 {
			o.ckptEvery = interval
		}
	}
}

// Store is the open state directory. Its methods are safe for concurrent
// use.
//
// Lock order: ckMu, then mu, then wmu.
type Store struct {
	dir  string
	path string
	log  *zap.Logger
	opt  options

	// mu guards db, closed and (exclusively) setting up wal. Writers hold
	// it shared; replacing the handle or setting up the log after a
	// failure holds it exclusively.
	mu     sync.RWMutex
	db     *bolt.DB // nil while the file can not be opened for writing
	broken atomic.Bool
	closed bool
	// leasesPut: a commit with leases or deletes was made since Open;
	// State.Stream then refuses (streamLeases).
	leasesPut atomic.Bool
	// nlater: the leases Open checked and kept for State.Stream.
	// streamLog: Stream applies the directory's log on top of the file,
	// as Open did (not for a state restored from the backup: that log is
	// the damaged file's).
	nlater    int
	streamLog bool
	// ro: the read-only handle of a read-only directory's state file,
	// kept for State.Stream (WithLeasesLater) until the first write that
	// can open the file writable (reopen; a refused one keeps it) or
	// Close; it holds the file's shared lock meanwhile.
	ro *bolt.DB
	// checked: the state file Open read State.Stream's leases from, held
	// open (no new file can take its inode number) until a reopen after a
	// commit, or Close; replaced: a handle reopen opened since is on
	// another file (the name was given to one, or the file removed and a
	// new one created), and Stream refuses (review h/revbk). Under mu.
	checked  *os.File
	replaced bool
	// dirLock: the state directory's lock file (or, noLockFile set, the
	// directory itself), flocked exclusively (lockState) from before Open
	// looked at the directory until Close. noLockFile: why no lock file
	// is held; nothing is written until lockFileLater takes one. Under mu.
	// dirShared: the directory, flocked shared beside the lock file
	// (lockState), or nil. Under mu.
	dirLock    *os.File
	dirShared  *os.File
	noLockFile error

	// The log writer; wmu serialises appends (one record, one fdatasync
	// at a time: a record is written only after the one before it is
	// durable, which is what lets Open tell a torn tail from damage).
	wmu      sync.Mutex
	grown    *sync.Cond // on wmu: the grower finished a chunk (walSeg.busy cleared)
	wal      walWriter
	walReady atomic.Bool // false: log not set up (read-only, or setting it up failed); apply does it first

	// sel is what Open replays; kept until the first fold, then dropped.
	sel *logSel

	// ckMu serialises checkpoints (folds and rotations).
	ckMu    sync.Mutex
	foldBuf []byte
	ckKick  chan struct{}
	ckStop  chan struct{}
	ckDone  chan struct{}
	ckLast  time.Time // last checkpoint error logged (rate limit), under ckMu

	// pendingEpoch is an epoch origin ResetEpoch could not write (op
	// epochSet; epochClear: the origin cleared, ResetEpoch of the zero
	// time; epochKeep: none); the next successful record carries it, so a
	// reset is never forgotten.
	// pendingClear: Open decided the epoch must go (Fresh) but could not
	// write that yet; the next fold does it. pendingQuar: Open found the
	// quarantine bucket or its digest damaged; the fold setupLog does
	// rebuilds them (repairQuarantines).
	pendingMu    sync.Mutex
	pendingEpoch time.Time
	pendingOp    byte
	pendingClear bool
	pendingQuar  bool

	snapMu sync.Mutex // one snapshot at a time
	bg     sync.WaitGroup

	commits     atomic.Uint64
	failures    atomic.Uint64
	checkpoints atomic.Uint64

	// growing: a grower runs (at most one; set and cleared under wmu,
	// but for a grower that ends because the store closed). syncGrown counts the octets
	// commits had to zero-fill themselves, activeGrown those the grower
	// zero-filled in the active segment (tests). spareStuck (under wmu):
	// the spare is not filled ahead (no room, or it failed) until the
	// next rotation. foldOnly: the log switched to the spare early; the
	// checkpointer's next run folds without rotating again.
	growing     atomic.Bool
	syncGrown   atomic.Int64
	activeGrown atomic.Int64
	switches    atomic.Int64 // tryAppend's early rotations
	spareStuck  bool
	spareRoomOK bool  // under wmu: the file system had room for the spare when its growth began
	activeTo    int64 // under wmu: the grower grows the active segment up to here
	// hdrUndo (under wmu): a header a failed rotation wrote over and could
	// not yet put back; no record is appended before it is (rotate).
	hdrUndo  *headerUndo
	foldOnly atomic.Bool
}

// Stats counts log records and checkpoints (for metrics and the
// group-commit tests).
type Stats struct {
	Commits     uint64 // records appended to the log (each one fdatasync)
	Failures    uint64 // commits that failed; nothing of them was applied
	Checkpoints uint64 // log segments folded into the state file
}

// Stats returns the counters.
func (s *Store) Stats() Stats {
	return Stats{Commits: s.commits.Load(), Failures: s.failures.Load(), Checkpoints: s.checkpoints.Load()}
}

// Dir returns the state directory.
func (s *Store) Dir() string { return s.dir }

// boltMmap is the address space bbolt maps for leases.db from the start.
// bbolt otherwise maps the file's size rounded up to a power of two and
// re-maps it whenever a write transaction outgrows the map; a re-map in
// the middle of a checkpoint's fold first copies every key and value the
// fold has touched out of the old map onto the heap (node.dereference),
// and waits for every read transaction to end (a backup copy being
// written): a fold of 50 000 new leases into an empty file took 1.7 M
// allocations with re-maps, 0.1 M without (BENCHMARKS.md item 21). The
// map is address space only: the pages resident are those read, and a
// fold drops them again (dropMappedPages; before it did, this map kept
// them counted in pcpd's RSS: item 14). 1 GiB holds several million leases; past it bbolt
// re-maps in 1 GiB steps. A read-only open keeps bbolt's default: it
// never grows the file.
const boltMmap = 1 << 30

func boltOptions(o *options, readOnly bool) *bolt.Options {
	bo := &bolt.Options{
		Timeout:      o.lockTimeout,
		FreelistType: bolt.FreelistMapType, // array freelists get slow with big files
		ReadOnly:     readOnly,
		NoSync:       false, // durability is the point; never switch it off
	}
	if !readOnly {
		bo.InitialMmapSize = boltMmap
	}
	return bo
}

// boltGrow is how far bbolt grows leases.db past what a transaction
// needs. bbolt's default, 16 MiB once the map is larger than that (which
// boltMmap makes it from the start), would make even an empty state file
// 16 MiB of zeros. The step costs one truncate and fsync per transaction
// that grows the file, and transactions are checkpoints (one per log
// segment folded), so a small step adds no measurable work.
const boltGrow = 64 << 10

// openBolt opens the state file at path with boltOptions and boltGrow.
func openBolt(path string, o *options, readOnly bool) (*bolt.DB, error) {
	db, err := bolt.Open(path, 0o600, boltOptions(o, readOnly))
	if err != nil {
		return nil, err
	}
	db.AllocSize = boltGrow
	return db, nil
}

// Commit applies deletes, then puts, as one log record with one
// fdatasync: all of it is durable when Commit returns nil, none of it when
// it returns an error. Deleting an absent key is not an error. A key both
// deleted and put ends up put.
func (s *Store) Commit(put []Lease, del []Key) error {
	return s.CommitQuar(put, del, nil)
}

// QuarChange is the MAP-22 part of a commit: quarantines to end (Del),
// then to set (Put, replacing any at the same endpoint).
type QuarChange struct {
	Put []Quarantine
	Del []Endpoint
}

// CommitQuar is Commit with quarantine changes (q may be nil) in the same
// log record: the lease delete that frees a port and the port's
// quarantine are durable together or not at all (quarantine.go).
func (s *Store) CommitQuar(put []Lease, del []Key, q *QuarChange) error {
	s.leasesPut.Store(true)
	b := getBatch()
	defer putBatch(b)
	if err := b.encode(put, del, q); err != nil {
		return err
	}
	bs := [1]*batch{b}
	return s.apply(bs[:])
}

// ResetEpoch makes origin the epoch origin (EPO-03). If it can not be
// written now, the error says so and the store writes it with the next
// commit that succeeds; until then a restart still sees Fresh.
//
// The zero origin clears it: a later Open sees Fresh (the epoch must
// reset) until an origin is set again. The engine clears it while the
// stored leases may be of two wall-clock frames (the rewrite after a
// step, server/clock.go). Either is ordered with the commits: one that
// succeeds after ResetEpoch returned, failed or not, carries it if it is
// not yet written.
func (s *Store) ResetEpoch(origin time.Time) error {
	s.pendingMu.Lock()
	s.pendingEpoch, s.pendingOp = origin, epochSet
	if origin.IsZero() {
		s.pendingOp = epochClear
	}
	s.pendingMu.Unlock()
	return s.apply(nil)
}

// Touch records now as the latest time the daemon was alive; Open uses it to
// notice a clock that went backwards while pcpd was down (EPO-04). Commit
// does the same, so Touch matters only when nothing else is written; call it
// every minute or so.
func (s *Store) Touch(now time.Time) error {
	return s.applyAt(nil, now)
}

func (s *Store) apply(bs []*batch) error { return s.applyAt(bs, s.opt.now()) }

// applyAt appends one record holding every batch, the heartbeat time and
// any pending epoch origin. When the log is full it waits for the
// checkpoint that makes room, and fails if that checkpoint fails.
func (s *Store) applyAt(bs []*batch, now time.Time) error {
	for range 3 {
		full, err := s.tryAppend(bs, now)
		if !full {
			if err != nil {
				s.failures.Add(1)
			}
			return err
		}
		if err := s.checkpoint(ckRoom); err != nil {
			s.failures.Add(1)
			if errors.Is(err, ErrClosed) {
				return fmt.Errorf("store: commit: %w", ErrClosed)
			}
			return fmt.Errorf("store: commit: log full and no checkpoint possible: %w", err)
		}
	}
	s.failures.Add(1)
	return fmt.Errorf("store: commit: log still full after checkpoints: %w", ErrUnavailable)
}

// tryAppend writes and syncs one record; full means there was no room
// (nothing written).
func (s *Store) tryAppend(bs []*batch, now time.Time) (full bool, err error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return false, fmt.Errorf("store: commit: %w", ErrClosed)
	}
	if !s.walReady.Load() {
		// Setting the log up needs the store to ourselves.
		s.mu.RUnlock()
		err := s.reopen()
		s.mu.RLock()
		if err != nil {
			return false, err
		}
		if s.closed {
			return false, fmt.Errorf("store: commit: %w", ErrClosed)
		}
		if !s.walReady.Load() {
			return false, fmt.Errorf("store: commit: log not set up: %w", ErrUnavailable)
		}
	}
	if testHookAppend != nil {
		testHookAppend()
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	w := &s.wal
	// The pending epoch origin is read under wmu, after any wait for the
	// grower (which releases wmu), so records carry the origins in the
	// order ResetEpoch set them: read before, an append that another
	// overtook wrote its older origin after the other's newer one, the
	// last ResetEpoch undone (review h/revrw: a rewrite's moved origin
	// after the next step's clear, TestResetEpochStaleAppend).
	var epoch time.Time
	var op byte
	for {
		s.pendingMu.Lock()
		epoch, op = s.pendingEpoch, s.pendingOp
		s.pendingMu.Unlock()
		// The grower writes past alloc without wmu (grower): a record
		// that needs room there waits for its chunk. (Nothing is
		// decided before this wait.)
		if !w.seg[w.active].busy || w.off+recordLen(bs, op) <= w.seg[w.active].alloc {
			break
		}
		s.grown.Wait()
	}
	seg := &w.seg[w.active]
	if w.off > walHeaderSize && w.off+recordLen(bs, op) > seg.alloc && !s.spareStuck && s.spareReady() {
		// The active segment is out of written room and the spare is
		// ready: go on in the spare (a checkpoint's rotation, early)
		// instead of growing the file commits sync. The checkpointer
		// folds what the active one holds. Never away from an empty
		// segment: a generation with no record is never folded, so
		// walgen would stay on it while the next rotation overwrote it
		// with the generation after next, and a crash in that window
		// would find the log not starting where the state file says
		// (review of the spare, TestNoSwitchFromEmptySegment). Should
		// the rotation fail, the record goes where it would have, and
		// the spare is not tried again until a checkpoint makes a new
		// one (each try would write and sync its header again).
		if err := s.rotate(); err == nil {
			s.switches.Add(1)
			s.foldOnly.Store(true)
			s.kick()
			seg = &w.seg[w.active]
		} else {
			s.spareStuck = true
		}
	}
	if err := s.undoHeader(); err != nil {
		return false, fmt.Errorf("store: commit: %w: %w", ErrUnavailable, err)
	}
	w.buf = beginRecord(w.buf[:0], seg.gen, w.seq, now, op, epoch)
	for _, b := range bs {
		w.buf = append(w.buf, b.buf...)
	}
	finishRecord(w.buf)
	rec := w.buf
	defer func() {
		if cap(w.buf) > maxPooled {
			w.buf = nil
		}
	}()
	n := int64(len(rec))
	if w.off > walHeaderSize && w.off+n > s.opt.ckptBytes*logFullFactor {
		return true, nil
	}
	before := seg.alloc
	err = seg.claim(w.off+n, s.opt.ckptBytes)
	s.syncGrown.Add(seg.alloc - before)
	if err != nil {
		return false, fmt.Errorf("store: commit: %w: %w", ErrUnavailable, err)
	}
	_, err = seg.f.WriteAt(rec, w.off)
	if err == nil {
		err = fdatasync(seg.f)
	}
	if err != nil {
		s.invalidate(seg, w.off)
		return false, fmt.Errorf("store: commit: %w: %w", ErrUnavailable, err)
	}
	w.off += n
	seg.end = w.off
	w.seq++
	s.commits.Add(1)
	s.maybeGrowAhead()
	if op != epochKeep {
		s.pendingMu.Lock()
		if s.pendingOp == op && s.pendingEpoch.Equal(epoch) {
			s.pendingEpoch, s.pendingOp = time.Time{}, epochKeep
		}
		s.pendingMu.Unlock()
	}
	if w.off >= s.opt.ckptBytes {
		select {
		case s.ckKick <- struct{}{}:
		default:
		}
	}
	return false, nil
}

// testHookAppend, when set (tests only), runs in tryAppend before it takes
// wmu: another append may run to its end there (TestResetEpochStaleAppend).
// One nil check a commit.
var testHookAppend func()

// recordLen is the length of the record tryAppend writes for bs.
func recordLen(bs []*batch, epochOp byte) int64 {
	n := int64(recHdrLen + 8 + 1) // header, seen, epochOp
	if epochOp == epochSet {
		n += 8
	}
	for _, b := range bs {
		n += int64(len(b.buf))
	}
	return n
}

// invalidate is called after a failed write or sync at off: it zeroes the
// record's header, so that a record the caller was told failed can not be
// replayed after a crash should its octets have reached the disk anyway.
// Best effort: the next record is written at the same offset and
// overwrites it regardless.
func (s *Store) invalidate(seg *walSeg, off int64) {
	var z [recHdrLen]byte
	if _, err := seg.f.WriteAt(z[:], off); err == nil {
		_ = fdatasync(seg.f)
	}
}

// update is db.Update with a panic turned into an error: a fault inside
// bbolt must not take the daemon down with it, only fail this commit.
func (s *Store) update(fn func(*bolt.Tx) error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("store: bbolt panicked: %v", r)
		}
	}()
	return s.db.Update(fn)
}

// reopen replaces a handle that failed a write, opens the file when the
// directory was read-only at Open, and sets the log up when that has not
// happened yet (folding whatever it holds into the state file first).
func (s *Store) reopen() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("store: commit: %w", ErrClosed)
	}
	if !s.broken.Load() && s.db != nil && s.walReady.Load() {
		return nil // someone else did it
	}
	if s.broken.Load() || s.db == nil {
		if s.db != nil {
			_ = s.db.Close()
			s.db = nil
		}
		// The read-only handle's shared lock would keep the writable
		// open waiting (flock: per open file, this process too), so it
		// is let go first; but not while the file still can not be
		// opened for writing, which the open bbolt does first tells
		// without it (flock, not fcntl locks: closing the probe leaves
		// the handle's lock alone). Before, every refused write closed
		// and opened the read-only handle again (its open, flock and
		// mmap: 30-50 µs and 11 more allocations a refused write,
		// BenchmarkRefusedWriteReadOnly; TestReadOnlyRefusalKeepsHandle).
		hadRO := s.ro != nil
		if hadRO {
			f, err := os.OpenFile(s.path, os.O_RDWR, 0)
			if err != nil && isReadOnlyErr(err) {
				// As after the handle's reopen by name: Stream refuses
				// if the name is another file's now (review h/revbk,
				// TestStreamRefusesReplacedFile), though the kept
				// handle is still on the one Open checked.
				s.sameChecked()
				return fmt.Errorf("store: reopen %s: %w: %w", s.path, ErrUnavailable, err)
			}
			if err == nil {
				_ = f.Close()
			}
		}
		// Nothing is written without the lock file (lockState): a
		// Store that could lock only the directory takes it now, or
		// stays read-only (another pcpd, started once the directory
		// was writable, holds it).
		if err := s.lockFileLater(); err != nil {
			if hadRO {
				s.sameChecked()
			}
			return fmt.Errorf("store: reopen %s: %w: %w", s.path, ErrUnavailable, err)
		}
		if hadRO {
			_ = s.ro.Close()
			s.ro = nil
		}
		db, err := s.openWritable()
		if err != nil {
			if hadRO {
				// Still read-only: keep the leases readable for
				// State.Stream (Stream checks them again as it reads).
				if s.ro, _ = openBolt(s.path, &s.opt, true); s.ro != nil {
					s.sameChecked()
				}
			}
			return fmt.Errorf("store: reopen %s: %w: %w", s.path, ErrUnavailable, err)
		}
		s.db = db
		s.sameChecked()
		s.broken.Store(false)
		s.log.Info("state file writable again", zap.String("path", s.path))
	}
	if !s.walReady.Load() {
		if err := s.setupLog(); err != nil {
			return fmt.Errorf("store: set up log: %w: %w", ErrUnavailable, err)
		}
	}
	return nil
}

// HoldLock reports whether the Store holds the state directory's lock
// file, taking it now if Open could lock only the directory (lockState's
// fallback; lockFileLater): nil once held. Another file pcpd writes in
// the directory (the boot anchor, cmd/pcpd) is written only after: a pcpd
// that never got the lock file must not write beside another one started
// once the directory was writable (review h/revstatelock).
func (s *Store) HoldLock() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("store: %w", ErrClosed)
	}
	return s.lockFileLater()
}

// openWritable opens the state file for writing, creating an empty store
// file (through a temporary file and rename) if there is none.
func (s *Store) openWritable() (*bolt.DB, error) {
	if _, err := os.Stat(s.path); errors.Is(err, fs.ErrNotExist) {
		if err := createEmpty(s.path, &s.opt); err != nil {
			return nil, err
		}
	}
	return openBolt(s.path, &s.opt, false)
}

// Close folds the log into the state file, waits for a running snapshot
// and closes the files. Leases stay on disk; Close does not touch the
// kernel. A final fold that fails loses nothing: the log is replayed by the
// next Open.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	if s.ckStop != nil {
		close(s.ckStop)
		<-s.ckDone
	}
	s.bg.Wait()
	s.mu.RLock()
	healthy := s.db != nil && s.walReady.Load() && !s.broken.Load()
	s.mu.RUnlock()
	if healthy {
		if err := s.checkpoint(ckAll); err != nil {
			s.log.Warn("final checkpoint failed; the next start replays the log", zap.Error(err))
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.wal.close()
	if s.ro != nil {
		_ = s.ro.Close()
		s.ro = nil
	}
	if s.checked != nil {
		_ = s.checked.Close()
		s.checked = nil
	}
	// The directory's lock goes last, after every file in it is closed.
	defer func() {
		if s.dirLock != nil {
			_ = s.dirLock.Close()
			s.dirLock = nil
		}
		if s.dirShared != nil {
			_ = s.dirShared.Close()
			s.dirShared = nil
		}
	}()
	if s.db == nil {
		return nil
	}
	err := s.db.Close()
	s.db = nil
	if err != nil {
		return fmt.Errorf("store: close: %w", err)
	}
	return nil
}

// Checkpoint folds everything logged so far into the state file now,
// instead of waiting for the background checkpoint (tests, tools).
func (s *Store) Checkpoint() error {
	s.mu.RLock()
	closed := s.closed
	s.mu.RUnlock()
	if closed {
		return fmt.Errorf("store: checkpoint: %w", ErrClosed)
	}
	return s.checkpoint(ckAll)
}

// Snapshot writes the current state to leases.db.bak: it first folds the
// log into the state file (so the copy holds every commit acknowledged
// before the call), then copies the file in a read transaction (commits go
// on meanwhile, into the log), to a temporary file, fsynced and renamed
// over the old copy, so a crash during Snapshot leaves the previous copy
// intact.
func (s *Store) Snapshot() error {
	s.mu.RLock()
	closed := s.closed
	s.mu.RUnlock()
	if closed {
		return fmt.Errorf("store: snapshot: %w", ErrClosed)
	}
	if err := s.checkpoint(ckAll); err != nil {
		if errors.Is(err, ErrClosed) {
			return fmt.Errorf("store: snapshot: %w", ErrClosed)
		}
		return fmt.Errorf("store: snapshot: %w", err)
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return fmt.Errorf("store: snapshot: %w", ErrClosed)
	}
	if s.db == nil {
		return fmt.Errorf("store: snapshot: state file not open: %w", ErrUnavailable)
	}
	return s.snapshot(s.db)
}

func (s *Store) snapshot(db *bolt.DB) error {
	s.snapMu.Lock()
	defer s.snapMu.Unlock()
	bak := filepath.Join(s.dir, BackupName)
	tmp := bak + tmpSuffix
	err := db.View(func(tx *bolt.Tx) error { return writeSynced(tmp, tx) })
	if err == nil {
		err = os.Rename(tmp, bak)
	}
	if err == nil {
		err = syncDir(s.dir)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("store: snapshot %s: %w", bak, err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func timeBytes(t time.Time) []byte {
	return binary.BigEndian.AppendUint64(nil, uint64(t.UnixNano()))
}

func bytesTime(b []byte) (time.Time, bool) {
	if len(b) != 8 {
		return time.Time{}, false
	}
	t := time.Unix(0, int64(binary.BigEndian.Uint64(b))).UTC()
	if t.Before(minTime) || t.After(maxTime) {
		return time.Time{}, false
	}
	return t, true
}

// isReadOnlyErr: the directory or file can not be written, as opposed to
// the file being bad.
func isReadOnlyErr(err error) bool {
	return errors.Is(err, syscall.EROFS) || errors.Is(err, fs.ErrPermission)
}
