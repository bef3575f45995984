package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// The write-ahead log. A Commit appends one record to the active log
// segment and returns after one fdatasync; a background checkpoint folds
// whole segments into bbolt later, many commits per bbolt transaction.
//
// Files: LogName+".0" and LogName+".1". A segment's header names its
// generation; generation g lives in file g%2. The bbolt meta record
// "walgen" is the lowest generation not yet folded into bbolt: a segment
// whose generation is below it is stale and never replayed. Folding
// generation g writes its records and walgen = g+1 in one bbolt
// transaction, so a crash at any point either replays the segment again
// (every change in it is idempotent: a put of a whole lease or a delete)
// or skips it.
//
// The fdatasync is cheap because records are written into space that was
// already written (zeros at first, records of older generations later): the
// sync flushes data pages only, no file size or extent metadata. Measured
// on this machine's ext4 (4 KiB data block + fdatasync, p50): appending
// 181–188 µs, overwriting zero-filled space 122–132 µs, fallocate'd space
// 104 µs but p90 168→192 µs (unwritten extents are converted at
// writeback). Zeros also make a full disk show up as ENOSPC at the time
// the space is claimed, in the commit that needs it.
//
// Segment header (first walHeaderSize octets, the rest of the block zero):
//
//	magic "PCPDWAL1"(8) generation(8) firstSeq(8) crc32c(4) of the 24 before
//
// Record, back to back after the header:
//
//	len(4) crc32c(4) generation(8) seq(8) payload(len)
//	crc covers len and everything after crc up to the end of the payload
//	payload: seen(8, Unix ns) epochOp(1) [epoch(8, Unix ns) if epochOp = 1]
//	         entries: op(1) keyLen(2) key [valLen(2) val if op = put]
//	op: 1 delete, 2 put (leases); 3 delete, 4 put (MAP-22 quarantines,
//	    quarantine.go: their own keys and bucket)
//
// Keys and values are exactly the bbolt records (codec.go), so folding is
// a copy and the value's own checksum goes into the digest unchanged.
// Within a segment seqs are consecutive from firstSeq; the next segment's
// firstSeq continues them.
const (
	LogName       = "leases.wal" // segments LogName.0 and LogName.1
	walHeaderSize = 4096         // records start on their own block
	walHdrLen     = 28
	recHdrLen     = 24
	walMagic      = "PCPDWAL1"

	entryDel = 1
	entryPut = 2

	epochKeep  = 0
	epochSet   = 1
	epochClear = 2

	maxRecord = 1 << 30
)

var metaWALGen = []byte("walgen") // lowest log generation not yet in bbolt, 8 octets

func segName(i int) string { return fmt.Sprintf("%s.%d", LogName, i) }

// errTorn: no complete record here (short, zero, bad checksum). At the end
// of the log that is a write that was never acknowledged.
var errTorn = errors.New("no complete log record")

// logRecord is one decoded record; entries alias the input.
type logRecord struct {
	gen, seq uint64
	seen     int64
	epochOp  byte
	epoch    int64
	entries  []byte
}

// beginRecord appends a record header and the payload's fixed part; the
// caller appends entries, then calls finishRecord on the record's bytes.
func beginRecord(dst []byte, gen, seq uint64, seen time.Time, epochOp byte, epoch time.Time) []byte {
	dst = append(dst, make([]byte, 8)...) // len, crc: finishRecord
	dst = binary.BigEndian.AppendUint64(dst, gen)
	dst = binary.BigEndian.AppendUint64(dst, seq)
	dst = binary.BigEndian.AppendUint64(dst, uint64(seen.UnixNano()))
	dst = append(dst, epochOp)
	if epochOp == epochSet {
		dst = binary.BigEndian.AppendUint64(dst, uint64(epoch.UnixNano()))
	}
	return dst
}

// finishRecord fills in length and checksum of rec, one whole record.
func finishRecord(rec []byte) {
	binary.BigEndian.PutUint32(rec[0:4], uint32(len(rec)-recHdrLen))
	binary.BigEndian.PutUint32(rec[4:8], recordSum(rec))
}

func recordSum(rec []byte) uint32 {
	return crc32.Update(crc32.Checksum(rec[0:4], crcTable), crcTable, rec[8:])
}

// appendLogRecord encodes r whole (tests, fuzzing; the commit path builds
// records in place).
func appendLogRecord(dst []byte, r *logRecord) []byte {
	start := len(dst)
	dst = append(dst, make([]byte, 8)...)
	dst = binary.BigEndian.AppendUint64(dst, r.gen)
	dst = binary.BigEndian.AppendUint64(dst, r.seq)
	dst = binary.BigEndian.AppendUint64(dst, uint64(r.seen))
	dst = append(dst, r.epochOp)
	if r.epochOp == epochSet {
		dst = binary.BigEndian.AppendUint64(dst, uint64(r.epoch))
	}
	dst = append(dst, r.entries...)
	finishRecord(dst[start:])
	return dst
}

// decodeRecord reads the record at the start of b and returns it and its
// length. It never panics; any error means there is no usable record
// here (errTorn, or ErrCorrupt for a record whose checksum holds but whose
// content does not parse).
func decodeRecord(b []byte) (logRecord, int, error) {
	if len(b) < recHdrLen {
		return logRecord{}, 0, errTorn
	}
	n := int64(binary.BigEndian.Uint32(b[0:4]))
	if n < 9 || n > maxRecord || recHdrLen+n > int64(len(b)) {
		return logRecord{}, 0, errTorn
	}
	rec := b[:recHdrLen+n]
	if recordSum(rec) != binary.BigEndian.Uint32(b[4:8]) {
		return logRecord{}, 0, errTorn
	}
	r := logRecord{
		gen:     binary.BigEndian.Uint64(rec[8:16]),
		seq:     binary.BigEndian.Uint64(rec[16:24]),
		seen:    int64(binary.BigEndian.Uint64(rec[24:32])),
		epochOp: rec[32],
	}
	p := rec[33:]
	switch r.epochOp {
	case epochKeep, epochClear:
	case epochSet:
		if len(p) < 8 {
			return logRecord{}, 0, fmt.Errorf("store: log record %d: epoch cut short: %w", r.seq, ErrCorrupt)
		}
		r.epoch = int64(binary.BigEndian.Uint64(p))
		p = p[8:]
	default:
		return logRecord{}, 0, fmt.Errorf("store: log record %d: epoch op %d: %w", r.seq, r.epochOp, ErrCorrupt)
	}
	if err := walkEntries(p, func(byte, []byte, []byte) error { return nil }); err != nil {
		return logRecord{}, 0, fmt.Errorf("store: log record %d: %w", r.seq, err)
	}
	r.entries = p
	return r, len(rec), nil
}

// countEntries is how many entries walkEntries visits in p (fewer than
// a whole payload holds when p is damaged, which walkEntries reports): a
// size hint for the fold's entry list.
func countEntries(p []byte) int {
	n := 0
	_ = walkEntries(p, func(byte, []byte, []byte) error { n++; return nil })
	return n
}

// walkEntries calls fn for each entry of a record's payload, in order
// (val is nil for a delete).
func walkEntries(p []byte, fn func(op byte, key, val []byte) error) error {
	for len(p) > 0 {
		if len(p) < 3 {
			return fmt.Errorf("entry cut short: %w", ErrCorrupt)
		}
		op, kl := p[0], int(binary.BigEndian.Uint16(p[1:3]))
		p = p[3:]
		if kl == 0 || kl > len(p) {
			return fmt.Errorf("entry key of %d octets: %w", kl, ErrCorrupt)
		}
		key := p[:kl:kl]
		p = p[kl:]
		var val []byte
		switch op {
		case entryDel, entryQDel:
		case entryPut, entryQPut:
			if len(p) < 2 {
				return fmt.Errorf("entry value cut short: %w", ErrCorrupt)
			}
			vl := int(binary.BigEndian.Uint16(p[0:2]))
			p = p[2:]
			if vl < 4 || vl > len(p) {
				return fmt.Errorf("entry value of %d octets: %w", vl, ErrCorrupt)
			}
			val = p[:vl:vl]
			p = p[vl:]
		default:
			return fmt.Errorf("entry op %d: %w", op, ErrCorrupt)
		}
		if err := fn(op, key, val); err != nil {
			return err
		}
	}
	return nil
}

// appendDelEntry / appendPutEntry encode one change. The lease must have
// passed validate, so lengths fit their fields.
func appendDelEntry(b []byte, k *Key) []byte { return appendKeyEntry(b, entryDel, k, appendKey) }

func appendPutEntry(b []byte, l *Lease) []byte {
	return appendKeyValueEntry(b, entryPut, &l.Key, l, appendKey, appendValue)
}

// appendKeyEntry appends an entry of op with a key field alone, k as
// appendK encodes it: a delete (entryDel, entryQDel).
func appendKeyEntry[K any](b []byte, op byte, k *K, appendK func([]byte, *K) []byte) []byte {
	b, ks := beginField(append(b, op))
	b = appendK(b, k)
	endField(b, ks)
	return b
}

// appendKeyValueEntry appends an entry of op with a key field, k as
// appendK encodes it, and a value field, v as appendV encodes it given
// the key's octets (they go into its checksum): a put (entryPut,
// entryQPut).
func appendKeyValueEntry[K, V any](b []byte, op byte, k *K, v *V, appendK func([]byte, *K) []byte, appendV func(b, key []byte, v *V) []byte) []byte {
	b, ks := beginField(append(b, op))
	b = appendK(b, k)
	ke := len(b)
	endField(b, ks)
	b, vs := beginField(b)
	// key aliases b; if this append moves b, key still reads the old copy,
	// which holds the same octets.
	b = appendV(b, b[ks:ke], v)
	endField(b, vs)
	return b
}

// beginField appends a field's 2-octet length, to be filled in by
// endField, and returns where the field's octets start.
func beginField(b []byte) ([]byte, int) {
	b = append(b, 0, 0)
	return b, len(b)
}

// endField writes the length of the field that began at start (its
// beginField) and ends at len(b).
func endField(b []byte, start int) {
	binary.BigEndian.PutUint16(b[start-2:], uint16(len(b)-start))
}

type segHeader struct {
	gen, firstSeq uint64
}

func appendSegHeader(dst []byte, h segHeader) []byte {
	start := len(dst)
	dst = append(dst, walMagic...)
	dst = binary.BigEndian.AppendUint64(dst, h.gen)
	dst = binary.BigEndian.AppendUint64(dst, h.firstSeq)
	return binary.BigEndian.AppendUint32(dst, crc32.Checksum(dst[start:], crcTable))
}

// parseSegHeader: ok=false with why="" means an unused (all-zero) header.
func parseSegHeader(b []byte) (h segHeader, ok bool, why string) {
	if len(b) < walHdrLen {
		if len(b) == 0 || allZero(b) {
			return h, false, ""
		}
		return h, false, fmt.Sprintf("header cut short (%d octets)", len(b))
	}
	b = b[:walHdrLen]
	if allZero(b) {
		return h, false, ""
	}
	if string(b[:8]) != walMagic {
		return h, false, "bad magic in header"
	}
	if crc32.Checksum(b[:24], crcTable) != binary.BigEndian.Uint32(b[24:28]) {
		return h, false, "header fails its checksum"
	}
	return segHeader{gen: binary.BigEndian.Uint64(b[8:16]), firstSeq: binary.BigEndian.Uint64(b[16:24])}, true, ""
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// segScan is what one segment file holds.
type segScan struct {
	idx     int
	exists  bool
	hdr     segHeader
	hdrOK   bool
	recs    []logRecord // the valid records, in order
	lastSeq uint64      // seq of the last valid record (firstSeq-1 if none)
	tail    int64       // offset after the last valid record
	problem string      // damage that is not a torn tail
}

// scanSegment scans a segment held in memory (tests).
func scanSegment(data []byte, idx int) segScan {
	sc, _ := scanSegmentAt(bytes.NewReader(data), int64(len(data)), idx, 0)
	return sc
}

// scanChunk is how much of a segment file the scan reads at a time.
const scanChunk = 1 << 20

// scanSegmentAt reads one segment: its header, then records up to the
// first that is not complete and valid. A segment of a generation below w
// is stale: only its header is read. A torn tail is normal after a crash
// (that write was never acknowledged: acknowledging waits for the sync).
// But a valid record of the same generation after it can not come from a
// crash, because a record is written only after the one before it was
// synced: that is damage at rest, and what follows it is lost. The rest of
// the file is searched for such a record a chunk at a time, so a segment of
// tens of MiB costs no more memory than the records it holds.
func scanSegmentAt(f io.ReaderAt, size int64, idx int, w uint64) (segScan, error) {
	sc := segScan{idx: idx, exists: true}
	hdr := make([]byte, min(size, walHdrLen))
	if _, err := f.ReadAt(hdr, 0); err != nil && !errors.Is(err, io.EOF) {
		return sc, err
	}
	h, ok, why := parseSegHeader(hdr)
	if !ok {
		if why != "" {
			sc.problem = fmt.Sprintf("%s: %s", segName(idx), why)
		}
		return sc, nil
	}
	sc.hdr, sc.hdrOK = h, true
	sc.lastSeq = h.firstSeq - 1
	sc.tail = walHeaderSize
	if h.gen < w {
		return sc, nil
	}
	// buf holds the file from walHeaderSize on, as far as read.
	var buf []byte
	off := 0 // in buf: start of the next record
	for walHeaderSize+int64(off) < size {
		need := recHdrLen
		if len(buf)-off >= recHdrLen {
			if binary.BigEndian.Uint64(buf[off+8:]) != h.gen {
				break // an older generation's record, or nothing: the end
			}
			need = recHdrLen + int(min(int64(binary.BigEndian.Uint32(buf[off:])), maxRecord))
		}
		if len(buf)-off < need {
			have := walHeaderSize + int64(len(buf))
			if have >= size {
				break
			}
			n := min(max(int64(need-(len(buf)-off)), scanChunk), size-have)
			buf = slices.Grow(buf, int(n))[:len(buf)+int(n)]
			if _, err := f.ReadAt(buf[len(buf)-int(n):], have); err != nil && !errors.Is(err, io.EOF) {
				return sc, err
			}
			continue
		}
		r, n, err := decodeRecord(buf[off:])
		if err != nil || r.gen != h.gen || r.seq != sc.lastSeq+1 {
			break
		}
		sc.recs = append(sc.recs, r)
		sc.lastSeq = r.seq
		off += n
	}
	sc.tail = walHeaderSize + int64(off)
	if sc.tail < size {
		at, seq, found, err := laterRecord(f, size, sc.tail+1, h.gen, sc.lastSeq+1)
		if err != nil {
			return sc, err
		}
		if found {
			sc.problem = fmt.Sprintf("%s: record %d at offset %d is damaged, yet record %d at offset %d is intact",
				segName(idx), sc.lastSeq+1, sc.tail, seq, at)
		}
	}
	return sc, nil
}

// laterRecord finds a valid record of generation gen with seq ≥ minSeq at
// or after offset from, reading a chunk at a time.
func laterRecord(f io.ReaderAt, size, from int64, gen, minSeq uint64) (at int64, seq uint64, found bool, err error) {
	needle := binary.BigEndian.AppendUint64(nil, gen)
	chunk := make([]byte, scanChunk+recHdrLen)
	for base := from; base < size; base += scanChunk {
		n := min(int64(len(chunk)), size-base)
		c := chunk[:n]
		if _, err := f.ReadAt(c, base); err != nil && !errors.Is(err, io.EOF) {
			return 0, 0, false, err
		}
		// A record starting at base+p has its generation at base+p+8.
		for p := 8; p < len(c); {
			i := bytes.Index(c[p:], needle)
			if i < 0 {
				break
			}
			start := p + i - 8
			p += i + 1
			if start >= scanChunk {
				break // the next chunk sees it
			}
			// Cheap checks before reading and checksumming a record that
			// could be megabytes long at each chance match: the seq must
			// be one a later record of this segment could have.
			if start+recHdrLen > len(c) {
				continue
			}
			q := binary.BigEndian.Uint64(c[start+16:])
			if q < minSeq || q-minSeq > uint64(size)/recHdrLen {
				continue
			}
			l := int64(binary.BigEndian.Uint32(c[start:]))
			if base+int64(start)+recHdrLen+l > size {
				continue
			}
			rec := make([]byte, recHdrLen+l)
			if _, err := f.ReadAt(rec, base+int64(start)); err != nil && !errors.Is(err, io.EOF) {
				return 0, 0, false, err
			}
			if r, _, err := decodeRecord(rec); err == nil && r.gen == gen && r.seq >= minSeq {
				return base + int64(start), r.seq, true, nil
			}
		}
	}
	return 0, 0, false, nil
}

// logSel is the part of the log to replay on top of a state file.
type logSel struct {
	recs    []logRecord // in order
	problem string      // damage: changes may be lost (epoch reset)
	damaged []int       // segment files holding the damage (moved aside when writable)
	nextGen uint64      // generation for the next active segment
	nextSeq uint64
	folds   bool // the fold must write walgen (some segment was replayed)
}

// readLog reads both segment files and picks what to replay on top of a
// state file whose walgen is w: the segments of generation ≥ w, oldest
// first, each up to its first invalid record.
func readLog(dir string, w uint64) (*logSel, error) {
	var scans []segScan
	var maxSeq uint64
	for i := range 2 {
		sc, err := scanSegmentFile(filepath.Join(dir, segName(i)), i, w)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("store: read log: %w", err)
		}
		if sc.hdrOK {
			maxSeq = max(maxSeq, sc.lastSeq, sc.hdr.firstSeq)
		}
		scans = append(scans, sc)
	}
	sel := &logSel{nextGen: w, nextSeq: maxSeq + 1}
	var cands []segScan
	var problems []string
	// Once a state file has a walgen, some segment always names at least
	// the generation folded last (walgen-1): it is reused for a newer one
	// only after that one is folded too. Without such a segment the log
	// was deleted or replaced, and whatever it held is lost.
	if w > 0 {
		newest, any := uint64(0), false
		for _, sc := range scans {
			if sc.hdrOK {
				newest, any = max(newest, sc.hdr.gen), true
			}
		}
		if !any || newest < w {
			problems = append(problems, fmt.Sprintf("log missing: the state file needs generation %d, no segment has it or the one before", w))
		}
	}
	for _, sc := range scans {
		switch {
		case !sc.hdrOK && sc.problem != "":
			// An unreadable header could hide a segment to replay.
			problems = append(problems, sc.problem)
			sel.damaged = append(sel.damaged, sc.idx)
		case sc.hdrOK && sc.hdr.gen >= w:
			cands = append(cands, sc)
			if sc.problem != "" {
				problems = append(problems, sc.problem)
				sel.damaged = append(sel.damaged, sc.idx)
			}
		}
	}
	if len(cands) == 2 && cands[1].hdr.gen < cands[0].hdr.gen {
		cands[0], cands[1] = cands[1], cands[0]
	}
	switch {
	case len(cands) == 0:
	case cands[0].hdr.gen != w:
		problems = append(problems, fmt.Sprintf("the log starts at generation %d, the state file needs %d: changes in between are lost", cands[0].hdr.gen, w))
	case len(cands) == 2 && (cands[1].hdr.gen != cands[0].hdr.gen+1 || cands[1].hdr.firstSeq != cands[0].lastSeq+1):
		problems = append(problems, fmt.Sprintf("log segments do not follow each other (generation %d ends at record %d, generation %d starts at %d)",
			cands[0].hdr.gen, cands[0].lastSeq, cands[1].hdr.gen, cands[1].hdr.firstSeq))
	}
	// Replay only a prefix of history: nothing after a damaged record, a
	// gap between segments, or a log that starts past the state file.
	for i, c := range cands {
		if c.hdr.gen != w+uint64(i) || (i > 0 && (c.hdr.firstSeq != cands[i-1].lastSeq+1 || cands[i-1].problem != "")) {
			break
		}
		sel.recs = append(sel.recs, c.recs...)
	}
	// Nothing logged since the last fold (a clean shutdown leaves the
	// active segment folded or empty): generation w starts over in the
	// same file, and Open writes nothing to the state file.
	if len(sel.recs) > 0 || len(problems) > 0 {
		for _, c := range cands {
			sel.nextGen = max(sel.nextGen, c.hdr.gen+1)
		}
		sel.folds = true
	}
	sel.problem = strings.Join(problems, "; ")
	return sel, nil
}

// overlay is the net effect of replayed records, applied while decoding a
// state file (Open) so that no second pass over a million leases is
// needed.
type overlay struct {
	idx map[string]int // key → index in ent
	ent []ovEntry
	// Quarantine entries (their own key space): key → last value (nil:
	// deleted), keys in first-seen order, and those the file has.
	quar      map[string][]byte
	quarOrder []string
	quarUsed  map[string]bool
	seen      int64
	hasSeen   bool
	epochOp   byte
	epoch     int64
}

type ovEntry struct {
	key, val []byte // val nil: deleted
	used     bool
}

func newOverlay(recs []logRecord) *overlay {
	if len(recs) == 0 {
		return nil
	}
	ov := &overlay{idx: map[string]int{}}
	for _, r := range recs {
		ov.seen, ov.hasSeen = r.seen, true
		if r.epochOp != epochKeep {
			ov.epochOp, ov.epoch = r.epochOp, r.epoch
		}
		_ = walkEntries(r.entries, func(op byte, key, val []byte) error {
			if op == entryQDel || op == entryQPut {
				if ov.quar == nil {
					ov.quar, ov.quarUsed = map[string][]byte{}, map[string]bool{}
				}
				if _, ok := ov.quar[string(key)]; !ok {
					ov.quarOrder = append(ov.quarOrder, string(key))
				}
				ov.quar[string(key)] = val
				return nil
			}
			i, ok := ov.idx[string(key)]
			if !ok {
				i = len(ov.ent)
				ov.ent = append(ov.ent, ovEntry{key: key})
				ov.idx[string(key)] = i
			}
			ov.ent[i].val = val // nil for a delete
			return nil
		})
	}
	return ov
}

// puts counts the entries that end as a put.
func (ov *overlay) puts() int {
	n := 0
	for i := range ov.ent {
		if ov.ent[i].val != nil {
			n++
		}
	}
	return n
}

// readAt reads n octets of f at off into buf (grown if needed).
func readAt(f *os.File, off, n int64, buf []byte) ([]byte, error) {
	if int64(cap(buf)) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := f.ReadAt(buf, off); err != nil {
		return buf, err
	}
	return buf, nil
}

// logBounds reads only the segment headers: the generation and sequence
// number to start from when the log is not replayed (the state came from
// the backup or is new), so that nothing in the old segments is ever
// mistaken for a current record. found: some segment had a header.
func logBounds(dir string, w uint64) (sel *logSel, found bool) {
	sel = &logSel{nextGen: w, nextSeq: 1, folds: true}
	for i := range 2 {
		f, err := os.Open(filepath.Join(dir, segName(i)))
		if err != nil {
			continue
		}
		b := make([]byte, walHdrLen)
		n, _ := io.ReadFull(f, b)
		f.Close()
		if h, ok, _ := parseSegHeader(b[:n]); ok {
			found = true
			sel.nextGen = max(sel.nextGen, h.gen+1)
			sel.nextSeq = max(sel.nextSeq, h.firstSeq+1<<32)
		}
	}
	return sel, found
}

// scanSegmentFile scans segment file path (see scanSegmentAt).
func scanSegmentFile(path string, idx int, w uint64) (segScan, error) {
	f, err := os.Open(path)
	if err != nil {
		return segScan{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return segScan{}, err
	}
	return scanSegmentAt(f, fi.Size(), idx, w)
}
