package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
	"go.uber.org/zap"

	"github.com/pcpd/pcpd/internal/fsperm"
)

// dropEvery: how many leases to decode between dropping the mapped pages
// already read from our RSS (see dropMapped).
const dropEvery = 100_000

// stopEvery is how many leases Open checks between two looks at its
// context (WithContext): ≈ 4 ms of reading at 1 µs a lease.
const stopEvery = 4096

// maxCheckErrors bounds how many tx.Check findings are kept for the report.
const maxCheckErrors = 5

// Open opens (or creates) the state in dir and returns what it holds.
//
// State.Fresh is true when the epoch must be reset: a new directory, a
// state file that was missing, unreadable or corrupt (and then restored
// from the backup copy or started empty), a doubtful clock, or a reset that
// an earlier run asked for but never completed. State.Recovered and an
// error-level log line say what happened whenever it was more than a new
// directory; also, without Fresh, when damaged MAP-22 quarantines were
// dropped (readQuarantines: they cost no lease and no epoch).
//
// When the directory is read-only, Open still returns the leases it can
// read, and every write fails with ErrUnavailable until it becomes
// writable again. Open fails only when the directory can not be used at all
// (another pcpd holds it, or the file is corrupt and can not be moved
// aside).
//
// Open first takes an exclusive lock on the directory (lockState: a 0600
// lock file in it, only where none can be made the directory itself),
// waiting up to WithLockTimeout, and holds it until Close: another pcpd,
// or another Open in this process, gets ErrLocked.
func Open(dir string, log *zap.Logger, opts ...Option) (*Store, State, error) {
	if log == nil {
		log = zap.NewNop()
	}
	o := options{now: time.Now, lockTimeout: 2 * time.Second,
		ckptBytes: DefaultCheckpointBytes, ckptEvery: DefaultCheckpointInterval}
	for _, f := range opts {
		f(&o)
	}
	// Restored leases are checked against the rules, not ownership: a
	// directory another user can write could plant pinholes (or hold
	// the lock). Refused before anything in it is read; what is missing
	// of it is created only inside checked directories.
	// ".." taken lexically, as filepath.Join takes it for the files: the
	// directory checked is the one they are in (review h/revfsperm2).
	dir = filepath.Clean(dir)
	if err := fsperm.MkdirAll(dir, 0o700, false); err != nil {
		return nil, State{}, fmt.Errorf("store: state directory: %w", err)
	}
	// And so could a file in it that others can write (copied in with
	// its mode: pcpd creates them all 0600).
	if err := fsperm.Entries(dir); err != nil {
		return nil, State{}, fmt.Errorf("store: state directory: %w", err)
	}
	// The directory's lock first: nothing in it is looked at, let alone
	// recovered, by a pcpd that does not hold it (lockState).
	if err := o.stopped(); err != nil {
		return nil, State{}, err
	}
	lock, dirShared, noLockFile, err := lockState(dir, o.lockTimeout)
	if err != nil {
		return nil, State{}, err
	}
	if lock != nil && noLockFile == nil && dirShared == nil {
		log.Warn("state directory flocked by another process (a pcpd older than its lock file, or another user): only leases.db's own lock keeps an older pcpd out",
			zap.String("dir", dir))
	}
	s := &Store{dir: dir, path: filepath.Join(dir, DBName), log: log, opt: o, dirLock: lock, dirShared: dirShared, noLockFile: noLockFile,
		ckKick: make(chan struct{}, 1), ckStop: make(chan struct{}), ckDone: make(chan struct{})}
	s.grown = sync.NewCond(&s.wmu)
	st, err := s.load()
	if err == nil && !st.Fresh && st.Recovered == "" {
		// Nothing written yet (the fold below writes): given up here, the
		// next Open reads it all again. Not once load made the directory
		// new or recovered it (a state file created, moved aside or
		// restored): what it did is to be reported now, the next Open
		// would take the new file, without an epoch, for a reset left
		// pending (review h/revops, TestOpenStopsFreshDir).
		err = o.stopped()
	}
	if err != nil {
		release := func() {
			if s.db != nil {
				_ = s.db.Close()
			}
			if s.ro != nil {
				_ = s.ro.Close()
			}
			if s.checked != nil {
				_ = s.checked.Close()
			}
			if s.dirLock != nil {
				_ = s.dirLock.Close()
			}
			if s.dirShared != nil {
				_ = s.dirShared.Close()
			}
		}
		if left := (*checkLeft)(nil); errors.As(err, &left) {
			// Stopped during bbolt's check: the directory stays locked
			// until the check has ended and the file is closed, so no
			// Open of this process takes it meanwhile (one that exits
			// does not wait).
			leftChecks.Add(1)
			go func() {
				defer leftChecks.Done()
				<-left.closed
				release()
			}()
		} else {
			release()
		}
		return nil, State{}, err
	}
	if st.Recovered != "" {
		// The leases kept: in State.Leases, or for State.Stream
		// (WithLeasesLater; counting State.Leases logged 0 for them all).
		n := len(st.Leases)
		if st.Stream != nil {
			n = s.nlater
		}
		log.Error("state recovery", zap.String("dir", dir), zap.String("recovered", st.Recovered),
			zap.Bool("epoch_reset", st.Fresh), zap.Int("leases", n))
	}
	if s.db != nil {
		// Fold what the log held into the state file, so the file is
		// complete again, and start a new log generation. If that fails
		// (disk full), the log stays as it is and the next commit tries
		// again; until then commits fail.
		if err := s.setupLog(); err != nil {
			log.Error("log not folded into the state file; commits are refused until it is", zap.Error(err))
		}
	}
	go s.checkpointer()
	if s.db != nil && s.walReady.Load() && !o.noSnapshot {
		// The file was just read and checked end to end: it is the new
		// last good copy. Written in the background; Close waits for it.
		db := s.db
		s.bg.Add(1)
		go func() {
			defer s.bg.Done()
			start := time.Now()
			if err := s.snapshot(db); err != nil {
				log.Warn("backup copy not written", zap.Error(err))
				return
			}
			log.Debug("backup copy written", zap.Duration("took", time.Since(start)))
		}()
	}
	return s, st, nil
}

// loaded is what a readable state file holds.
type loaded struct {
	leases []Lease
	quar   []Quarantine
	epoch  time.Time // zero: absent (reset pending)
	seen   time.Time
	meta   string // non-empty: a meta page was damaged (see damagedMeta)
	walgen uint64
	sel    *logSel // the log replayed on top (nil: none)
	// later: the leases were checked and not kept (readMode.none): the
	// store reads them again for State.Stream. nlater: how many.
	later  bool
	nlater int
	// quarDamage: non-empty when quarantines were dropped as damaged
	// (readQuarantines); leases and epoch are not affected.
	quarDamage string
}

func (s *Store) load() (State, error) {
	bak := filepath.Join(s.dir, BackupName)
	// Without the lock file (lockState's fallback: it could not be
	// created) nothing is written: the directory is taken as read-only,
	// noLockFile the reason, until reopen takes the lock file.
	ro := s.noLockFile
	if ro == nil {
		// Leftovers of a crash in createEmpty or snapshot; never the state.
		_ = os.Remove(s.path + tmpSuffix)
		_ = os.Remove(bak + tmpSuffix)
	}
	_, err := os.Stat(s.path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if bfi, berr := os.Stat(bak); berr == nil {
			if ro != nil {
				return State{}, fmt.Errorf("store: state file %s missing and the backup copy can not be restored (%w): %w", s.path, ro, ErrUnavailable)
			}
			return s.recover(s.missingCause(bfi))
		}
		sel, logFound := logBounds(s.dir, 0)
		s.sel = sel
		err := ro
		if err == nil {
			err = createEmpty(s.path, &s.opt)
		}
		if err != nil {
			if isReadOnlyErr(err) {
				s.log.Error("state directory not writable: serving without durable state, every change refused until it is",
					zap.String("dir", s.dir), zap.Error(err))
				return State{Fresh: true, Recovered: "state directory not writable: " + err.Error()}, nil
			}
			return State{}, fmt.Errorf("store: create %s: %w", s.path, err)
		}
		db, ld, err := readState(s.path, s.opt.unstoppable(), false, "")
		if err != nil {
			return State{}, fmt.Errorf("store: new state file: %w", err)
		}
		s.db = db
		if logFound {
			// The log of a state file that is gone: what it held is lost.
			return State{Leases: ld.leases, Fresh: true,
				Recovered: fmt.Sprintf("state file %s missing but its log is there: leases lost, log not replayed; started with no leases", s.path)}, nil
		}
		s.log.Info("new state directory", zap.String("dir", s.dir))
		return State{Leases: ld.leases, Fresh: true}, nil
	case err != nil:
		return State{}, fmt.Errorf("store: %w", err)
	}

	var db *bolt.DB
	var ld loaded
	err = ro
	if err == nil {
		db, ld, err = readState(s.path, &s.opt, false, s.dir)
	}
	if err == nil {
		s.db = db
		s.sel = ld.sel
		return s.judge(ld)
	}
	if errors.Is(err, ErrLocked) || isStreamErr(err) {
		return State{}, err
	}
	if ro != nil || isReadOnlyErr(err) {
		// Read what is there; writes wait for the directory to come back.
		rodb, ld, rerr := readState(s.path, &s.opt, true, s.dir)
		if isStreamErr(rerr) {
			return State{}, fmt.Errorf("%w; it was reading a read-only state directory: %w", rerr, err)
		}
		if rerr != nil {
			return State{}, fmt.Errorf("store: state directory read-only and state unreadable (%w); can not repair it: %w", rerr, ErrUnavailable)
		}
		if ld.later {
			// State.Stream reads the leases from it again (WithLeasesLater);
			// the first write that can open the file writable closes it
			// (reopen).
			s.ro = rodb
		} else {
			_ = rodb.Close()
		}
		s.log.Error("state directory read-only: leases loaded, every change refused until it is writable",
			zap.String("dir", s.dir), zap.Error(err))
		st, jerr := s.judge(ld)
		st.Recovered = join(st.Recovered, "state directory read-only: "+err.Error())
		return st, jerr
	}
	if isEnvErr(err) {
		return State{}, fmt.Errorf("store: open %s: %w", s.path, err)
	}
	return s.recover(err)
}

// judge decides whether the epoch survives (EPO-04): only with an origin on
// record and a clock that has not gone backwards since the last run.
func (s *Store) judge(ld loaded) (State, error) {
	now := s.opt.now()
	if s.opt.unseen != nil && !ld.epoch.IsZero() {
		// The stored times are the old wall clock's: a step back since
		// (WithUnseenStep) puts them ahead of now by the step. The
		// heartbeat may have been written after the step, so the later
		// of the two clocks is the one to judge by.
		if d := s.opt.unseen(ld.epoch); d < 0 {
			now = now.Add(-d)
		}
	}
	st := State{Leases: ld.leases, Quarantines: ld.quar, EpochOrigin: ld.epoch}
	if ld.later && (s.db != nil || s.ro != nil) {
		st.Stream = s.streamLeases
		s.nlater, s.streamLog = ld.nlater, true
		s.noteChecked()
	}
	s.noteQuarDamage(&st, ld)
	switch {
	case ld.meta != "":
		st.Recovered = join("state file damaged ("+ld.meta+"): the last transaction may be lost; kept the older consistent state", st.Recovered)
	case ld.sel != nil && ld.sel.problem != "":
		st.Recovered = join("log damaged ("+ld.sel.problem+"): changes logged after the damage are lost; kept the state up to it", st.Recovered)
	case ld.epoch.IsZero():
		st.Recovered = join("epoch reset still pending from an earlier run: it did not finish an epoch reset, or the rewrite of the stored leases after a wall-clock step (their times may be of two clock frames)", st.Recovered)
	case ld.epoch.After(now.Add(ClockSlack)):
		st.Recovered = join(fmt.Sprintf("clock doubtful: epoch origin %s is in the future (now %s)",
			ld.epoch.Format(time.RFC3339), now.UTC().Format(time.RFC3339)), st.Recovered)
	case ld.seen.After(now.Add(ClockSlack)):
		st.Recovered = join(fmt.Sprintf("clock doubtful: pcpd was last alive at %s, later than now (%s)",
			ld.seen.Format(time.RFC3339), now.UTC().Format(time.RFC3339)), st.Recovered)
	default:
		return st, nil
	}
	st.Fresh = true
	st.EpochOrigin = time.Time{}
	// Forget the old origin on disk too, so that a crash before the engine
	// calls ResetEpoch can not bring it back: the fold of the log that Open
	// does next (or the first one that succeeds) deletes it, after
	// whatever the log says.
	s.pendingMu.Lock()
	s.pendingClear = true
	s.pendingMu.Unlock()
	return st, nil
}

// noteQuarDamage reports quarantines readQuarantines dropped as damaged
// (in st.Recovered, which Open logs at error level) and has the next fold
// rebuild their bucket. It sets neither Fresh nor anything about leases:
// a quarantine is no mapping, so its loss is no loss of mapping state
// (EPO-03) and no reason for clients to re-map.
func (s *Store) noteQuarDamage(st *State, ld loaded) {
	if ld.quarDamage == "" {
		return
	}
	st.Recovered = join(st.Recovered, ld.quarDamage)
	s.pendingMu.Lock()
	s.pendingQuar = true
	s.pendingMu.Unlock()
}

// recover handles a state file that can not be used: move it aside, then
// restore the backup copy if it passes the same checks, else start empty.
// Either way the epoch resets: the copy may be older than the last commit.
func (s *Store) recover(cause error) (State, error) {
	// The log only makes sense on top of the state file it belongs to:
	// with that file gone, which of its segments are already in the backup
	// can not be told. Start a generation above all of it instead, so none
	// of it is replayed later, and clear the epoch in the first fold.
	s.sel, _ = logBounds(s.dir, 0)
	s.pendingMu.Lock()
	s.pendingClear = true
	s.pendingMu.Unlock()
	now := s.opt.now().UTC()
	stamp := now.Format(asideStamp)
	var what []string
	moved := "" // where the state file went, for a stopped recovery's error
	if _, err := os.Stat(s.path); err == nil {
		aside := s.path + ".corrupt-" + stamp
		if err := os.Rename(s.path, aside); err != nil {
			return State{}, fmt.Errorf("store: state file unusable (%v) and can not be moved aside: %w", cause, err)
		}
		what = append(what, fmt.Sprintf("state file unusable (%v), moved to %s", cause, filepath.Base(aside)))
		moved = "state file moved to " + filepath.Base(aside) + "; "
	} else {
		what = append(what, cause.Error())
	}
	if testHookRecover != nil {
		testHookRecover()
	}

	bak := filepath.Join(s.dir, BackupName)
	if fi, err := os.Stat(bak); err == nil {
		db, ld, rerr := restore(bak, s.path, &s.opt)
		if isStreamErr(rerr) {
			// Stopped (WithContext) while the copy was read: the error
			// keeps what the recovery was for (errors.Is finds both),
			// which serve logs; the next start restores the copy.
			return State{}, fmt.Errorf("%w; it was recovering the state from: %w (%sbackup %s not restored: the next start restores it)",
				rerr, cause, moved, BackupName)
		}
		if isEnvErr(rerr) {
			// No room for the copy (or the like): the copy is not
			// damaged, so it stays; the next Open, finding no state
			// file, restores it. Moved aside, it was lost and that Open
			// started with no leases.
			return State{}, fmt.Errorf("store: %s: backup %s not restored, kept for the next start: %w", strings.Join(what, "; "), BackupName, rerr)
		}
		if rerr == nil {
			s.db = db
			s.sel.nextGen = max(s.sel.nextGen, ld.walgen)
			n := len(ld.leases)
			if ld.later {
				n = ld.nlater
			}
			what = append(what, fmt.Sprintf("restored %d leases from backup %s written %s; epoch reset because later changes may be lost",
				n, BackupName, fi.ModTime().UTC().Format(time.RFC3339)))
			st := State{Leases: ld.leases, Quarantines: ld.quar, Fresh: true, Recovered: strings.Join(what, "; ")}
			if ld.later {
				// Checked in full above; State.Stream reads the restored
				// file again, without the log: the log in the directory
				// is the file's that was moved aside, and records made
				// after this carry no lease (Stream refuses after a
				// commit).
				st.Stream = s.streamLeases
				s.nlater, s.streamLog = ld.nlater, false
				s.noteChecked()
			}
			s.noteQuarDamage(&st, ld)
			return st, nil
		}
		aside := bak + ".corrupt-" + stamp
		if err := os.Rename(bak, aside); err != nil {
			return State{}, fmt.Errorf("store: backup unusable (%v) and can not be moved aside: %w", rerr, err)
		}
		what = append(what, fmt.Sprintf("backup unusable (%v), moved to %s", rerr, filepath.Base(aside)))
	} else {
		what = append(what, "no backup copy")
	}

	if err := createEmpty(s.path, &s.opt); err != nil {
		return State{}, fmt.Errorf("store: create %s: %w", s.path, err)
	}
	db, _, err := readState(s.path, s.opt.unstoppable(), false, "")
	if err != nil {
		return State{}, fmt.Errorf("store: new state file: %w", err)
	}
	s.db = db
	what = append(what, "started with no leases")
	return State{Fresh: true, Recovered: strings.Join(what, "; ")}, nil
}

// asideStamp names a moved-aside file (.corrupt-STAMP) by when (UTC).
const asideStamp = "20060102T150405.000000000Z"

// missingCause is why recover runs for a state file that is missing (the
// backup copy, bak, is there). A moved-aside state file (.corrupt-STAMP)
// newer than the copy is most likely the one a start found unusable and
// was stopped (or killed) before it restored the copy: named, so that the
// report does not lose it (that start's log says why).
func (s *Store) missingCause(bak fs.FileInfo) error {
	err := fmt.Errorf("state file %s missing: %w", s.path, fs.ErrNotExist)
	names, _ := filepath.Glob(s.path + ".corrupt-*")
	newest, at := "", time.Time{}
	for _, n := range names {
		t, perr := time.Parse(asideStamp, strings.TrimPrefix(filepath.Base(n), DBName+".corrupt-"))
		if perr == nil && t.After(at) {
			newest, at = filepath.Base(n), t
		}
	}
	if newest == "" || !at.After(bak.ModTime()) {
		return err
	}
	return fmt.Errorf("%w (%s, moved aside at %s, after the backup copy was written: most likely the state file an earlier start found unusable and was stopped before it restored the copy; that start's log says why)",
		err, newest, at.Format(time.RFC3339))
}

// testHookRecover, when set, runs in recover after the state file was
// moved aside and before the backup copy is restored (tests widen the
// window two Opens of one directory raced in before lockState).
var testHookRecover func()

// restore copies the backup to the state path (through a temporary file),
// checks it and clears its epoch so the reset is remembered. With
// WithLeasesLater, every lease is checked and none kept (ld.later), as
// for a state file opened cleanly.
func restore(bak, path string, o *options) (*bolt.DB, loaded, error) {
	tmp := path + tmpSuffix
	if err := copyFile(bak, tmp); err != nil {
		_ = os.Remove(tmp)
		return nil, loaded{}, err
	}
	db, ld, err := readState(tmp, o, false, "")
	if err != nil {
		_ = os.Remove(tmp)
		return nil, loaded{}, err
	}
	err = db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Delete(metaEpoch) })
	if err := installTemp(db, err, tmp, path); err != nil {
		return nil, loaded{}, err
	}
	db, err = openBolt(path, o, false)
	if err != nil {
		return nil, loaded{}, err
	}
	return db, ld, nil
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	return writeSynced(to, in)
}

// writeSynced writes what src writes (io.Copy's first choice) into a new
// or truncated file at path, mode 0600, then syncs and closes it; a
// failed write or sync closes it and leaves it as it is.
func writeSynced(path string, src io.WriterTo) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := src.WriteTo(f); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// createEmpty writes a new, empty state file through a temporary file and
// a rename, so a zero-length or half-initialised leases.db never exists
// and can always be treated as corruption.
func createEmpty(path string, o *options) error {
	tmp := path + tmpSuffix
	_ = os.Remove(tmp)
	db, err := openBolt(tmp, o, false)
	if err != nil {
		return err
	}
	err = db.Update(func(tx *bolt.Tx) error {
		meta, err := tx.CreateBucket(bucketMeta)
		if err != nil {
			return err
		}
		if _, err := tx.CreateBucket(bucketLeases); err != nil {
			return err
		}
		if err := meta.Put(metaDigest, digest{}.bytes()); err != nil {
			return err
		}
		return meta.Put(metaFormat, []byte{formatVersion})
	})
	return installTemp(db, err, tmp, path)
}

// installTemp closes db, opened on tmp, and, if err (what was done to
// it) and the close are nil, renames tmp to path and syncs path's
// directory. On any error tmp is removed and the first error returned.
func installTemp(db *bolt.DB, err error, tmp, path string) error {
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err == nil {
		err = syncDir(filepath.Dir(path))
	}
	if err != nil {
		_ = os.Remove(tmp)
	}
	return err
}

// readState opens path, runs bbolt's consistency check and reads every
// record. inspectFile first checks, with bounded plain reads, that the pages
// form a proper tree inside the file, so neither bbolt nor tx.Check (in a
// goroutine of its own) can be sent into a cycle, a huge loop or outside
// the mapping. Should bbolt still panic or fault, it comes back here as
// ErrCorrupt instead of killing the daemon (recover, and SetPanicOnFault for
// faults on the mapping in this goroutine).
//
// With logDir, the log there is read and its records for this file are
// applied on top of what is decoded (ld.sel says which).
func readState(path string, o *options, readOnly bool, logDir string) (db *bolt.DB, ld loaded, err error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, loaded{}, err
	}
	if fi.Size() == 0 {
		// bbolt would initialise an empty file as a new database: that is
		// exactly the silent loss we must not have. createEmpty never leaves
		// a zero-length state file, so this is damage.
		return nil, loaded{}, fmt.Errorf("store: %s is empty: %w", filepath.Base(path), ErrCorrupt)
	}
	shape, err := inspectFile(path, o.stopped)
	if err != nil {
		return nil, loaded{}, err
	}
	// A panic of the caller's callbacks (WithCensus, WithStream) is the
	// caller's, not damage: it goes on up as it is, as in streamLeases.
	// Taken for damage (review h/revs1m), a census bug moved the state
	// file and then the backup aside, and Open started with no leases.
	inFn := false
	mode := readMode{stream: o.stream, none: o.later && o.stream == nil, stop: o.stopped}
	if fn := o.census; fn != nil {
		mode.census = func(l *Lease) { inFn = true; fn(l); inFn = false }
	}
	if fn := o.stream; fn != nil {
		mode.stream = func(l *Lease) error { inFn = true; err := fn(l); inFn = false; return err }
	}
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			if db != nil {
				func() {
					defer func() { _ = recover() }()
					_ = db.Close()
				}()
			}
			if inFn {
				panic(r)
			}
			db, ld, err = nil, loaded{}, fmt.Errorf("store: reading %s: bbolt panicked (%v): %w", filepath.Base(path), r, ErrCorrupt)
		}
	}()
	db, err = openBolt(path, o, readOnly)
	if err != nil {
		switch {
		case errors.Is(err, berrors.ErrTimeout):
			return nil, loaded{}, fmt.Errorf("store: %s: %w", path, ErrLocked)
		case errors.Is(err, berrors.ErrInvalid), errors.Is(err, berrors.ErrVersionMismatch),
			errors.Is(err, berrors.ErrChecksum), strings.Contains(err.Error(), "file size too small"):
			return nil, loaded{}, fmt.Errorf("store: open %s: %w: %w", filepath.Base(path), ErrCorrupt, err)
		}
		return nil, loaded{}, err
	}
	if err := o.stopped(); err != nil {
		_ = db.Close()
		return nil, loaded{}, err
	}
	// bbolt's consistency check walks every page in one go (≈ 140 ms at
	// 1 000 000 leases) with no way to stop it half way: it runs in a read
	// transaction of its own (checkFile), and when Open's context ends
	// first Open does not wait for it: the check is left to end, and only
	// then is the file closed (its goroutine reads the mapping) and the
	// directory released (checkLeft).
	checked, err := checkFile(db)
	if err != nil {
		_ = db.Close()
		return nil, loaded{}, err
	}
	var problems []string
	select {
	case problems = <-checked:
	case <-o.done():
		stop := o.stopped()
		closed, left := make(chan struct{}), db // db, the result, is nil once returned
		go func() {
			defer close(closed)
			<-checked
			_ = left.Close()
		}()
		return nil, loaded{}, &checkLeft{error: stop, closed: closed}
	}
	if len(problems) > 0 {
		_ = db.Close()
		return nil, loaded{}, fmt.Errorf("store: consistency check: %s: %w", strings.Join(problems, "; "), ErrCorrupt)
	}
	err = db.View(func(tx *bolt.Tx) error {
		addr, size := db.Info().Data, tx.Size()
		drop := func() { dropMapped(addr, size) }
		drop()
		var err error
		if err := o.stopped(); err != nil {
			return err
		}
		ld, err = readTx(tx, drop, logDir, mode)
		drop()
		ld.meta = shape.damagedMeta
		return err
	})
	if err != nil {
		_ = db.Close()
		return nil, loaded{}, err
	}
	return db, ld, nil
}

// checkFile runs bbolt's consistency check of db in a read transaction
// begun now and sends what it found (at most maxCheckErrors findings;
// none: consistent) once the check has ended and the transaction is
// closed. The file must stay open (mapped) until then.
func checkFile(db *bolt.DB) (<-chan []string, error) {
	res := make(chan []string, 1)
	tx, err := db.Begin(false)
	if err != nil {
		return nil, err
	}
	go func() {
		var problems []string
		for cerr := range tx.Check() {
			if len(problems) < maxCheckErrors {
				problems = append(problems, cerr.Error())
			}
		}
		if testHookCheckEnd != nil {
			testHookCheckEnd()
		}
		_ = tx.Rollback()
		res <- problems
	}()
	return res, nil
}

// testHookCheckEnd, when set, runs in checkFile's goroutine once bbolt's
// check has ended, before its transaction is closed (tests hold it there:
// a check that takes its time).
var testHookCheckEnd func()

// checkLeft is ErrOpenStopped (a streamError) returned while bbolt's check
// still runs: the file is closed once it has ended (closed), and Open
// keeps the directory's lock until then (leftChecks).
type checkLeft struct {
	error
	closed <-chan struct{}
}

func (e *checkLeft) Unwrap() error { return e.error }

// leftChecks counts the stopped Opens whose directory is not released yet
// (checkLeft; tests wait for them).
var leftChecks sync.WaitGroup

// readTx decodes everything; drop is called every dropEvery leases to keep
// the mapped file out of the RSS while loading.
func isStreamErr(err error) bool {
	var se *streamError
	return errors.As(err, &se)
}

// streamError is an error of the WithStream callback, or of reading the
// log: Open returns it as it is, never taking it for damage of the state
// file.
type streamError struct{ err error }

func (e *streamError) Error() string { return e.err.Error() }
func (e *streamError) Unwrap() error { return e.err }

// readMode says what readTx does with the leases it decodes: collect them
// in ld.leases (the zero mode), hand them to stream, or keep none.
type readMode struct {
	stream func(*Lease) error // each live lease goes to it instead of ld.leases
	// checked: the state was read and checked before (State.Stream):
	// stream gets each lease as it is decoded, in one pass.
	checked bool
	// none: check every lease and keep none (WithLeasesLater); ld.later
	// says so.
	none bool
	// stop, if set, is asked every stopEvery leases whether to give up
	// (WithContext: its error, a streamError, ends the read).
	stop func() error
	// census, if set, gets each lease a none pass checks (WithCensus),
	// and nil before the first.
	census func(*Lease)
}

// readTx decodes the state (with logDir, the log's records applied on
// top), and does with the leases what mode says.
func readTx(tx *bolt.Tx, drop func(), logDir string, mode readMode) (loaded, error) {
	var ld loaded
	stream := mode.stream
	meta, leases := tx.Bucket(bucketMeta), tx.Bucket(bucketLeases)
	if meta == nil || leases == nil {
		return ld, fmt.Errorf("store: buckets missing: %w", ErrCorrupt)
	}
	if v := meta.Get(metaFormat); len(v) != 1 || v[0] != formatVersion {
		return ld, fmt.Errorf("store: unknown format %x: %w", v, ErrCorrupt)
	}
	var err error
	if ld.walgen, err = readWALGen(meta); err != nil {
		return ld, err
	}
	var ov *overlay
	if logDir != "" {
		if ld.sel, err = readLog(logDir, ld.walgen); err != nil {
			// The log file could not be read (I/O): nothing says the
			// state file is bad, so it must not be moved aside.
			return ld, &streamError{err}
		}
		ov = newOverlay(ld.sel.recs)
	}
	if v := meta.Get(metaEpoch); v != nil {
		t, ok := bytesTime(v)
		if !ok {
			return ld, fmt.Errorf("store: bad epoch record %x: %w", v, ErrCorrupt)
		}
		ld.epoch = t
	}
	if v := meta.Get(metaSeen); v != nil {
		t, ok := bytesTime(v)
		if !ok {
			return ld, fmt.Errorf("store: bad heartbeat record %x: %w", v, ErrCorrupt)
		}
		ld.seen = t
	}
	want, ok := parseDigest(meta.Get(metaDigest))
	if !ok {
		return ld, fmt.Errorf("store: digest record missing: %w", ErrCorrupt)
	}
	// Quarantines first: with stream, nothing may be handed out before
	// the whole state is checked. Their owners share the leases' strings.
	// A checked pass (State.Stream) hands out leases only: Open read the
	// quarantines already, and decoding them on every pass was waste.
	in := interner{}
	if !mode.checked {
		ld.quar, ld.quarDamage = readQuar(tx, ov, in)
	}
	// Size the slice once from the digest: growing it by doubling would
	// briefly hold two copies of a million leases. A damaged count can not
	// ask for more than the file could hold (a record takes ≥ 48 octets
	// with its page element), and the digest check below catches it.
	// visit decodes every live lease (the file's, with the log applied on
	// top) into the slot next gives, and hands it to keep; then it checks
	// the digest.
	visit := func(next func() *Lease, keep func(*Lease) error) error {
		var got digest
		count := 0
		c := leases.Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			if v == nil {
				return fmt.Errorf("store: unexpected bucket in leases: %w", ErrCorrupt)
			}
			got.add(v, +1)
			if ov != nil {
				if j, ok := ov.idx[string(k)]; ok {
					e := &ov.ent[j]
					e.used = true
					if e.val == nil {
						continue // deleted by a logged commit
					}
					v = e.val
				}
			}
			l := next()
			if err := decodeLeaseInto(l, k, v, in); err != nil {
				return err
			}
			if err := keep(l); err != nil {
				return err
			}
			if count++; count%dropEvery == 0 {
				drop()
			}
			if count%stopEvery == 0 && mode.stop != nil {
				if err := mode.stop(); err != nil {
					return err
				}
			}
		}
		if got != want {
			return fmt.Errorf("store: found %d leases (checksum sum %x), the digest says %d (%x): %w",
				got.count, got.sum, want.count, want.sum, ErrCorrupt)
		}
		if ov == nil {
			return nil
		}
		// Logged leases the file does not have yet.
		for j := range ov.ent {
			e := &ov.ent[j]
			if e.used || e.val == nil {
				continue
			}
			l := next()
			if err := decodeLeaseInto(l, e.key, e.val, in); err != nil {
				return fmt.Errorf("store: logged lease: %w", err)
			}
			if err := keep(l); err != nil {
				return err
			}
		}
		return nil
	}
	// The streaming modes decode every lease into the same scratch lease;
	// handOut passes each to stream, its error wrapped as streamError.
	var scratch Lease
	next := func() *Lease { scratch = Lease{}; return &scratch }
	handOut := func() error {
		return visit(next, func(l *Lease) error {
			if err := stream(l); err != nil {
				return &streamError{err}
			}
			return nil
		})
	}
	switch {
	case mode.none:
		census := mode.census
		if census == nil {
			census = func(*Lease) {}
		}
		census(nil)
		if err := visit(next, func(l *Lease) error { ld.nlater++; census(l); return nil }); err != nil {
			return ld, err
		}
		ld.later = true
	case stream != nil && mode.checked:
		// Damage found half way (the file changed since Open checked it)
		// ends the pass with an error after some leases went out.
		if err := handOut(); err != nil {
			return ld, err
		}
	case stream != nil:
		// Everything is checked before the first lease is handed out, so
		// that damage found half way can not have fed the engine leases
		// of a file Open then replaces with the backup: one pass to check,
		// one to hand out.
		if err := visit(next, func(*Lease) error { return nil }); err != nil {
			return ld, err
		}
		if err := handOut(); err != nil {
			return ld, err
		}
	default:
		// Size the slice once from the digest: growing it by doubling
		// would briefly hold two copies of a million leases. A damaged
		// count can not ask for more than the file could hold (a record
		// takes ≥ 48 octets with its page element), and the digest check
		// catches it.
		n := min(want.count, uint64(tx.Size()/48))
		if ov != nil {
			n += uint64(ov.puts())
		}
		ld.leases = make([]Lease, 0, n)
		next := func() *Lease {
			i := len(ld.leases)
			if i < cap(ld.leases) {
				ld.leases = ld.leases[:i+1] // zeroed by make
			} else {
				ld.leases = append(ld.leases, Lease{})
			}
			return &ld.leases[i]
		}
		if err := visit(next, func(*Lease) error { return nil }); err != nil {
			return ld, err
		}
	}
	if ov == nil {
		return ld, nil
	}
	// The logged heartbeat and epoch.
	if ov.hasSeen {
		t, ok := bytesTime(binary.BigEndian.AppendUint64(nil, uint64(ov.seen)))
		if !ok {
			return ld, fmt.Errorf("store: logged heartbeat %d out of range: %w", ov.seen, ErrCorrupt)
		}
		ld.seen = t
	}
	switch ov.epochOp {
	case epochSet:
		t, ok := bytesTime(binary.BigEndian.AppendUint64(nil, uint64(ov.epoch)))
		if !ok {
			return ld, fmt.Errorf("store: logged epoch %d out of range: %w", ov.epoch, ErrCorrupt)
		}
		ld.epoch = t
	case epochClear:
		ld.epoch = time.Time{}
	}
	return ld, nil
}

// readQuar is readQuarantines; tests count its calls.
var readQuar = readQuarantines

// isEnvErr: the environment, not the file, stops us (Open fails instead of
// moving a good file aside).
func isEnvErr(err error) bool {
	for _, e := range []error{syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG, syscall.ENOMEM, syscall.EMFILE, syscall.ENFILE, syscall.EINTR, syscall.EAGAIN} {
		if errors.Is(err, e) {
			return true
		}
	}
	if err == nil {
		return false
	}
	// bbolt's grow reports a failed truncate or sync with %s ("file
	// resize error: … no space left on device"): only the text is left.
	// Review h/revbk: a quota's full disk (EDQUOT) and that text were
	// taken for damage, the good backup copy moved aside.
	msg := err.Error()
	for _, e := range []syscall.Errno{syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG} {
		if strings.Contains(msg, e.Error()) {
			return true
		}
	}
	return errors.Is(err, ErrLocked) || isReadOnlyErr(err)
}

func join(a, b string) string {
	if a == "" {
		return b
	}
	if b == "" {
		return a // judge joins its verdict with what came before, often nothing
	}
	return a + "; " + b
}

// noteChecked keeps the file Open just checked and keeps open (or
// restored) open once more, for State.Stream: a handle opened again later
// (reopen) must be on the same file (sameChecked). Held open, its inode
// number can not go to a new file (a closed read-only handle's did, to
// the empty file a write then created).
func (s *Store) noteChecked() {
	if f, err := os.Open(s.path); err == nil {
		s.checked = f
	}
}

// sameChecked, after reopen opened s.path again: if that is no longer the
// file Open checked, State.Stream refuses from now on. After a commit it
// refuses anyway: the file is let go. Caller holds mu exclusively.
func (s *Store) sameChecked() {
	f := s.checked
	if f == nil {
		return
	}
	if s.leasesPut.Load() {
		_ = f.Close()
		s.checked = nil
		return
	}
	want, err := f.Stat()
	if err != nil {
		s.replaced = true
		return
	}
	if fi, err := os.Stat(s.path); err != nil || !os.SameFile(fi, want) {
		s.replaced = true
	}
}

// streamLeases is State.Stream (WithLeasesLater): it reads the leases of
// the open state file again, with the log applied on top as Open did, and
// hands each to fn. No fold of the log may run meanwhile (ckMu): it would
// move the log's records into the file under the read. It refuses once a
// commit was made: what it read would no longer be what Open checked.
func (s *Store) streamLeases(fn func(*Lease) error) (err error) {
	s.ckMu.Lock()
	defer s.ckMu.Unlock()
	s.mu.RLock()
	defer s.mu.RUnlock()
	// The state file: the writable handle, or the read-only one Open
	// read a read-only directory's state through (until a write).
	db := s.db
	if db == nil {
		db = s.ro
	}
	switch {
	case s.closed || db == nil:
		return fmt.Errorf("store: stored leases read after close: %w", ErrUnavailable)
	case s.leasesPut.Load():
		return errors.New("store: stored leases read after a commit (State.Stream must come first)")
	case s.replaced:
		// Review h/revbk: the handle was opened again by name (reopen)
		// and the name is another file's now; its leases (with the log
		// of the first on top) went out under Open's verdict on the
		// first. A restart reads the new file in full.
		return fmt.Errorf("store: state file %s replaced since Open read it; its leases are not handed out (restart to read it): %w",
			s.path, ErrUnavailable)
	}
	logDir := ""
	if s.streamLog {
		logDir = s.dir
	}
	// As in readState: bbolt faulting on the mapping comes back as
	// ErrCorrupt, not as the end of the daemon. A panic of fn is the
	// caller's, not damage: it goes on up as it is (review h/revpeak:
	// it came back as "bbolt panicked ...: corrupt state").
	inFn := false
	n := 0
	call := func(l *Lease) error {
		n++
		inFn = true
		err := fn(l)
		inFn = false
		return err
	}
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			if inFn {
				panic(r)
			}
			err = fmt.Errorf("store: reading %s again: bbolt panicked (%v): %w", filepath.Base(s.path), r, ErrCorrupt)
		}
	}()
	err = db.View(func(tx *bolt.Tx) error {
		addr, size := db.Info().Data, tx.Size()
		drop := func() { dropMapped(addr, size) }
		drop()
		_, err := readTx(tx, drop, logDir, readMode{stream: call, checked: true})
		drop()
		return err
	})
	var se *streamError
	if errors.As(err, &se) {
		return se.err // fn's own error (or the log's read error), as it is
	}
	if err == nil && s.leasesPut.Load() {
		// A commit made during the read (commits take mu shared too):
		// what went out may miss it. Commit sets leasesPut before it
		// writes, so none can have slipped past both checks.
		return errors.New("store: stored leases read while a commit was made (State.Stream must come first)")
	}
	if err == nil && n != s.nlater {
		// Nothing of ours changes the leases before the first commit
		// (Open's fold of the log moves them, it adds none): the file was
		// written under us, in place (review h/revbk). What went out is
		// not what Open checked.
		return fmt.Errorf("store: state file %s changed since Open read it: %d leases read, Open checked %d: %w",
			s.path, n, s.nlater, ErrUnavailable)
	}
	return err
}
