package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"time"

	bolt "go.etcd.io/bbolt"
	"go.uber.org/zap"
)

// walWriter is the state of the log; guarded by Store.wmu (and set up
// under Store.mu held exclusively).
type walWriter struct {
	seg    [2]walSeg
	active int    // index of the segment commits go to
	off    int64  // next write offset in it
	seq    uint64 // seq of the next record
	folded uint64 // bbolt's walgen: every generation below is in bbolt
	buf    []byte // the record being written, reused
}

type walSeg struct {
	f     *os.File
	gen   uint64 // generation in its header (valid when used)
	used  bool   // header written for gen in this run
	alloc int64  // octets of the file already written: rewriting them needs no metadata sync
	end   int64  // end of its records
	busy  bool   // the grower is zero-filling past alloc (without wmu): nobody else writes there
}

// pending: segment i holds records not yet folded into bbolt (and is not
// the one being written).
func (w *walWriter) pending(i int) bool {
	return i != w.active && w.seg[i].used && w.seg[i].gen >= w.folded && w.seg[i].end > walHeaderSize
}

func (w *walWriter) close() {
	for i := range w.seg {
		if w.seg[i].f != nil {
			_ = w.seg[i].f.Close()
		}
		w.seg[i] = walSeg{}
	}
}

var zeros = make([]byte, 64<<10)

// claim makes sure the file holds written octets up to need, zero-filling
// past its end if not: after that, writing a record there and syncing it
// changes no file metadata. On a full disk this is where ENOSPC shows.
func (g *walSeg) claim(need, ckptBytes int64) error {
	if need <= g.alloc {
		return nil
	}
	return g.grow(need, growTarget(need, g.alloc, ckptBytes))
}

// growTarget is how far a segment holding alloc octets grows when need
// octets are wanted: doubling, up to the checkpoint size.
func growTarget(need, alloc, ckptBytes int64) int64 {
	return max(need+logRunway, min(2*alloc, ckptBytes+logRunway))
}

// growChunk is how much the grower zero-fills (and syncs) at a time in
// the active segment: one chunk is what a concurrent commit's fdatasync
// may have to carry along. spareChunk is the same for the spare segment,
// whose pages no commit's sync carries; it is smaller because the
// chunk's writeback still queues on the same disk ahead of the commits'
// flushes, and the write runs under wmu.
const (
	growChunk  = 256 << 10
	spareChunk = 64 << 10
)

// segFull is the size a segment is grown to: what a checkpoint lets it
// hold, and the runway.
func (s *Store) segFull() int64 { return s.opt.ckptBytes + logRunway }

// spareReady: the segment that is not active can take the log now: it
// holds nothing left to fold and is zero-filled to its full size, so
// commits into it never grow a file. Caller holds wmu.
func (s *Store) spareReady() bool {
	w := &s.wal
	o := 1 - w.active
	return w.seg[o].f != nil && !w.pending(o) && w.seg[o].alloc >= s.segFull()
}

// statfsFree is freeSpace; tests count its calls.
var statfsFree = freeSpace

// spareHeadroom: the spare is zero-filled ahead of need only while the
// file system keeps this much free beyond it (a nearly full disk keeps
// its space for the records themselves).
const spareHeadroom = 64 << 20

// growNext picks the next chunk for the grower: segment i up to offset
// to. The active segment comes first while its room runs short and the
// spare can not take over; otherwise the spare, so that the log switches
// to it (tryAppend) when the active one is full, instead of growing the
// file commits are syncing. Growing the active segment made every commit
// whose fdatasync ran beside the grower's carry the grower's zeros and the
// journal commit of the file's new size: at 18 000 new MAPs a second
// from a fresh state directory, 2-7 % of the requests waited 1.7-27 ms
// (p99) for such syncs instead of 0.24-0.37 ms (per-batch timestamps,
// --fifo). Caller holds wmu.
func (s *Store) growNext() (i int, to int64, ok bool) {
	w := &s.wal
	a := &w.seg[w.active]
	full := s.segFull()
	if a.alloc < full && !s.spareReady() {
		// Once half of it is used, the active segment doubles (up to its
		// full size), a chunk at a time.
		if a.alloc-w.off <= a.alloc/2 {
			s.activeTo = max(s.activeTo, growTarget(w.off, a.alloc, s.opt.ckptBytes))
		}
		if a.alloc < s.activeTo {
			return w.active, min(a.alloc+growChunk, s.activeTo), true
		}
	}
	o := 1 - w.active
	g := &w.seg[o]
	if g.f == nil || g.alloc >= full || s.spareStuck {
		return 0, 0, false
	}
	// Whether the file system has room for it (spareHeadroom) is asked
	// once per spare, by the grower before its first chunk (spareRoomOK):
	// statfs under wmu, on every commit and every chunk, held up the
	// commits waiting for wmu.
	return o, min(g.alloc+spareChunk, full), true
}

// maybeGrowAhead starts the grower when growNext has work for it, so
// that commits find the room already written. Zero-filling in the commit
// itself stalled the commit path while a fresh segment grew: 8 MiB of
// zeros written and synced in one commit took 30 ms at 23 000 new MAPs a
// second (open-loop p99 at 80 %). Caller holds wmu.
// Caller holds mu (shared) too.
func (s *Store) maybeGrowAhead() {
	if s.closed || s.growing.Load() {
		return
	}
	if _, _, ok := s.growNext(); !ok {
		return
	}
	if !s.growing.CompareAndSwap(false, true) {
		return
	}
	s.bg.Add(1)
	go s.grower()
}

// growSyncFile opens segment i again (the file f has open), for the
// grower's syncs. Caller holds wmu.
func (s *Store) growSyncFile(i int, f *os.File) (*os.File, error) {
	sf, err := os.OpenFile(filepath.Join(s.dir, segName(i)), os.O_WRONLY, 0)
	if err != nil {
		return nil, err
	}
	a, err1 := f.Stat()
	b, err2 := sf.Stat()
	if err1 != nil || err2 != nil || !os.SameFile(a, b) {
		sf.Close()
		return nil, fmt.Errorf("store: segment %d replaced on disk", i)
	}
	return sf, nil
}

// grower zero-fills the chunks growNext picks until it has none. A chunk
// lies past its segment's alloc, where no record is (records go below
// alloc): the grower marks the segment busy under wmu, writes the chunk
// without wmu, so that commits with room go on meanwhile, and advances
// alloc under wmu again. A commit that needs room past alloc in a busy
// segment waits for the chunk (tryAppend), and nothing else writes past
// alloc: a rotation writes only the header, and the spare is switched to
// only once full. The chunk is synced outside wmu too. The grower stops
// at an error (a full disk: commits then grow the active file themselves
// and report ENOSPC; a spare's chunk is given back), or when the store
// closes.
//
// It clears growing under wmu when it finds no work: maybeGrowAhead
// checks growing under wmu, so a commit that adds work after that check
// starts a new grower (clearing it only after releasing wmu could miss
// that commit's work until the next commit came).
//
// The grower syncs through a file description of its own. Linux reports
// a writeback error (EIO) once per open file description: a grower's
// fdatasync through the segment's own description, running beside a
// commit's, could take the error that belongs to the commit's record (its
// page is written back by whichever sync comes first), and the commit's
// own fdatasync would then return nil for a record that never reached
// the disk. Through its own description, every commit's sync still sees
// it.
func (s *Store) grower() {
	defer s.bg.Done()
	var sfs, of [2]*os.File // sync descriptions, and the segment files they are for
	defer func() {
		for _, f := range sfs {
			if f != nil {
				f.Close()
			}
		}
	}()
	for {
		s.mu.RLock()
		if s.closed || !s.walReady.Load() {
			s.growing.Store(false)
			s.mu.RUnlock()
			return
		}
		s.wmu.Lock()
		i, to, ok := s.growNext()
		if ok && i != s.wal.active && !s.spareRoomOK {
			// A new spare: ask the file system once, outside wmu.
			s.wmu.Unlock()
			free, fok := statfsFree(s.dir)
			s.wmu.Lock()
			if i == 1-s.wal.active && !s.spareRoomOK && !s.spareStuck { // still that spare
				if !fok || free < s.segFull()-s.wal.seg[i].alloc+spareHeadroom {
					s.spareStuck = true
				} else {
					s.spareRoomOK = true
				}
			}
			s.wmu.Unlock()
			s.mu.RUnlock()
			continue
		}
		g := &s.wal.seg[i]
		if ok && of[i] != g.f {
			if sfs[i] != nil {
				sfs[i].Close()
			}
			sf, err := s.growSyncFile(i, g.f)
			if err != nil {
				sf, ok = nil, false
			}
			sfs[i], of[i] = sf, g.f
		}
		if !ok {
			s.growing.Store(false)
			s.wmu.Unlock()
			s.mu.RUnlock()
			return
		}
		from := g.alloc
		g.busy = true
		s.wmu.Unlock()
		var err error
		at := from
		for at < to && err == nil {
			var m int
			m, err = g.f.WriteAt(zeros[:min(to-at, int64(len(zeros)))], at)
			at += int64(m)
		}
		s.wmu.Lock()
		g.alloc = at
		active := i == s.wal.active
		if active {
			s.activeGrown.Add(g.alloc - from)
		} else if err != nil {
			// Ahead of need only: give the space back for the records.
			if g.f.Truncate(from) == nil {
				g.alloc = from
			}
			s.spareStuck = true
		}
		g.busy = false
		s.grown.Broadcast()
		s.wmu.Unlock()
		if err == nil {
			err = fdatasync(sfs[i])
		}
		s.mu.RUnlock()
		if err != nil {
			s.wmu.Lock()
			s.growing.Store(false)
			s.wmu.Unlock()
			return
		}
	}
}

// grow zero-fills the file up to target; it fails only if it could not
// reach need.
func (g *walSeg) grow(need, target int64) error {
	for g.alloc < target {
		n := min(target-g.alloc, int64(len(zeros)))
		m, err := g.f.WriteAt(zeros[:n], g.alloc)
		g.alloc += int64(m)
		if err != nil {
			if g.alloc >= need {
				return nil
			}
			return err
		}
	}
	return nil
}

// openSeg opens (creating it, zero-filled, if needed) segment file i.
func (s *Store) openSeg(i int) error {
	g := &s.wal.seg[i]
	if g.f != nil {
		return nil
	}
	path := filepath.Join(s.dir, segName(i))
	_, serr := os.Stat(path)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return err
	}
	*g = walSeg{f: f, alloc: fi.Size()}
	if g.alloc < walHeaderSize+logRunway {
		err := g.grow(walHeaderSize+logRunway, walHeaderSize+logRunway)
		if err == nil {
			err = fdatasync(f)
		}
		if err == nil && serr != nil {
			err = syncDir(s.dir)
		}
		if err != nil {
			f.Close()
			*g = walSeg{}
			return err
		}
	}
	return nil
}

// startSegment makes segment gen%2 the active one, generation gen, first
// record seq; durable before it returns.
func (s *Store) startSegment(gen, seq uint64) error {
	w := &s.wal
	i := int(gen % 2)
	if err := s.openSeg(i); err != nil {
		return err
	}
	g := &w.seg[i]
	hdr := appendSegHeader(make([]byte, 0, walHdrLen), segHeader{gen: gen, firstSeq: seq})
	if _, err := g.f.WriteAt(hdr, 0); err != nil {
		return err
	}
	if err := fdatasync(g.f); err != nil {
		return err
	}
	g.gen, g.used, g.end = gen, true, walHeaderSize
	w.active, w.off, w.seq = i, walHeaderSize, seq
	s.activeTo = 0
	// A new active segment means a new spare: ask the file system again
	// (as rotate does). A stale spareRoomOK from before a reopen, often
	// after a fold failed on a nearly full disk, let the grower fill the
	// new spare without statfs, taking room bbolt needs (store review).
	s.spareStuck, s.spareRoomOK = false, false
	return nil
}

// rotate starts the next generation in the other segment, which must not
// be pending. The header is synced before rotate returns: the fold that
// follows records walgen = gen, and some segment must always name
// walgen, so that a lost active segment is noticed. Caller holds wmu.
//
// A rotation that fails after its header was written (the write failed
// part way, or the sync did) puts back the header the segment had before
// and syncs that: otherwise the disk could hold generation gen starting
// at w.seq while the log goes on in the active segment past that seq, and
// the next Open would find two segments that do not follow each other and
// reset the epoch, as for lost records. Should putting it back fail too,
// no record is appended until it has been put back (undoHeader).
func (s *Store) rotate() error {
	w := &s.wal
	o := 1 - w.active
	if w.pending(o) {
		return fmt.Errorf("store: rotate: segment %d not folded yet", o)
	}
	if err := s.openSeg(o); err != nil {
		return err
	}
	if err := s.undoHeader(); err != nil {
		return err
	}
	f := w.seg[o].f
	prev := make([]byte, walHdrLen)
	if _, err := f.ReadAt(prev, 0); err != nil {
		return fmt.Errorf("store: rotate: read %s header: %w", segName(o), err)
	}
	gen := w.seg[w.active].gen + 1
	hdr := appendSegHeader(make([]byte, 0, walHdrLen), segHeader{gen: gen, firstSeq: w.seq})
	_, err := f.WriteAt(hdr, 0)
	if err == nil {
		err = fdatasync(f)
	}
	if err != nil {
		s.hdrUndo = &headerUndo{idx: o, prev: prev}
		if uerr := s.undoHeader(); uerr != nil {
			s.log.Error("log segment header of a failed rotation not put back yet; commits wait for it",
				zap.String("segment", segName(o)), zap.Error(uerr))
		}
		return err
	}
	w.seg[w.active].end = w.off
	g := &w.seg[o]
	g.gen, g.used, g.end = gen, true, walHeaderSize
	w.active, w.off = o, walHeaderSize
	s.spareStuck = false // a new spare: ask the file system again
	s.spareRoomOK = false
	s.activeTo = 0
	return nil
}

// headerUndo is a segment header to put back: what the segment held
// before a rotation that failed after writing over it.
type headerUndo struct {
	idx  int
	prev []byte
}

// undoHeader puts back (written and synced) the header a failed rotation
// may have left on disk, if any. Until it succeeds, no record may be
// written to the active segment. Caller holds wmu.
func (s *Store) undoHeader() error {
	u := s.hdrUndo
	if u == nil {
		return nil
	}
	f := s.wal.seg[u.idx].f
	_, err := f.WriteAt(u.prev, 0)
	if err == nil {
		err = fdatasync(f)
	}
	if err != nil {
		return fmt.Errorf("store: put back %s header after a failed rotation: %w", segName(u.idx), err)
	}
	s.hdrUndo = nil
	return nil
}

const (
	ckAuto = iota // background: rotate if anything is logged, fold
	ckAll         // Snapshot, Close: everything acknowledged ends up in bbolt
	ckRoom        // a commit found the log full: make room, fold later
	ckFold        // the log switched to the spare early (tryAppend): fold what it left, rotate only when due
)

// checkpoint folds a pending segment, rotates and folds the segment that
// was active. Only one runs at a time.
func (s *Store) checkpoint(mode int) error {
	s.ckMu.Lock()
	defer s.ckMu.Unlock()
	s.mu.RLock()
	closed := s.closed
	needSetup := s.broken.Load() || s.db == nil || !s.walReady.Load()
	s.mu.RUnlock()
	if needSetup && !closed {
		if err := s.reopen(); err != nil {
			return err
		}
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.db == nil || !s.walReady.Load() || s.broken.Load() {
		if s.closed {
			return fmt.Errorf("store: checkpoint: %w", ErrClosed)
		}
		return fmt.Errorf("store: checkpoint: state not writable: %w", ErrUnavailable)
	}
	w := &s.wal
	old := -1
	// A commit may switch the log to the spare (tryAppend) while a fold
	// runs here without wmu: the segment it left is then pending, and is
	// folded first on the next round. Each round folds one segment a
	// commit filled meanwhile, so this ends.
	for {
		s.wmu.Lock()
		o := 1 - w.active
		pend := w.pending(o)
		s.wmu.Unlock()
		if pend {
			if err := s.fold(o); err != nil {
				return err
			}
		}
		s.wmu.Lock()
		if w.pending(1 - w.active) {
			s.wmu.Unlock()
			continue
		}
		if w.off > walHeaderSize && (mode != ckFold || w.off >= s.opt.ckptBytes) {
			old = w.active
			if err := s.rotate(); err != nil {
				s.wmu.Unlock()
				return fmt.Errorf("store: checkpoint: %w: %w", ErrUnavailable, err)
			}
		}
		s.wmu.Unlock()
		break
	}
	if old < 0 {
		return nil
	}
	if mode == ckRoom {
		s.kick()
		return nil
	}
	return s.fold(old)
}

func (s *Store) kick() {
	select {
	case s.ckKick <- struct{}{}:
	default:
	}
}

// fold writes segment i's records into bbolt in one transaction, with
// walgen past its generation. Caller holds ckMu and mu (shared); segment i
// is not active, so nobody writes it meanwhile.
func (s *Store) fold(i int) error {
	s.wmu.Lock()
	g := s.wal.seg[i]
	s.wmu.Unlock()
	buf, err := readAt(g.f, walHeaderSize, g.end-walHeaderSize, s.foldBuf)
	// Keep a small buffer for the next fold; a big one (a segment of
	// several MiB) is not worth holding in the daemon's memory between
	// checkpoints.
	if cap(buf) <= maxPooled {
		s.foldBuf = buf
	}
	if err != nil {
		return fmt.Errorf("store: checkpoint: read %s: %w: %w", segName(i), ErrUnavailable, err)
	}
	var recs []logRecord
	for p := buf; len(p) > 0; {
		r, n, err := decodeRecord(p)
		if err != nil || r.gen != g.gen {
			return fmt.Errorf("store: checkpoint: %s changed under the store at offset %d (%v): %w",
				segName(i), walHeaderSize+len(buf)-len(p), err, ErrCorrupt)
		}
		recs = append(recs, r)
		p = p[n:]
	}
	err = s.update(func(tx *bolt.Tx) error { return foldTx(tx, recs, g.gen+1, true, false, false) })
	if err != nil {
		s.broken.Store(true)
		return fmt.Errorf("store: checkpoint: %w: %w", ErrUnavailable, err)
	}
	s.dropMappedPages()
	s.wmu.Lock()
	s.wal.folded = g.gen + 1
	// The folded segment is the spare now: fill it ahead at once, not
	// only once the next commit comes.
	s.maybeGrowAhead()
	s.wmu.Unlock()
	s.checkpoints.Add(1)
	return nil
}

// foldYield: entries a fold applies between yields (≈ 0.1 ms of work).
// dropFoldEvery: entries between drops of the mapped pages read (at most
// one leaf page each: ≤ 32 MiB resident at a time).
const (
	foldYield     = 64
	dropFoldEvery = 8192
)

// mappedDropper returns a function that drops the pages of tx's database
// mapping from the process's resident set (dropMapped). The range is the
// file as tx began, which the mapping covers; call it only while tx
// allocates no page (bbolt re-maps only when it allocates).
func mappedDropper(tx *bolt.Tx) func() {
	db, size := tx.DB(), tx.Size()
	return func() { dropMapped(db.Info().Data, size) }
}

// dropMappedPages drops the pages a fold read from the resident set once
// its transaction committed; the read transaction keeps bbolt from
// re-mapping the file meanwhile. Caller holds mu (shared), so db is not
// replaced.
func (s *Store) dropMappedPages() {
	_ = s.db.View(func(tx *bolt.Tx) error {
		mappedDropper(tx)()
		return nil
	})
}

// kvChange is one logged change: val nil deletes key.
type kvChange struct {
	key, val []byte
	seq      int // position in the log
}

// foldTx applies recs in order: entries, heartbeat, epoch changes; then
// walgen (setGen) and clearing the epoch (clearEpoch: Open decided the
// epoch must reset, after whatever the log said). With repairQuar (Open
// found the quarantine bucket or its digest damaged) the quarantine bucket
// and its digest are rebuilt from the records that check out.
func foldTx(tx *bolt.Tx, recs []logRecord, walgen uint64, setGen, clearEpoch, repairQuar bool) error {
	meta, leases := tx.Bucket(bucketMeta), tx.Bucket(bucketLeases)
	if meta == nil || leases == nil {
		return fmt.Errorf("store: buckets missing: %w", ErrCorrupt)
	}
	// Fuller pages than bbolt's default 0.5: a smaller file loads faster
	// and maps less.
	leases.FillPercent = 0.9
	d, ok := parseDigest(meta.Get(metaDigest))
	if !ok {
		return fmt.Errorf("store: digest missing: %w", ErrCorrupt)
	}
	// Every change of a key replaces the whole record or deletes it, so
	// only the last change per key matters; applying those in key order
	// makes bbolt append to its nodes instead of inserting into the
	// middle: a hundred thousand new leases in random order into a small
	// file cost seconds of memmove otherwise (node.put shifts the node's
	// elements on every insert until the commit splits it).
	// Sized first: appended from nil, a fold's 130 000 entries (7 MiB)
	// were reallocated ≈ 40 times (append grows big slices by a quarter),
	// ≈ 40 MiB of garbage a fold (BenchmarkCheckpointSpread).
	n := 0
	for _, r := range recs {
		n += countEntries(r.entries)
	}
	ents := make([]kvChange, 0, n)
	var quar []kvChange // MAP-22 quarantines (quarantine.go), in log order
	for _, r := range recs {
		_ = walkEntries(r.entries, func(op byte, key, val []byte) error {
			if op == entryQDel || op == entryQPut {
				quar = append(quar, kvChange{key: key, val: val})
				return nil
			}
			ents = append(ents, kvChange{key: key, val: val, seq: len(ents)})
			return nil
		})
	}
	if repairQuar {
		if err := repairQuarantines(tx, meta, quar); err != nil {
			return err
		}
	} else if err := foldQuarantines(tx, meta, quar); err != nil {
		return err
	}
	// Log order breaks ties, so the last change of a key sorts last. (A
	// stable merge sort took several times as long as this at 100 000
	// entries, in one stretch the engine had to wait out.)
	calls := 0
	slices.SortFunc(ents, func(a, b kvChange) int {
		if calls++; calls%(64*foldYield) == 0 {
			runtime.Gosched()
		}
		if c := bytes.Compare(a.key, b.key); c != 0 {
			return c
		}
		return a.seq - b.seq
	})
	// The fold reads the leaf pages its keys land on through bbolt's
	// read-only shared mapping, and each page read stays counted in the
	// daemon's resident memory until the mapping goes: at 1 000 000
	// leases a fold touches nearly every leaf, and the file (≈ 200 MB)
	// sat in pcpd's RSS beside the heap (397-443 MB, target 400). Dropping
	// them every dropFoldEvery keys keeps that to a few MB; they stay in
	// the page cache, so the next read is a minor fault. No page is
	// allocated (and so the file is never re-mapped) before the commit,
	// so the mapping's address and size hold for the loop.
	drop := mappedDropper(tx)
	// One cursor reads every key's stored record: Bucket.Get makes a
	// cursor, and allocates its stack, per call (≈ 3 of the fold's 7
	// allocations a lease). Seek starts from the root each time, so the
	// Puts and Deletes in between do not disturb it.
	cur := leases.Cursor()
	for i := range ents {
		if i+1 < len(ents) && bytes.Equal(ents[i].key, ents[i+1].key) {
			continue // a later change of the same key wins
		}
		if i%foldYield == foldYield-1 {
			// A fold of 16 MiB of log is half a second of CPU; Go
			// preempts it only every 10 ms, so on two cores the engine
			// and the socket readers waited up to that long for a turn
			// again and again. Yielding this often lets them in at once.
			runtime.Gosched()
		}
		if i%dropFoldEvery == dropFoldEvery-1 {
			drop()
		}
		key, val := ents[i].key, ents[i].val
		if k, old := cur.Seek(key); old != nil && bytes.Equal(k, key) {
			d.add(old, -1)
			if val == nil {
				if err := leases.Delete(key); err != nil {
					return err
				}
			}
		}
		if val != nil {
			if err := leases.Put(key, val); err != nil {
				return err
			}
			d.add(val, +1)
		}
	}
	for _, r := range recs {
		switch r.epochOp {
		case epochSet:
			if err := meta.Put(metaEpoch, binary.BigEndian.AppendUint64(nil, uint64(r.epoch))); err != nil {
				return err
			}
		case epochClear:
			if err := meta.Delete(metaEpoch); err != nil {
				return err
			}
		}
	}
	if len(recs) > 0 {
		if err := meta.Put(metaDigest, d.bytes()); err != nil {
			return err
		}
		last := recs[len(recs)-1]
		if err := meta.Put(metaSeen, binary.BigEndian.AppendUint64(nil, uint64(last.seen))); err != nil {
			return err
		}
	}
	if clearEpoch {
		if err := meta.Delete(metaEpoch); err != nil {
			return err
		}
	}
	if setGen {
		return meta.Put(metaWALGen, binary.BigEndian.AppendUint64(nil, walgen))
	}
	return nil
}

func readWALGen(meta *bolt.Bucket) (uint64, error) {
	v := meta.Get(metaWALGen)
	switch len(v) {
	case 0:
		return 0, nil // written before the log existed, or new
	case 8:
		return binary.BigEndian.Uint64(v), nil
	}
	return 0, fmt.Errorf("store: bad walgen record %x: %w", v, ErrCorrupt)
}

// setupLog folds what the log holds into the state file and starts a new
// generation. With s.sel (Open) it replays what Open already read and
// judged; otherwise (the directory was read-only at Open, or an earlier
// attempt failed) it reads the log again. Caller holds mu exclusively (or
// is Open).
func (s *Store) setupLog() error {
	sel := s.sel
	if sel == nil {
		var w uint64
		err := s.db.View(func(tx *bolt.Tx) error {
			m := tx.Bucket(bucketMeta)
			if m == nil {
				return fmt.Errorf("store: meta bucket missing: %w", ErrCorrupt)
			}
			var err error
			w, err = readWALGen(m)
			return err
		})
		if err != nil {
			return err
		}
		if sel, err = readLog(s.dir, w); err != nil {
			return err
		}
		if sel.problem != "" {
			s.log.Error("log damaged; replaying what precedes the damage", zap.String("problem", sel.problem))
		}
	}
	s.wal.close()
	s.hdrUndo = nil // the log is read again from disk
	s.pendingMu.Lock()
	clearEpoch, repairQuar := s.pendingClear, s.pendingQuar
	s.pendingMu.Unlock()
	if sel.folds || clearEpoch || repairQuar {
		err := s.update(func(tx *bolt.Tx) error {
			return foldTx(tx, sel.recs, sel.nextGen, sel.folds, clearEpoch, repairQuar)
		})
		if err != nil {
			s.broken.Store(true)
			return err
		}
		s.dropMappedPages()
		if len(sel.recs) > 0 {
			s.log.Info("log replayed into the state file", zap.Int("records", len(sel.recs)))
		}
	}
	s.pendingMu.Lock()
	s.pendingClear = s.pendingClear && !clearEpoch
	s.pendingQuar = s.pendingQuar && !repairQuar
	s.pendingMu.Unlock()
	s.sel = nil
	stamp := s.opt.now().UTC().Format(asideStamp)
	for _, i := range sel.damaged {
		p := filepath.Join(s.dir, segName(i))
		if err := os.Rename(p, p+".corrupt-"+stamp); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("store: move damaged log aside: %w", err)
		}
	}
	s.wal.folded = sel.nextGen
	if err := s.startSegment(sel.nextGen, sel.nextSeq); err != nil {
		s.wal.close()
		return err
	}
	// Open the other segment too, so rotating never creates a file.
	if err := s.openSeg(1 - s.wal.active); err != nil {
		s.wal.close()
		return err
	}
	s.walReady.Store(true)
	return nil
}

// checkpointer folds the log in the background: when a commit finds the
// active segment past the checkpoint size, and every interval.
func (s *Store) checkpointer() {
	defer close(s.ckDone)
	t := time.NewTicker(s.opt.ckptEvery)
	defer t.Stop()
	for {
		select {
		case <-s.ckStop:
			return
		case <-s.ckKick:
		case <-t.C:
		}
		s.mu.RLock()
		idle := s.closed || !s.walReady.Load()
		s.mu.RUnlock()
		if idle {
			continue // nothing to fold; commits set the log up
		}
		mode := ckAuto
		if s.foldOnly.Swap(false) {
			mode = ckFold
		}
		if err := s.checkpoint(mode); err != nil && !errors.Is(err, ErrClosed) {
			s.ckMu.Lock()
			if time.Since(s.ckLast) > 10*time.Second {
				s.ckLast = time.Now()
				s.log.Error("checkpoint failed; commits go on into the log until it is full", zap.Error(err))
			}
			s.ckMu.Unlock()
		}
	}
}
