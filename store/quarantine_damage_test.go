package store

import (
	"bytes"
	"os"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// TestQuarantineDamageCostsLeases: damage confined to the quarantine
// bucket (every lease record and the leases' digest check out) should
// cost the quarantines it touches, not the leases. Today it moves the
// whole state file aside (TestQuarantineDamageAtRest): the leases revert
// to the backup copy (those changed since it was written are lost, here
// 5 of 10) and the epoch resets, every client re-mapping, for a record
// that holds a freed port for at most 124 min. Known (LOW, h/revquar
// review): skipped unless PCPD_KNOWN_BUGS=1 (then it fails).
func TestQuarantineDamageCostsLeases(t *testing.T) {
	if os.Getenv("PCPD_KNOWN_BUGS") == "" {
		t.Skip("known: quarantine damage moves the whole state aside; PCPD_KNOWN_BUGS=1 to run (fails)")
	}
	for _, tc := range []struct {
		name string
		harm func(tx *bolt.Tx) error
	}{
		{"flipped bit in a record", func(tx *bolt.Tx) error {
			b := tx.Bucket(bucketQuar)
			k, v := b.Cursor().First()
			v = bytes.Clone(v)
			v[3] ^= 0x10
			return b.Put(bytes.Clone(k), v)
		}},
		{"digest lost", func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Delete(metaQDigest) }},
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
			if err := s.Commit(leasesN(5, 10), nil); err != nil { // after the backup
				t.Fatal(err)
			}
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			db, err := bolt.Open(dir+"/"+DBName, 0o600, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := db.Update(tc.harm); err != nil {
				t.Fatal(err)
			}
			db.Close()
			_, st := openT(t, dir)
			if st.Fresh || len(st.Leases) != 10 {
				t.Fatalf("quarantine damage: fresh %v, %d leases of 10, recovered %q", st.Fresh, len(st.Leases), st.Recovered)
			}
		})
	}
}
