package store

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// noCheckpoint keeps everything in the log (no fold before Close), so a
// copy of the directory is what a kill -9 would leave.
var noCheckpoint = WithCheckpoint(1<<30, time.Hour)

// walStore is a store in a new directory that checkpoints only when
// told (noCheckpoint), its epoch origin t0.
func walStore(t *testing.T) (string, *Store) {
	t.Helper()
	dir := t.TempDir()
	s, _ := openT(t, dir, fixedClock(t0), noCheckpoint, WithoutOpenSnapshot())
	if err := s.ResetEpoch(t0); err != nil {
		t.Fatal(err)
	}
	return dir, s
}

// reopenCrashed opens what a kill -9 would leave of dir (crashImage) a
// minute on, and wants continuity (Fresh false, nothing recovered).
func reopenCrashed(t *testing.T, dir string) State {
	t.Helper()
	_, st := openT(t, crashImage(t, dir), fixedClock(t0.Add(time.Minute)), WithoutOpenSnapshot())
	if st.Fresh || st.Recovered != "" {
		t.Fatalf("Fresh = %v, Recovered = %q", st.Fresh, st.Recovered)
	}
	return st
}

// crashImage copies the state directory's files as they are now, while the
// store is open: every acknowledged commit was fdatasynced, so the page
// cache holds exactly what a kill -9 at this moment would leave on disk.
func crashImage(t *testing.T, dir string) string {
	t.Helper()
	nd := t.TempDir()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	// The log first, then the state file: a checkpoint running meanwhile
	// only moves the state file forward (its log segment then reads as
	// already folded), whereas the other order could pair an old state
	// file with a segment already reused for a newer generation.
	slices.SortStableFunc(ents, func(a, b os.DirEntry) int {
		return cmpBool(!strings.HasPrefix(a.Name(), LogName), !strings.HasPrefix(b.Name(), LogName))
	})
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		err := copyFile(filepath.Join(dir, e.Name()), filepath.Join(nd, e.Name()))
		if errors.Is(err, fs.ErrNotExist) {
			// Gone since ReadDir: the background backup's leases.db.bak.tmp,
			// renamed or removed meanwhile (TestResetEpochStaleAppend failed
			// CI on it). A crash now would find it gone too. (Only the
			// open can fail so: an open file stays readable.)
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	return nd
}

func TestLogRecordRoundTrip(t *testing.T) {
	l, d := fullLease(), leaseN(7)
	ents := appendPutEntry(appendDelEntry(nil, &d.Key), &l)
	tests := []struct {
		name string
		rec  logRecord
	}{
		{"heartbeat only", logRecord{gen: 1, seq: 1, seen: t0.UnixNano()}},
		{"epoch set", logRecord{gen: 0, seq: 99, seen: t0.UnixNano(), epochOp: epochSet, epoch: t0.Add(-time.Hour).UnixNano()}},
		{"epoch clear", logRecord{gen: 1 << 40, seq: 1 << 50, seen: -1, epochOp: epochClear}},
		{"put and delete", logRecord{gen: 3, seq: 4, seen: 5, entries: ents}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := appendLogRecord([]byte("prefix"), &tt.rec)[len("prefix"):]
			got, n, err := decodeRecord(append(b, 0, 0, 0)) // trailing zeros: the preallocated rest
			if err != nil {
				t.Fatal(err)
			}
			if n != len(b) {
				t.Fatalf("decoded %d octets of %d", n, len(b))
			}
			if d := cmp.Diff(tt.rec, got, cmp.AllowUnexported(logRecord{}), cmpEmptyBytes); d != "" {
				t.Fatalf("round trip (-want +got):\n%s", d)
			}
		})
	}
	// The entries decode back to the leases.
	var got []string
	err := walkEntries(ents, func(op byte, key, val []byte) error {
		k, err := decodeKey(key, nil)
		if err != nil {
			return err
		}
		if op == entryDel {
			got = append(got, "del "+k.Owner)
			return nil
		}
		dl, err := decodeLease(key, val, nil)
		if err != nil {
			return err
		}
		if d := cmpLease(l, dl); d != "" {
			t.Errorf("lease differs: %s", d)
		}
		got = append(got, "put "+dl.Owner)
		return nil
	})
	if err != nil || len(got) != 2 || got[0] != "del "+leaseN(7).Owner || got[1] != "put "+l.Owner {
		t.Fatalf("entries: %v, %v", got, err)
	}
}

func cmpBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case a:
		return 1
	}
	return -1
}

// stopCheckpointer stops the background checkpoints of s, so a test
// controls every fold.
func stopCheckpointer(s *Store) {
	close(s.ckStop)
	<-s.ckDone
	s.ckStop = nil
}

var cmpEmptyBytes = cmp.Comparer(func(a, b []byte) bool { return bytes.Equal(a, b) })

// FuzzLogRecord: decodeRecord never panics; whatever it accepts re-encodes
// to exactly the octets it read; and a record built from the fuzzer's
// values decodes back to itself.
func FuzzLogRecord(f *testing.F) {
	l := fullLease()
	f.Add(appendLogRecord(nil, &logRecord{gen: 1, seq: 2, seen: 3, entries: appendPutEntry(nil, &l)}), uint64(1), uint64(2), int64(3), byte(1), int64(4), []byte("key"))
	f.Add(appendLogRecord(nil, &logRecord{gen: 7, seq: 8, epochOp: epochClear, entries: appendDelEntry(nil, &l.Key)}), uint64(0), uint64(0), int64(0), byte(0), int64(0), []byte{})
	f.Add([]byte{0, 0, 0, 9}, uint64(5), uint64(6), int64(-7), byte(2), int64(8), bytes.Repeat([]byte{0xff}, 300))
	f.Fuzz(func(t *testing.T, data []byte, gen, seq uint64, seen int64, op byte, epoch int64, kv []byte) {
		if r, n, err := decodeRecord(data); err == nil {
			again := appendLogRecord(nil, &r)
			if !bytes.Equal(again, data[:n]) {
				t.Fatalf("re-encoding differs:\n%x\n%x", again, data[:n])
			}
		}
		want := logRecord{gen: gen, seq: seq, seen: seen, epochOp: op % 3}
		if want.epochOp == epochSet {
			want.epoch = epoch
		}
		// One put and one delete whose key and value are the fuzzer's octets.
		if len(kv) >= 4 && len(kv) <= 0xffff {
			e := []byte{entryPut}
			e = binary.BigEndian.AppendUint16(e, uint16(len(kv)))
			e = append(e, kv...)
			e = binary.BigEndian.AppendUint16(e, uint16(len(kv)))
			e = append(e, kv...)
			e = append(e, entryDel)
			e = binary.BigEndian.AppendUint16(e, uint16(len(kv)))
			want.entries = append(e, kv...)
		}
		b := appendLogRecord(nil, &want)
		got, n, err := decodeRecord(b)
		if err != nil || n != len(b) {
			t.Fatalf("decode(encode(%+v)) = %v, %d of %d octets", want, err, n, len(b))
		}
		if d := cmp.Diff(want, got, cmp.AllowUnexported(logRecord{}), cmpEmptyBytes); d != "" {
			t.Fatalf("decode(encode(x)) != x (-want +got):\n%s", d)
		}
		// A cut anywhere is a torn record, never something else.
		for _, cut := range []int{0, 1, recHdrLen - 1, recHdrLen, len(b) / 2, len(b) - 1} {
			if cut >= 0 && cut < len(b) {
				if _, _, err := decodeRecord(b[:cut]); !errors.Is(err, errTorn) {
					t.Fatalf("record cut at %d of %d: %v, want errTorn", cut, len(b), err)
				}
			}
		}
	})
}

// TestLogReplay: commits that only reached the log (no checkpoint) are all
// there after a crash, in order: puts, deletes, replacements, the epoch and
// the heartbeat; and the replay is folded into the state file at Open.
func TestLogReplay(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir, fixedClock(t0), noCheckpoint, WithoutOpenSnapshot())
	origin := t0.Add(-time.Hour)
	if err := s.ResetEpoch(origin); err != nil {
		t.Fatal(err)
	}
	want := map[int]Lease{}
	c := s.NewCommitter()
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 50 {
				if err := c.Commit([]Lease{leaseN(g*1000 + i)}, nil); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	for g := range 4 {
		for i := range 50 {
			want[g*1000+i] = leaseN(g*1000 + i)
		}
	}
	// Replace one, delete one, delete and put one in the same commit.
	r := leaseN(1)
	r.Expires = r.Expires.Add(time.Hour)
	want[1] = r
	delete(want, 2)
	if err := s.Commit([]Lease{r, leaseN(3)}, []Key{leaseN(2).Key, leaseN(3).Key}); err != nil {
		t.Fatal(err)
	}
	if err := s.Touch(t0.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if got := s.Stats(); got.Checkpoints != 0 || got.Commits < 200/maxGroup+3 {
		t.Fatalf("stats %+v: want records and no checkpoint", got)
	}
	img := crashImage(t, dir)

	check := func(t *testing.T, st State) {
		t.Helper()
		var ws []Lease
		for _, l := range want {
			ws = append(ws, l)
		}
		wantLeases(t, st.Leases, ws)
		if st.Fresh || !st.EpochOrigin.Equal(origin) || st.Recovered != "" {
			t.Fatalf("Fresh = %v, EpochOrigin = %v, Recovered = %q", st.Fresh, st.EpochOrigin, st.Recovered)
		}
	}
	// The heartbeat came from the log: a clock behind it is doubtful.
	_, st := openT(t, crashImage(t, img), fixedClock(t0), WithoutOpenSnapshot())
	if !st.Fresh || !strings.Contains(st.Recovered, "last alive") {
		t.Fatalf("heartbeat from the log ignored: Fresh = %v, Recovered = %q", st.Fresh, st.Recovered)
	}
	s2, st := openT(t, img, fixedClock(t0.Add(2*time.Minute)), WithoutOpenSnapshot())
	check(t, st)
	// Open folded the log: the state file alone now holds everything.
	s2.Close()
	db, ld, err := readState(filepath.Join(img, DBName), &options{lockTimeout: time.Second}, true, "")
	if err != nil {
		t.Fatal(err)
	}
	db.Close()
	check(t, State{Leases: ld.leases, EpochOrigin: ld.epoch})
	// Without its log, that state file is not taken for complete.
	for i := range 2 {
		os.Remove(filepath.Join(img, segName(i)))
	}
	_, st = openT(t, img, fixedClock(t0.Add(3*time.Minute)), WithoutOpenSnapshot())
	if !st.Fresh || !strings.Contains(st.Recovered, "log missing") {
		t.Fatalf("log deleted: Fresh = %v, Recovered = %q", st.Fresh, st.Recovered)
	}
}

// recordOffsets returns where each record of sc starts, and the tail.
func recordOffsets(sc segScan) []int64 {
	offs := []int64{walHeaderSize}
	for _, r := range sc.recs {
		n := int64(recHdrLen + 9 + len(r.entries))
		if r.epochOp == epochSet {
			n += 8
		}
		offs = append(offs, offs[len(offs)-1]+n)
	}
	return offs
}

// activeSegment returns the segment file holding records, and its scan.
func activeSegment(t *testing.T, dir string) (string, segScan) {
	t.Helper()
	var path string
	var sc segScan
	for i := range 2 {
		p := filepath.Join(dir, segName(i))
		data, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		if c := scanSegment(data, i); c.hdrOK && len(c.recs) > 0 {
			if path != "" {
				t.Fatal("two segments hold records")
			}
			path, sc = p, c
		}
	}
	if path == "" {
		t.Fatal("no log record found")
	}
	return path, sc
}

// lastRecord returns the active segment file and the span of its last
// record.
func lastRecord(t *testing.T, dir string) (path string, start, end int64) {
	t.Helper()
	path, sc := activeSegment(t, dir)
	offs := recordOffsets(sc)
	if offs[len(offs)-1] != sc.tail {
		t.Fatalf("offsets %v, tail %d", offs, sc.tail)
	}
	return path, offs[len(offs)-2], offs[len(offs)-1]
}

// TestLogTornTail: the last record cut at every octet (the rest zeros, as
// in preallocated space, or the octets of an older record, as in a reused
// segment) is a write that was never acknowledged: Open drops it silently
// and keeps everything before it, epoch included.
func TestLogTornTail(t *testing.T) {
	dir, s := walStore(t)
	if err := s.Commit(leasesN(0, 3), nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit([]Lease{leaseN(3)}, []Key{leaseN(0).Key}); err != nil {
		t.Fatal(err)
	}
	img := crashImage(t, dir)
	path, start, end := lastRecord(t, img)
	orig, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	fills := []struct {
		name string
		fill func(b []byte)
	}{
		{"zeros", func(b []byte) { clear(b) }},
		{"stale octets", func(b []byte) { copy(b, garbage(len(b), uint64(len(b)))) }},
	}
	for _, fl := range fills {
		t.Run(fl.name, func(t *testing.T) {
			for cut := start; cut < end; cut++ {
				nd := crashImage(t, img)
				b := append([]byte(nil), orig...)
				fl.fill(b[cut:end])
				writeFile(t, filepath.Join(nd, filepath.Base(path)), b)
				s, st, err := Open(nd, nil, fixedClock(t0.Add(time.Minute)), WithoutOpenSnapshot())
				if err != nil {
					t.Fatalf("cut at %d: %v", cut, err)
				}
				if st.Fresh || st.Recovered != "" {
					t.Fatalf("cut at %d (record %d..%d): Fresh = %v, Recovered = %q", cut, start, end, st.Fresh, st.Recovered)
				}
				wantLeases(t, st.Leases, leasesN(0, 3))
				s.Close()
			}
		})
	}
	t.Logf("last record %d..%d cut at each of its %d octets, 2 fillings: dropped, the rest kept", start, end, end-start)
}

// TestLogDamage: damage before valid records of the same generation is not
// a torn tail. Open keeps the state up to the damage, resets the epoch,
// says why, and moves the damaged segment aside.
func TestLogDamage(t *testing.T) {
	dir, s := walStore(t)
	for i := range 10 {
		if err := s.Commit([]Lease{leaseN(i)}, nil); err != nil {
			t.Fatal(err)
		}
	}
	img := crashImage(t, dir)
	segPath, sc := activeSegment(t, img)
	if len(sc.recs) != 11 {
		t.Fatalf("%d records, want 11 (epoch + 10 commits)", len(sc.recs))
	}
	offs := recordOffsets(sc)
	tests := []struct {
		name      string
		at        int64 // octet to flip
		leases    int   // how many of leaseN(0..) survive
		recovered string
	}{
		{"length of record 5", offs[5] + 2, 4, "is damaged, yet record"},
		{"checksum of record 5", offs[5] + 5, 4, "is damaged, yet record"},
		{"generation of record 5", offs[5] + 15, 4, "is damaged, yet record"},
		{"seq of record 5", offs[5] + 23, 4, "is damaged, yet record"},
		{"a lease in record 8", offs[8] + 60, 7, "is damaged, yet record"},
		{"segment header", 10, 0, "header"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nd := crashImage(t, img)
			p := filepath.Join(nd, filepath.Base(segPath))
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			b[tt.at] ^= 0x40
			writeFile(t, p, b)
			s, st := openT(t, nd, fixedClock(t0.Add(time.Minute)))
			if !st.Fresh || !st.EpochOrigin.IsZero() || !strings.Contains(st.Recovered, "log damaged") || !strings.Contains(st.Recovered, tt.recovered) {
				t.Fatalf("Fresh = %v, EpochOrigin = %v, Recovered = %q", st.Fresh, st.EpochOrigin, st.Recovered)
			}
			wantLeases(t, st.Leases, leasesN(0, tt.leases))
			if m, _ := filepath.Glob(p + ".corrupt-*"); len(m) != 1 {
				t.Fatalf("damaged segment not moved aside: %v", m)
			}
			// The store works on, the reset stays pending, and once the
			// engine resets, continuity holds again.
			if err := s.Commit([]Lease{leaseN(100)}, nil); err != nil {
				t.Fatal(err)
			}
			s, st = reopen(t, s, fixedClock(t0.Add(2*time.Minute)))
			if !st.Fresh || !strings.Contains(st.Recovered, "pending") {
				t.Fatalf("second start: Fresh = %v, Recovered = %q", st.Fresh, st.Recovered)
			}
			wantLeases(t, st.Leases, append(leasesN(0, tt.leases), leaseN(100)))
			if err := s.ResetEpoch(t0.Add(2 * time.Minute)); err != nil {
				t.Fatal(err)
			}
			_, st = reopen(t, s, fixedClock(t0.Add(3*time.Minute)))
			if st.Fresh || st.Recovered != "" {
				t.Fatalf("after ResetEpoch: Fresh = %v, Recovered = %q", st.Fresh, st.Recovered)
			}
		})
	}
}

// TestLogGenerations: what a checkpoint folded is never replayed again,
// even though its segment keeps the records until it is reused; a
// checkpoint's state file without the log's newer generations, or a state
// file older than the log, is noticed.
func TestLogGenerations(t *testing.T) {
	t.Run("folded segments stay folded", func(t *testing.T) {
		dir, s := walStore(t)
		// gen g: put 0..10; checkpoint; gen g+1: delete 0..5; checkpoint
		// (segment of gen g still holds the puts); gen g+2: put 20.
		if err := s.Commit(leasesN(0, 10), nil); err != nil {
			t.Fatal(err)
		}
		if err := s.checkpoint(ckAll); err != nil {
			t.Fatal(err)
		}
		var del []Key
		for i := range 5 {
			del = append(del, leaseN(i).Key)
		}
		if err := s.Commit(nil, del); err != nil {
			t.Fatal(err)
		}
		if err := s.checkpoint(ckAll); err != nil {
			t.Fatal(err)
		}
		if err := s.Commit([]Lease{leaseN(20)}, nil); err != nil {
			t.Fatal(err)
		}
		if got := s.Stats().Checkpoints; got != 2 {
			t.Fatalf("%d checkpoints, want 2", got)
		}
		st := reopenCrashed(t, dir)
		wantLeases(t, st.Leases, append(leasesN(5, 10), leaseN(20)))
	})
	t.Run("crash between fold and next record", func(t *testing.T) {
		// Both segments pending is the state a crash leaves when a fold
		// had not finished: both replay, oldest first.
		dir := t.TempDir()
		s, _ := openT(t, dir, fixedClock(t0), noCheckpoint, WithoutOpenSnapshot())
		stopCheckpointer(s)
		if err := s.ResetEpoch(t0); err != nil {
			t.Fatal(err)
		}
		if err := s.Commit(leasesN(0, 10), nil); err != nil {
			t.Fatal(err)
		}
		if err := s.checkpoint(ckRoom); err != nil { // rotate, fold later
			t.Fatal(err)
		}
		if err := s.Commit(nil, []Key{leaseN(0).Key}); err != nil {
			t.Fatal(err)
		}
		if got := s.Stats().Checkpoints; got != 0 {
			t.Fatalf("%d checkpoints, want none yet", got)
		}
		st := reopenCrashed(t, dir)
		wantLeases(t, st.Leases, leasesN(1, 10))
	})
	t.Run("state file older than its log", func(t *testing.T) {
		dir, s := walStore(t)
		if err := s.Commit(leasesN(0, 5), nil); err != nil {
			t.Fatal(err)
		}
		old := crashImage(t, dir)
		if err := s.checkpoint(ckAll); err != nil {
			t.Fatal(err)
		}
		if err := s.checkpoint(ckAll); err != nil { // nothing to fold: no-op
			t.Fatal(err)
		}
		if err := s.Commit(leasesN(5, 10), nil); err != nil {
			t.Fatal(err)
		}
		if err := s.checkpoint(ckAll); err != nil {
			t.Fatal(err)
		}
		if err := s.Commit(leasesN(10, 12), nil); err != nil {
			t.Fatal(err)
		}
		// The current log with the state file from before the checkpoints.
		nd := crashImage(t, dir)
		if err := copyFile(filepath.Join(old, DBName), filepath.Join(nd, DBName)); err != nil {
			t.Fatal(err)
		}
		_, st := openT(t, nd, fixedClock(t0.Add(time.Minute)), WithoutOpenSnapshot())
		if !st.Fresh || !strings.Contains(st.Recovered, "the log starts at generation") {
			t.Fatalf("Fresh = %v, Recovered = %q", st.Fresh, st.Recovered)
		}
	})
}

// TestCheckpointWhileCommitting: with checkpoints every few KiB and
// milliseconds, concurrent committers keep going; nothing acknowledged is
// lost, a snapshot taken meanwhile holds everything acknowledged before
// it, and the log stays small.
func TestCheckpointWhileCommitting(t *testing.T) {
	// 8 KiB: checkpoints rotate before the first segment needs to grow;
	// 256 KiB: commits also switch to the spare early (tryAppend) while
	// the checkpointer folds.
	for _, tc := range []struct {
		ckpt  int64
		every time.Duration
	}{{8 << 10, 5 * time.Millisecond}, {256 << 10, 40 * time.Millisecond}} {
		ckpt := tc.ckpt
		t.Run(fmt.Sprint(ckpt), func(t *testing.T) {
			dir := t.TempDir()
			s, _ := openT(t, dir, WithCheckpoint(ckpt, tc.every), WithoutOpenSnapshot())
			if err := s.ResetEpoch(time.Now()); err != nil {
				t.Fatal(err)
			}
			c := s.NewCommitter()
			const workers = 8
			var acked atomic.Int64
			var hi [workers]int // highest i each worker had acknowledged
			var wg sync.WaitGroup
			stop := make(chan struct{})
			for g := range workers {
				hi[g] = -1
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; ; i++ {
						select {
						case <-stop:
							return
						default:
						}
						n := g*100_000 + i
						var del []Key
						if i%4 == 3 {
							del = []Key{leaseN(n - 3).Key} // deletes land in other segments than their puts
						}
						if err := c.Commit([]Lease{leaseN(n)}, del); err != nil {
							t.Error(err)
							return
						}
						hi[g] = i
						acked.Add(1)
					}
				}()
			}
			time.Sleep(300 * time.Millisecond)
			if err := s.Snapshot(); err != nil {
				t.Fatal(err)
			}
			time.Sleep(200 * time.Millisecond)
			close(stop)
			wg.Wait()
			st := s.Stats()
			t.Logf("%d commits in %d records, %d checkpoints, %d switches to the spare", acked.Load(), st.Commits, st.Checkpoints, s.switches.Load())
			if st.Checkpoints < 5 {
				t.Fatalf("only %d checkpoints", st.Checkpoints)
			}
			for i := range 2 {
				fi, err := os.Stat(filepath.Join(dir, segName(i)))
				if err != nil {
					t.Fatal(err)
				}
				if fi.Size() > 1<<20 {
					t.Errorf("segment %d grew to %d octets with %d-octet checkpoints", i, fi.Size(), ckpt)
				}
			}
			var want []Lease
			for g := range workers {
				for i := 0; i <= hi[g]; i++ {
					if i%4 == 0 && i+3 <= hi[g] {
						continue // deleted by the commit of i+3
					}
					want = append(want, leaseN(g*100_000+i))
				}
			}
			// A crash image taken while the checkpointer may be folding, and a
			// clean reopen, both hold exactly what was acknowledged.
			_, cst := openT(t, crashImage(t, dir), WithoutOpenSnapshot())
			wantLeases(t, cst.Leases, want)
			_, state := reopen(t, s)
			wantLeases(t, state.Leases, want)
			// The snapshot is a consistent earlier state: restore it alone.
			_, bst := openT(t, copyDir(t, dir, BackupName, DBName), WithoutOpenSnapshot())
			if len(bst.Leases) == 0 || len(bst.Leases) > len(state.Leases)+workers {
				t.Fatalf("snapshot holds %d leases, final state %d", len(bst.Leases), len(state.Leases))
			}
		})
	}
}

// TestLogFull: a record larger than the log limit still goes in (into an
// empty segment), and commits beyond the limit wait for the checkpoint
// instead of failing.
func TestLogFull(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir, WithCheckpoint(4<<10, time.Hour), WithoutOpenSnapshot())
	if err := s.Commit(leasesN(0, 1000), nil); err != nil { // ≈ 140 KiB, the limit is 16 KiB
		t.Fatal(err)
	}
	for i := range 300 {
		if err := s.Commit([]Lease{leaseN(1000 + i)}, nil); err != nil {
			t.Fatal(err)
		}
	}
	if st := s.Stats(); st.Checkpoints < 3 {
		t.Fatalf("%+v: the log was never folded", st)
	}
	_, st := reopen(t, s)
	wantLeases(t, st.Leases, leasesN(0, 1300))
}

// TestLogFilesNotStateFiles: a directory whose log files are all that is
// left is not taken for a new one.
func TestLogWithoutStateFile(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir, noCheckpoint, WithoutOpenSnapshot())
	if err := s.Commit(leasesN(0, 5), nil); err != nil {
		t.Fatal(err)
	}
	nd := crashImage(t, dir)
	if err := os.Remove(filepath.Join(nd, DBName)); err != nil {
		t.Fatal(err)
	}
	_, st := openT(t, nd, WithoutOpenSnapshot())
	if !st.Fresh || !strings.Contains(st.Recovered, "log is there") {
		t.Fatalf("Fresh = %v, Recovered = %q", st.Fresh, st.Recovered)
	}
	if _, err := os.Stat(filepath.Join(nd, segName(0))); errors.Is(err, fs.ErrNotExist) {
		t.Fatal("log removed")
	}
}

// TestWithStream: Open hands every live lease to the callback (the state
// file's, with the log applied), builds no State.Leases, hands nothing out
// of a damaged file it then replaces with the backup, and returns the
// callback's error as it is.
func TestWithStream(t *testing.T) {
	collect := func(got *[]Lease) Option {
		return WithStream(func(l *Lease) error {
			c := *l
			c.Filters = slices.Clone(l.Filters)
			*got = append(*got, c)
			return nil
		})
	}
	// In the log only: a replacement, a delete, a new lease (laterImage).
	img, want := laterImage(t, 0)

	var got []Lease
	_, st := openT(t, img, collect(&got), WithoutOpenSnapshot())
	if st.Leases != nil || st.Fresh {
		t.Fatalf("State.Leases has %d, Fresh = %v", len(st.Leases), st.Fresh)
	}
	wantLeases(t, got, want)

	t.Run("callback error", func(t *testing.T) {
		boom := errors.New("boom")
		_, _, err := Open(crashImage(t, img), nil, WithStream(func(*Lease) error { return boom }))
		if !errors.Is(err, boom) {
			t.Fatalf("Open = %v, want the callback's error", err)
		}
	})
	t.Run("damaged file replaced by the backup", func(t *testing.T) {
		nd := crashImage(t, img)
		s, _ := openT(t, nd, WithoutOpenSnapshot())
		if err := s.Snapshot(); err != nil { // backup: everything above
			t.Fatal(err)
		}
		if err := s.Commit([]Lease{leaseN(70)}, nil); err != nil {
			t.Fatal(err)
		}
		s.Close()
		// One flipped octet in the value of lease 70, the only record
		// added after the backup (so no older page copy holds it): its
		// checksum fails only when the decoder gets to it.
		b, err := os.ReadFile(filepath.Join(nd, DBName))
		if err != nil {
			t.Fatal(err)
		}
		k70 := leaseN(70)
		key := appendKey(nil, &k70.Key)
		i := bytes.Index(b, key)
		if i < 0 || bytes.Count(b, key) != 1 {
			t.Fatalf("lease 70's record found %d times", bytes.Count(b, key))
		}
		b[i+len(key)+5] ^= 1
		writeFile(t, filepath.Join(nd, DBName), b)
		var got []Lease
		_, st := openT(t, nd, collect(&got), WithoutOpenSnapshot())
		if !st.Fresh || !strings.Contains(st.Recovered, "restored") {
			t.Fatalf("Fresh = %v, Recovered = %q", st.Fresh, st.Recovered)
		}
		wantLeases(t, got, want)
	})
}

// TestLogUnreadable: a log segment that can not be read is an error of
// Open, not a reason to take the state file for damaged and move it
// aside.
func TestLogUnreadable(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir, noCheckpoint, WithoutOpenSnapshot())
	if err := s.Commit(leasesN(0, 5), nil); err != nil {
		t.Fatal(err)
	}
	nd := crashImage(t, dir)
	// A directory where a segment file should be: reading it fails.
	for i := range 2 {
		p := filepath.Join(nd, segName(i))
		if err := os.Remove(p); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(p, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := Open(nd, nil, WithoutOpenSnapshot()); err == nil {
		t.Fatal("Open succeeded with unreadable log segments")
	}
	if m := asideFiles(t, nd, DBName); len(m) != 0 {
		t.Fatalf("state file moved aside: %v", m)
	}
}

// TestLogGrowsAhead: a segment's file is zero-filled ahead of the records
// in the background, so commits do not write (and sync) the growth
// themselves: that was a 30 ms stall on the commit path each time a fresh
// segment doubled. Commits paced like a busy daemon's (one record every
// 200 µs) across several doublings find the room already there, and what
// they committed reads back.
func TestLogGrowsAhead(t *testing.T) {
	for _, tc := range []struct {
		name  string
		batch int // leases per commit (≈ 140 octets each)
	}{{"small records", 4}, {"large records", 64}} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s, _ := openT(t, dir, WithCheckpoint(4<<20, time.Hour), WithoutOpenSnapshot())
			if err := s.ResetEpoch(time.Now()); err != nil {
				t.Fatal(err)
			}
			const total = 8000
			for i := 0; i < total; i += tc.batch {
				if err := s.Commit(leasesN(i, i+tc.batch), nil); err != nil {
					t.Fatal(err)
				}
				time.Sleep(200 * time.Microsecond)
			}
			fi, err := os.Stat(filepath.Join(dir, segName(int(s.wal.seg[s.wal.active].gen%2))))
			if err != nil {
				t.Fatal(err)
			}
			// Several doublings from 16 KiB; the commits themselves grew
			// at most the last step's shortfall.
			if fi.Size() < 512<<10 {
				t.Fatalf("segment only %d octets: the test did not make it grow", fi.Size())
			}
			if g := s.syncGrown.Load(); g > fi.Size()/4 {
				t.Errorf("commits zero-filled %d of the segment's %d octets themselves", g, fi.Size())
			}
			_, st := reopen(t, s)
			wantLeases(t, st.Leases, leasesN(0, total))
		})
	}
}

// TestLogSwitchesToSpare: once the spare segment is zero-filled to its
// full size, a commit that finds the active segment out of written room
// goes on in the spare instead of growing the file commits sync (whose
// growth every concurrent commit's fdatasync carried). Across several
// rotations the active segment grows only at the very start, before the
// spare is ready; both segments end at full size; nothing acknowledged is
// lost.
func TestLogSwitchesToSpare(t *testing.T) {
	const ckpt = 1 << 20
	for _, tc := range []struct {
		name  string
		batch int // leases per commit (≈ 140 octets each)
	}{{"small records", 4}, {"large records", 64}} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if free, ok := freeSpace(dir); !ok || free < 2*(ckpt+logRunway)+spareHeadroom {
				t.Skipf("%d octets free: the spare is not filled ahead", free)
			}
			s, _ := openT(t, dir, WithCheckpoint(ckpt, time.Hour), WithoutOpenSnapshot())
			if err := s.ResetEpoch(time.Now()); err != nil {
				t.Fatal(err)
			}
			// The grower fills the spare from the first commit on; wait
			// for it (on a busy disk it can take a while), so what the
			// active segment grows below is not a race with it.
			waitSpare(t, s)
			total := 0
			for s.Stats().Checkpoints < 3 && total < 200_000 {
				if err := s.Commit(leasesN(total, total+tc.batch), nil); err != nil {
					t.Fatal(err)
				}
				total += tc.batch
				time.Sleep(100 * time.Microsecond)
			}
			if st := s.Stats(); st.Checkpoints < 3 {
				t.Fatalf("%+v after %d leases: the log did not rotate", st, total)
			}
			// Without the switch each segment grows to full size while
			// active (≥ 2 MiB here); with it, none does.
			if s.switches.Load() == 0 {
				t.Error("the log never switched to the spare early")
			}
			if g := s.activeGrown.Load() + s.syncGrown.Load(); g > ckpt/2 {
				t.Errorf("the active segment was grown by %d octets (grower %d, commits %d)", g, s.activeGrown.Load(), s.syncGrown.Load())
			}
			_, st := reopen(t, s)
			for i := range 2 {
				fi, err := os.Stat(filepath.Join(dir, segName(i)))
				if err != nil {
					t.Fatal(err)
				}
				if fi.Size() < ckpt+logRunway {
					t.Errorf("segment %d has %d octets, want %d", i, fi.Size(), ckpt+logRunway)
				}
			}
			wantLeases(t, st.Leases, leasesN(0, total))
		})
	}
}

// TestRecordLen: tryAppend decides whether a record fits before building
// it; recordLen must be the built record's length.
func TestRecordLen(t *testing.T) {
	for _, tc := range []struct {
		name  string
		op    byte
		batch [][]Lease
	}{
		{"empty", epochKeep, nil},
		{"epoch", epochSet, nil},
		{"one", epochKeep, [][]Lease{leasesN(0, 1)}},
		{"several", epochSet, [][]Lease{leasesN(0, 3), leasesN(3, 40)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var bs []*batch
			for _, put := range tc.batch {
				b := new(batch)
				if err := b.encode(put, []Key{put[0].Key}, nil); err != nil {
					t.Fatal(err)
				}
				bs = append(bs, b)
			}
			rec := beginRecord(nil, 1, 1, time.Now(), tc.op, time.Now())
			for _, b := range bs {
				rec = append(rec, b.buf...)
			}
			if got := recordLen(bs, tc.op); got != int64(len(rec)) {
				t.Fatalf("recordLen = %d, record has %d octets", got, len(rec))
			}
		})
	}
}

// TestCountEntries: the fold sizes its list with countEntries, which must
// count what walkEntries visits, and never more on a damaged payload.
func TestCountEntries(t *testing.T) {
	l := fullLease()
	k := leaseN(7).Key
	var mixed []byte
	mixed = appendDelEntry(mixed, &k)
	mixed = appendPutEntry(mixed, &l)
	for i := range 5 {
		mixed = appendPutEntry(mixed, new(leaseN(i)))
	}
	tests := []struct {
		name string
		p    []byte
	}{
		{"empty", nil},
		{"one delete", appendDelEntry(nil, &k)},
		{"one put", appendPutEntry(nil, &l)},
		{"mixed", mixed},
		{"cut in the last value", mixed[:len(mixed)-5]},
		{"cut in a key length", mixed[:len(mixed)-len(appendPutEntry(nil, new(leaseN(4))))+2]},
		{"trailing octet", append(append([]byte{}, mixed...), entryPut)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			walked := 0
			err := walkEntries(tt.p, func(byte, []byte, []byte) error { walked++; return nil })
			got := countEntries(tt.p)
			if err == nil && got != walked || got > walked {
				t.Fatalf("countEntries = %d, walkEntries visited %d (err %v)", got, walked, err)
			}
		})
	}
}
