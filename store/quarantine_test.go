package store

import (
	"bytes"
	"errors"
	"net/netip"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	bolt "go.etcd.io/bbolt"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// quarN is a quarantine on a distinct IPv4 external port, as the engine
// writes them.
func quarN(n int) Quarantine {
	return Quarantine{
		Endpoint:     Endpoint{Addr: netip.MustParseAddr("192.0.2.1"), Port: uint16(1024 + n%60000), Protocol: []uint8{6, 17}[n/60000%2]},
		Owner:        "peer" + string(rune('A'+n%16)),
		InternalAddr: netip.AddrFrom4([4]byte{10, 0, byte(n >> 8), byte(n)}),
		InternalPort: uint16(2000 + n%1000),
		Nonce:        [12]byte{byte(n), byte(n >> 8), 7},
		Until:        t0.Add(time.Duration(n%7000+60) * time.Second),
	}
}

func quarsN(from, to int) []Quarantine {
	qs := make([]Quarantine, 0, to-from)
	for i := from; i < to; i++ {
		qs = append(qs, quarN(i))
	}
	return qs
}

func wantQuars(t *testing.T, got, want []Quarantine) {
	t.Helper()
	key := func(q Quarantine) string { return string(appendQuarKey(nil, &q.Endpoint)) }
	srt := func(qs []Quarantine) []Quarantine {
		out := append([]Quarantine(nil), qs...)
		sort.Slice(out, func(i, j int) bool { return key(out[i]) < key(out[j]) })
		return out
	}
	if d := cmp.Diff(srt(want), srt(got), cmpOpts); d != "" {
		t.Fatalf("quarantines differ (-want +got), %d want, %d got:\n%.3000s", len(want), len(got), d)
	}
}

func encodeQuar(t testing.TB, q *Quarantine) (key, val []byte) {
	t.Helper()
	if err := q.validate(); err != nil {
		t.Fatalf("validate: %v", err)
	}
	key = appendQuarKey(nil, &q.Endpoint)
	return key, appendQuarValue(nil, key, q)
}

func TestQuarantineRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name string
		mod  func(*Quarantine)
	}{
		{"typical", func(*Quarantine) {}},
		{"empty owner", func(q *Quarantine) { q.Owner = "" }},
		{"longest owner", func(q *Quarantine) { q.Owner = strings.Repeat("o", MaxOwner) }},
		{"all-ones", func(q *Quarantine) {
			q.Protocol, q.Port, q.InternalPort = 255, 65535, 65535
			q.Nonce = [12]byte{255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255}
		}},
		{"zoned internal", func(q *Quarantine) { q.InternalAddr = netip.MustParseAddr("fe80::1%wg0") }},
		{"time with location", func(q *Quarantine) { q.Until = time.Date(2030, 1, 2, 3, 4, 5, 6, time.FixedZone("x", 3600)) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q := quarN(5)
			tc.mod(&q)
			key, val := encodeQuar(t, &q)
			got, err := decodeQuarantine(key, val, interner{})
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			if !got.Until.Equal(q.Until) {
				t.Fatalf("until %v, want %v", got.Until, q.Until)
			}
			got.Until = q.Until
			if d := cmp.Diff(q, got, cmpOpts); d != "" {
				t.Fatalf("round trip (-want +got):\n%s", d)
			}
		})
	}
}

// TestQuarantineCorruptRecord: any flipped bit, cut or extension of a
// stored quarantine record is ErrCorrupt, never a wrong quarantine.
func TestQuarantineCorruptRecord(t *testing.T) {
	q := quarN(3)
	key, val := encodeQuar(t, &q)
	check := func(what string, k, v []byte) {
		t.Helper()
		got, err := decodeQuarantine(k, v, nil)
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("%s: decode = %+v, %v; want ErrCorrupt", what, got, err)
		}
		if d := cmp.Diff(Quarantine{}, got, cmpOpts); d != "" {
			t.Fatalf("%s: quarantine and error both returned", what)
		}
	}
	for i := range (len(key) + len(val)) * 8 {
		k, v := bytes.Clone(key), bytes.Clone(val)
		if i/8 < len(k) {
			k[i/8] ^= 1 << (i % 8)
		} else {
			v[i/8-len(k)] ^= 1 << (i % 8)
		}
		check("bit flip", k, v)
	}
	for n := range len(val) {
		check("cut", key, val[:n])
	}
	check("extended", key, append(bytes.Clone(val), 0))
	// Right checksum, wrong content: the field checks behind it.
	body := val[:len(val)-4]
	for _, tc := range []struct {
		what string
		k, b []byte
	}{
		{"version 2", key, append([]byte{2}, body[1:]...)},
		{"trailing octet", key, append(bytes.Clone(body), 0)},
		{"key trailing octet", append(bytes.Clone(key), 0), body},
		{"zero until", key, append(bytes.Clone(body[:len(body)-8]), 0x80, 0, 0, 0, 0, 0, 0, 0)},
		{"zoned external", appendQuarKey(nil, &Endpoint{Addr: netip.MustParseAddr("fe80::1%x"), Port: 1}), body},
	} {
		check(tc.what, tc.k, withCRC(tc.k, tc.b))
	}
}

// FuzzDecodeQuarantine: the decoder never panics, never returns a
// quarantine with an error, and what it accepts re-encodes to itself.
func FuzzDecodeQuarantine(f *testing.F) {
	for _, q := range []Quarantine{quarN(1), quarN(70000)} {
		key := appendQuarKey(nil, &q.Endpoint)
		val := appendQuarValue(nil, key, &q)
		f.Add(key, val)
		f.Add(key, val[:len(val)-4])
	}
	f.Add([]byte{}, []byte{})
	f.Fuzz(func(t *testing.T, key, val []byte) {
		for _, v := range [][]byte{val, withCRC(key, val)} {
			q, err := decodeQuarantine(key, v, nil)
			if err != nil {
				if !errors.Is(err, ErrCorrupt) {
					t.Fatalf("error does not wrap ErrCorrupt: %v", err)
				}
				if d := cmp.Diff(Quarantine{}, q, cmpOpts); d != "" {
					t.Fatalf("quarantine and error both returned:\n%s", d)
				}
				continue
			}
			if err := q.validate(); err != nil {
				t.Fatalf("decoded quarantine fails validate: %v", err)
			}
			k2 := appendQuarKey(nil, &q.Endpoint)
			v2 := appendQuarValue(nil, k2, &q)
			if !bytes.Equal(k2, key) || !bytes.Equal(v2, v) {
				t.Fatalf("accepted record does not re-encode to itself:\nkey %x\n  → %x\nval %x\n  → %x", key, k2, v, v2)
			}
		}
	})
}

// TestQuarantinePersists: quarantines committed with leases come back from
// Open with them, however the directory was left: a crash with everything
// still in the log, a clean Close (folded), a fold and more log on top.
// Deletes and replacements of a quarantine hold the same way.
func TestQuarantinePersists(t *testing.T) {
	a, b := quarN(1), quarN(2)
	b2 := b
	b2.Owner, b2.Until = "other", b.Until.Add(time.Minute) // same port freed again by someone else
	c := quarN(3)
	for _, tc := range []struct {
		name  string
		leave func(t *testing.T, s *Store) State
		want  []Quarantine // nil: b2, c
	}{
		{"kill -9, all in the log", func(t *testing.T, s *Store) State {
			_, st := openT(t, crashImage(t, s.Dir()))
			return st
		}, nil},
		{"closed (folded)", func(t *testing.T, s *Store) State {
			_, st := reopen(t, s)
			return st
		}, nil},
		{"folded, then logged, then kill -9", func(t *testing.T, s *Store) State {
			if err := s.Checkpoint(); err != nil {
				t.Fatal(err)
			}
			d := quarN(4)
			if err := s.CommitQuar(nil, nil, &QuarChange{Put: []Quarantine{d}, Del: []Endpoint{c.Endpoint}}); err != nil {
				t.Fatal(err)
			}
			_, st := openT(t, crashImage(t, s.Dir()))
			return st
		}, []Quarantine{b2, quarN(4)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := openT(t, t.TempDir(), noCheckpoint, WithoutOpenSnapshot())
			l := leaseN(1)
			if err := s.Commit([]Lease{l, leaseN(2)}, nil); err != nil {
				t.Fatal(err)
			}
			// The delete of lease 1 and the quarantine of its port: one
			// record.
			before := s.Stats().Commits
			if err := s.CommitQuar(nil, []Key{l.Key}, &QuarChange{Put: []Quarantine{a, b, c}}); err != nil {
				t.Fatal(err)
			}
			if got := s.Stats().Commits - before; got != 1 {
				t.Fatalf("lease delete and quarantine took %d log records, want 1", got)
			}
			if err := s.CommitQuar(nil, nil, &QuarChange{Put: []Quarantine{b2}, Del: []Endpoint{a.Endpoint, quarN(9).Endpoint}}); err != nil {
				t.Fatal(err)
			}
			st := tc.leave(t, s)
			wantLeases(t, st.Leases, []Lease{leaseN(2)})
			if tc.want == nil {
				tc.want = []Quarantine{b2, c}
			}
			wantQuars(t, st.Quarantines, tc.want)
		})
	}
}

// TestQuarantineInvalidChangesNothing: a bad quarantine fails its commit
// before anything is written, lease changes of the same call included.
func TestQuarantineInvalidChangesNothing(t *testing.T) {
	s, _ := openT(t, t.TempDir())
	bad := quarN(1)
	bad.Until = time.Time{}
	for _, q := range []*QuarChange{{Put: []Quarantine{quarN(2), bad}}, {Del: []Endpoint{{}}}} {
		if err := s.CommitQuar([]Lease{leaseN(1)}, nil, q); !errors.Is(err, ErrInvalidLease) {
			t.Fatalf("CommitQuar = %v, want ErrInvalidLease", err)
		}
	}
	_, st := reopen(t, s)
	wantLeases(t, st.Leases, nil)
	wantQuars(t, st.Quarantines, nil)
}

// TestQuarantineOldStateFile: a state file written before quarantines
// existed (no quarantine bucket, no qdigest) opens with its leases and no
// quarantines, and takes quarantines from then on.
func TestQuarantineOldStateFile(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir)
	if err := s.Commit(leasesN(0, 10), nil); err != nil {
		t.Fatal(err)
	}
	if err := s.ResetEpoch(t0); err != nil {
		t.Fatal(err)
	}
	s.Close()
	has := func(db *bolt.DB) bool {
		has := false
		db.View(func(tx *bolt.Tx) error {
			has = tx.Bucket(bucketQuar) != nil || tx.Bucket(bucketMeta).Get(metaQDigest) != nil
			return nil
		})
		return has
	}
	hasBucket := func() bool {
		db, err := bolt.Open(dir+"/"+DBName, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		return has(db)
	}
	if hasBucket() {
		t.Fatal("a store that never held a quarantine has the quarantine bucket: not an old file")
	}
	s, st := openT(t, dir)
	if st.Fresh || st.Recovered != "" {
		t.Fatalf("old state file: fresh %v, recovered %q", st.Fresh, st.Recovered)
	}
	wantLeases(t, st.Leases, leasesN(0, 10))
	wantQuars(t, st.Quarantines, nil)
	if err := s.CommitQuar(nil, nil, &QuarChange{Put: quarsN(0, 3)}); err != nil {
		t.Fatal(err)
	}
	s, st = reopen(t, s)
	wantQuars(t, st.Quarantines, quarsN(0, 3))
	if !has(s.db) {
		t.Fatal("quarantines folded without their bucket")
	}
}

// TestQuarantineDamageAtRest: damage confined to the quarantine bucket or
// its digest costs quarantines only (readQuarantines): the state file
// stays, every lease (those written after the backup copy too) and the
// epoch survive, the quarantines that check out are kept, one error line
// names what was lost, and the bucket is rebuilt so the next Open finds
// nothing wrong. Damage to a lease or the leases' digest still moves the
// file aside and restores the backup with an epoch reset, as before.
// Its first and "digest lost" rows are the h/revquar review's finding (it
// used to cost the 5 leases written after the backup, and the epoch; LOW,
// fixed by readQuarantines).
func TestQuarantineDamageAtRest(t *testing.T) {
	firstRecord := func(tx *bolt.Tx, bucket []byte) (*bolt.Bucket, []byte, []byte) {
		b := tx.Bucket(bucket)
		k, v := b.Cursor().First()
		return b, bytes.Clone(k), bytes.Clone(v)
	}
	flip := func(bucket []byte) func(tx *bolt.Tx) error {
		return func(tx *bolt.Tx) error {
			b, k, v := firstRecord(tx, bucket)
			v[3] ^= 0x10
			return b.Put(k, v)
		}
	}
	for _, tc := range []struct {
		name  string
		harm  func(tx *bolt.Tx) error
		quars []Quarantine // kept; nil with leases: the backup's
		lease bool         // lease data damaged: the old way
	}{
		{"flipped bit in a record", flip(bucketQuar), quarsN(1, 5), false},
		{"flipped bit in a record's checksum", func(tx *bolt.Tx) error {
			b, k, v := firstRecord(tx, bucketQuar)
			v[len(v)-1] ^= 0x01
			return b.Put(k, v)
		}, quarsN(1, 5), false},
		{"record lost", func(tx *bolt.Tx) error {
			b, k, _ := firstRecord(tx, bucketQuar)
			return b.Delete(k)
		}, quarsN(1, 5), false},
		{"digest lost", func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Delete(metaQDigest) }, quarsN(0, 5), false},
		{"digest cut short", func(tx *bolt.Tx) error {
			return tx.Bucket(bucketMeta).Put(metaQDigest, []byte{0, 0, 0, 5})
		}, quarsN(0, 5), false},
		{"bucket lost", func(tx *bolt.Tx) error { return tx.DeleteBucket(bucketQuar) }, nil, false},
		{"nested bucket in the quarantine bucket", func(tx *bolt.Tx) error {
			_, err := tx.Bucket(bucketQuar).CreateBucket([]byte("odd"))
			return err
		}, quarsN(0, 5), false},
		{"lease: flipped bit in a record", flip(bucketLeases), nil, true},
		{"lease: digest lost", func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Delete(metaDigest) }, nil, true},
		{"lease and quarantine both damaged", func(tx *bolt.Tx) error {
			if err := flip(bucketQuar)(tx); err != nil {
				return err
			}
			return flip(bucketLeases)(tx)
		}, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := quarState(t, true, leasesN(5, 10))
			db, err := bolt.Open(dir+"/"+DBName, 0o600, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := db.Update(tc.harm); err != nil {
				t.Fatal(err)
			}
			db.Close()

			core, logs := observer.New(zap.InfoLevel)
			s, st, err := Open(dir, zap.New(core))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { s.Close() })
			aside, _ := filepath.Glob(filepath.Join(dir, DBName+".corrupt-*"))
			if tc.lease {
				if !st.Fresh || !strings.Contains(st.Recovered, "restored 5 leases from backup") || len(aside) != 1 {
					t.Fatalf("fresh %v, recovered %q, moved aside %v; want the backup restored", st.Fresh, st.Recovered, aside)
				}
				wantLeases(t, st.Leases, leasesN(0, 5))
				wantQuars(t, st.Quarantines, quarsN(0, 5))
				return
			}
			if st.Fresh || !st.EpochOrigin.Equal(t0) || len(aside) != 0 {
				t.Fatalf("fresh %v, epoch %v (want %v), moved aside %v, recovered %q; want leases and epoch kept",
					st.Fresh, st.EpochOrigin, t0, aside, st.Recovered)
			}
			if !strings.Contains(st.Recovered, "MAP-22 quarantines damaged") || !strings.Contains(st.Recovered, "leases and epoch unaffected") {
				t.Fatalf("recovered %q; want the quarantine damage named", st.Recovered)
			}
			wantLeases(t, st.Leases, leasesN(0, 10))
			wantQuars(t, st.Quarantines, tc.quars)
			errs := logs.FilterLevelExact(zap.ErrorLevel).All()
			if len(errs) != 1 || errs[0].Message != "state recovery" || errs[0].ContextMap()["recovered"] != st.Recovered {
				t.Fatalf("error lines %v; want one \"state recovery\" naming the damage", errs)
			}
			// Rebuilt at Open: the next Open finds nothing wrong.
			s, st = reopen(t, s)
			if st.Fresh || st.Recovered != "" {
				t.Fatalf("after the rebuild: fresh %v, recovered %q", st.Fresh, st.Recovered)
			}
			wantLeases(t, st.Leases, leasesN(0, 10))
			wantQuars(t, st.Quarantines, tc.quars)
			// And carries quarantines as before.
			if err := s.CommitQuar(nil, nil, &QuarChange{Put: quarsN(7, 9)}); err != nil {
				t.Fatal(err)
			}
			_, st = reopen(t, s)
			if st.Recovered != "" {
				t.Fatalf("after a fold on the rebuilt bucket: recovered %q", st.Recovered)
			}
			wantQuars(t, st.Quarantines, append(slices.Clone(tc.quars), quarsN(7, 9)...))
		})
	}
}

// TestQuarantineChurnBounded: a store that takes and ends quarantines
// over and over (map, delete, the quarantine dropped) does not grow: its
// quarantine bucket holds the live ones only, and the state file's size
// settles.
func TestQuarantineChurnBounded(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir, WithCheckpoint(64<<10, time.Hour))
	var sizes []int64
	for round := range 20 {
		for i := range 200 {
			n := round*200 + i
			l := leaseN(n % 500)
			if err := s.Commit([]Lease{l}, nil); err != nil {
				t.Fatal(err)
			}
			q := quarN(n % 500)
			// Deleted with its quarantine set; the quarantine of an
			// earlier round ends (expired, dropped by the engine).
			if err := s.CommitQuar(nil, []Key{l.Key}, &QuarChange{Put: []Quarantine{q}, Del: []Endpoint{quarN((n + 250) % 500).Endpoint}}); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.Checkpoint(); err != nil {
			t.Fatal(err)
		}
		var size int64
		var n int
		s.db.View(func(tx *bolt.Tx) error {
			size, n = tx.Size(), tx.Bucket(bucketQuar).Stats().KeyN
			return nil
		})
		if n > 250 {
			t.Fatalf("round %d: %d quarantine records, at most 250 live", round, n)
		}
		sizes = append(sizes, size)
	}
	if last, mid := sizes[len(sizes)-1], sizes[len(sizes)/2]; last > mid {
		t.Fatalf("state file still growing under churn: %d octets at round 10, %d at round 20 (%v)", mid, last, sizes)
	}
}

// quarState is a closed store in a new directory: epoch t0, leasesN(0, 5)
// with quarsN(0, 5) committed together, then (backup) a backup copy, then
// the leases after; the damage tests harm it and open it again.
func quarState(t *testing.T, backup bool, after []Lease) string {
	t.Helper()
	dir := t.TempDir()
	s, _ := openT(t, dir, WithoutOpenSnapshot())
	if err := s.ResetEpoch(t0); err != nil {
		t.Fatal(err)
	}
	if err := s.CommitQuar(leasesN(0, 5), nil, &QuarChange{Put: quarsN(0, 5)}); err != nil {
		t.Fatal(err)
	}
	if backup {
		if err := s.Snapshot(); err != nil {
			t.Fatal(err)
		}
	}
	if after != nil {
		if err := s.Commit(after, nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return dir
}
