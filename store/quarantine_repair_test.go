package store

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// clearRootBucketFlag clears the bucket flag of the root's leaf element
// named key in the state file at path (one bit at rest): with the bucket
// inline (a few records), it becomes a plain value of the root and no page
// goes unreachable, so bbolt's own check and inspectFile pass.
func clearRootBucketFlag(t *testing.T, path string, key []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m0, why0 := readMeta(f, 0)
	if why0 != "" {
		t.Fatalf("meta 0: %s", why0)
	}
	m1, why1 := readMeta(f, int64(m0.pageSize))
	m := m0
	if why1 == "" && m1.txid > m0.txid {
		m = m1
	}
	ps := int64(m.pageSize)
	p := make([]byte, ps)
	if _, err := f.ReadAt(p, int64(m.root)*ps); err != nil {
		t.Fatal(err)
	}
	if ne.Uint16(p[8:10])&flagLeaf == 0 {
		t.Fatalf("root page %d is not a leaf (flags %#x)", m.root, ne.Uint16(p[8:10]))
	}
	for i := range int(ne.Uint16(p[10:12])) {
		off := pageHeaderSize + i*elemSize
		e := p[off : off+elemSize]
		pos, ksize := int(ne.Uint32(e[4:8])), int(ne.Uint32(e[8:12]))
		if !bytes.Equal(p[off+pos:off+pos+ksize], key) {
			continue
		}
		if ne.Uint32(e[0:4])&flagBucket == 0 {
			t.Fatalf("root element %q is no bucket", key)
		}
		ne.PutUint32(e[0:4], ne.Uint32(e[0:4])&^flagBucket)
		if _, err := f.WriteAt(p, int64(m.root)*ps); err != nil {
			t.Fatal(err)
		}
		return
	}
	t.Fatalf("no root element %q", key)
}

// TestQuarantineDamageRepairable: damage confined to the quarantines is
// only "quarantine-only" if Open's rebuild can actually rebuild: the
// store must then take commits again and the next Open must find nothing
// wrong. A "quarantine" root key that is a plain value (one flipped flag
// bit of an inline bucket's element) or a "qdigest" that is a bucket made
// CreateBucketIfNotExists / Put fail with ErrIncompatibleValue in
// repairQuarantines on every try: setupLog failed, every commit was
// refused (ErrUnavailable) for good, and every start logged the same
// "state recovery" line (h/revdmg finding 1, HIGH). Before h/quardmg this
// damage moved the file aside and restored the backup (epoch reset).
func TestQuarantineDamageRepairable(t *testing.T) {
	for _, tc := range []struct {
		name  string
		harm  func(t *testing.T, dir string)
		quars []Quarantine
	}{
		{"quarantine bucket flag cleared (one bit)", func(t *testing.T, dir string) {
			clearRootBucketFlag(t, filepath.Join(dir, DBName), bucketQuar)
		}, nil},
		{"quarantine bucket flag cleared, qdigest lost too", func(t *testing.T, dir string) {
			harmBolt(t, dir, func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Delete(metaQDigest) })
			clearRootBucketFlag(t, filepath.Join(dir, DBName), bucketQuar)
		}, nil},
		{"qdigest is a bucket", func(t *testing.T, dir string) {
			harmBolt(t, dir, func(tx *bolt.Tx) error {
				if err := tx.Bucket(bucketMeta).Delete(metaQDigest); err != nil {
					return err
				}
				_, err := tx.Bucket(bucketMeta).CreateBucket(metaQDigest)
				return err
			})
		}, quarsN(0, 5)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s, _ := openT(t, dir, WithoutOpenSnapshot())
			if err := s.ResetEpoch(t0); err != nil {
				t.Fatal(err)
			}
			if err := s.CommitQuar(leasesN(0, 5), nil, &QuarChange{Put: quarsN(0, 5)}); err != nil {
				t.Fatal(err)
			}
			if err := s.Snapshot(); err != nil {
				t.Fatal(err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			tc.harm(t, dir)

			s, st := openT(t, dir, WithoutOpenSnapshot())
			if st.Recovered == "" {
				t.Fatalf("damage not reported: fresh %v", st.Fresh)
			}
			if st.Fresh {
				wantLeases(t, st.Leases, leasesN(0, 5))
			} else {
				if !st.EpochOrigin.Equal(t0) {
					t.Fatalf("not fresh, epoch %v", st.EpochOrigin)
				}
				wantLeases(t, st.Leases, leasesN(0, 5))
				wantQuars(t, st.Quarantines, tc.quars)
			}
			// The store must be usable: the damage was repaired (or the
			// file replaced), not left to refuse every commit.
			for i := range 3 {
				if err := s.CommitQuar([]Lease{leaseN(10 + i)}, nil, &QuarChange{Put: []Quarantine{quarN(10 + i)}}); err != nil {
					t.Fatalf("commit %d after Open: %v", i, err)
				}
			}
			_, st = reopen(t, s, WithoutOpenSnapshot())
			if st.Recovered != "" {
				t.Fatalf("second Open after the repair: recovered %q (fresh %v)", st.Recovered, st.Fresh)
			}
			wantLeases(t, st.Leases, append(leasesN(0, 5), leasesN(10, 13)...))
		})
	}
}

func harmBolt(t *testing.T, dir string, harm func(tx *bolt.Tx) error) {
	t.Helper()
	db, err := bolt.Open(filepath.Join(dir, DBName), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Update(harm); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
}
