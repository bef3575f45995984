package store

import (
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
)

// File names inside the state directory.
const (
	DBName     = "leases.db"
	BackupName = "leases.db.bak"
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
}

// WithClock replaces time.Now (tests of the epoch rules).
func WithClock(now func() time.Time) Option { return func(o *options) { o.now = now } }

// WithLockTimeout bounds how long Open waits for another process to release
// the state directory (default 2 s).
func WithLockTimeout(d time.Duration) Option { return func(o *options) { o.lockTimeout = d } }

// WithoutOpenSnapshot skips the backup copy Open normally writes after a
// clean load (benchmarks of Open alone).
func WithoutOpenSnapshot() Option { return func(o *options) { o.noSnapshot = true } }

// Store is the open state directory. Its methods are safe for concurrent
// use.
type Store struct {
	dir  string
	path string
	log  *zap.Logger
	opt  options

	// mu guards db and closed. Writers hold it shared (bbolt serialises
	// them itself); replacing the handle after a failure holds it
	// exclusively.
	mu     sync.RWMutex
	db     *bolt.DB // nil while the file can not be opened for writing
	broken atomic.Bool
	closed bool

	// pendingEpoch is an epoch origin ResetEpoch could not write; the next
	// successful transaction writes it, so a reset is never forgotten.
	pendingMu    sync.Mutex
	pendingEpoch time.Time

	snapMu sync.Mutex // one snapshot at a time
	bg     sync.WaitGroup

	commits  atomic.Uint64
	failures atomic.Uint64
}

// Stats counts transactions (for metrics and the group-commit tests).
type Stats struct {
	Commits  uint64 // write transactions committed (each one fsync round)
	Failures uint64 // write transactions that failed and were rolled back
}

// Stats returns the transaction counters.
func (s *Store) Stats() Stats {
	return Stats{Commits: s.commits.Load(), Failures: s.failures.Load()}
}

// Dir returns the state directory.
func (s *Store) Dir() string { return s.dir }

func boltOptions(o *options, readOnly bool) *bolt.Options {
	return &bolt.Options{
		Timeout:      o.lockTimeout,
		FreelistType: bolt.FreelistMapType, // array freelists get slow with big files
		ReadOnly:     readOnly,
		NoSync:       false, // durability is the point; never switch it off
	}
}

// Commit applies deletes, then puts, in one transaction with one fsync
// round: all of it is durable when Commit returns nil, none of it when it
// returns an error. Deleting an absent key is not an error. A key both
// deleted and put ends up put.
func (s *Store) Commit(put []Lease, del []Key) error {
	b, err := encodeBatch(put, del)
	if err != nil {
		return err
	}
	return s.apply([]*batch{b})
}

// ResetEpoch makes origin the epoch origin (EPO-03). If it can not be
// written now, the error says so and the store writes it with the next
// transaction that succeeds; until then a restart still sees Fresh.
func (s *Store) ResetEpoch(origin time.Time) error {
	s.pendingMu.Lock()
	s.pendingEpoch = origin
	s.pendingMu.Unlock()
	return s.apply(nil)
}

// Touch records now as the latest time the daemon was alive; Open uses it to
// notice a clock that went backwards while pcpd was down (EPO-04). Commit
// does the same, so Touch matters only when nothing else is written; call it
// every minute or so.
func (s *Store) Touch(now time.Time) error {
	return s.applyAt([]*batch{}, now)
}

func (s *Store) apply(bs []*batch) error { return s.applyAt(bs, s.opt.now()) }

// applyAt runs one write transaction holding every batch, the heartbeat
// time and any pending epoch origin.
func (s *Store) applyAt(bs []*batch, now time.Time) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return fmt.Errorf("store: commit: %w", ErrClosed)
	}
	if s.broken.Load() || s.db == nil {
		// Reopen needs the handle to ourselves.
		s.mu.RUnlock()
		err := s.reopen()
		s.mu.RLock()
		if err != nil {
			s.failures.Add(1)
			return err
		}
		if s.closed {
			return fmt.Errorf("store: commit: %w", ErrClosed)
		}
		if s.db == nil {
			s.failures.Add(1)
			return fmt.Errorf("store: commit: state file not open: %w", ErrUnavailable)
		}
	}
	s.pendingMu.Lock()
	epoch := s.pendingEpoch
	s.pendingMu.Unlock()

	err := s.update(func(tx *bolt.Tx) error {
		meta, leases := tx.Bucket(bucketMeta), tx.Bucket(bucketLeases)
		if meta == nil || leases == nil {
			return fmt.Errorf("store: buckets missing: %w", ErrCorrupt)
		}
		// Fuller pages than bbolt's default 0.5: leases arrive in key order
		// per client, and a smaller file loads faster and maps less.
		leases.FillPercent = 0.9
		d, ok := parseDigest(meta.Get(metaDigest))
		if !ok {
			return fmt.Errorf("store: digest missing: %w", ErrCorrupt)
		}
		for _, b := range bs {
			for _, k := range b.del {
				if old := leases.Get(k); old != nil {
					d.add(old, -1)
					if err := leases.Delete(k); err != nil {
						return err
					}
				}
			}
			for i := range b.keys {
				if old := leases.Get(b.keys[i]); old != nil {
					d.add(old, -1)
				}
				if err := leases.Put(b.keys[i], b.vals[i]); err != nil {
					return err
				}
				d.add(b.vals[i], +1)
			}
		}
		if len(bs) > 0 {
			if err := meta.Put(metaDigest, d.bytes()); err != nil {
				return err
			}
		}
		if !epoch.IsZero() {
			if err := meta.Put(metaEpoch, timeBytes(epoch)); err != nil {
				return err
			}
		}
		return meta.Put(metaSeen, timeBytes(now))
	})
	if err != nil {
		s.failures.Add(1)
		// Whatever bbolt kept in memory after a failed write, the next
		// transaction starts from what is on disk.
		s.broken.Store(true)
		return fmt.Errorf("store: commit: %w: %w", ErrUnavailable, err)
	}
	s.commits.Add(1)
	if !epoch.IsZero() {
		s.pendingMu.Lock()
		if s.pendingEpoch.Equal(epoch) {
			s.pendingEpoch = time.Time{}
		}
		s.pendingMu.Unlock()
	}
	return nil
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

// reopen replaces a handle that failed a write, or opens the file when the
// directory was read-only at Open.
func (s *Store) reopen() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return fmt.Errorf("store: commit: %w", ErrClosed)
	}
	if !s.broken.Load() && s.db != nil {
		return nil // someone else did it
	}
	if s.db != nil {
		_ = s.db.Close()
		s.db = nil
	}
	db, err := s.openWritable()
	if err != nil {
		return fmt.Errorf("store: reopen %s: %w: %w", s.path, ErrUnavailable, err)
	}
	s.db = db
	s.broken.Store(false)
	s.log.Info("state file writable again", zap.String("path", s.path))
	return nil
}

// openWritable opens the state file for writing, creating an empty store
// file (through a temporary file and rename) if there is none.
func (s *Store) openWritable() (*bolt.DB, error) {
	if _, err := os.Stat(s.path); errors.Is(err, fs.ErrNotExist) {
		if err := createEmpty(s.path, &s.opt); err != nil {
			return nil, err
		}
	}
	return bolt.Open(s.path, 0o600, boltOptions(&s.opt, false))
}

// Close waits for a running snapshot and closes the file. Leases stay on
// disk; Close does not touch the kernel.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	s.bg.Wait()
	s.mu.Lock()
	defer s.mu.Unlock()
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

// Snapshot writes the current state to leases.db.bak: a consistent copy
// taken in a read transaction (commits go on meanwhile), written to a
// temporary file, fsynced and renamed over the old copy, so a crash during
// Snapshot leaves the previous copy intact.
func (s *Store) Snapshot() error {
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
	err := db.View(func(tx *bolt.Tx) error {
		f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return err
		}
		if _, err := tx.WriteTo(f); err != nil {
			f.Close()
			return err
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return err
		}
		return f.Close()
	})
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
