package store

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// TestQuarantineDamageUnderLog: quarantine damage with the log's
// quarantine entries to replay on top (a kill -9 left them unfolded).
// The log's rules for its records stay (a record failing its CRC-32C is
// damage of the log, whatever it carries, since it may carry leases), but
// a logged quarantine entry in a record whose CRC holds that still does
// not decode costs that quarantine only, like a damaged record of the
// file: it used to move the (intact) state file aside.
func TestQuarantineDamageUnderLog(t *testing.T) {
	for _, tc := range []struct {
		name   string
		file   bool // flip a bit in quarN(0)'s record in the state file
		logged bool // flip a bit in the logged quarN(8) (record CRC fixed up)
		want   []Quarantine
	}{
		// The log deletes quarN(1), replaces quarN(2) and adds quarN(7, 9).
		{"damaged file record, log on top", true, false, append(append(quarsN(3, 5), quarMoved(2)), quarsN(7, 9)...)},
		{"logged entry does not decode", false, true, append(append(quarsN(0, 1), quarsN(3, 5)...), quarMoved(2), quarN(7))},
		{"both", true, true, append(append(quarsN(3, 5), quarMoved(2)), quarN(7))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s, _ := openT(t, dir, noCheckpoint, WithoutOpenSnapshot())
			if err := s.ResetEpoch(t0); err != nil {
				t.Fatal(err)
			}
			if err := s.CommitQuar(leasesN(0, 5), nil, &QuarChange{Put: quarsN(0, 5)}); err != nil {
				t.Fatal(err)
			}
			s, _ = reopen(t, s, noCheckpoint, WithoutOpenSnapshot()) // folded: the file holds them
			if err := s.CommitQuar(leasesN(5, 10), nil, &QuarChange{Put: []Quarantine{quarMoved(2), quarN(7)}, Del: []Endpoint{quarN(1).Endpoint}}); err != nil {
				t.Fatal(err)
			}
			if err := s.CommitQuar(nil, nil, &QuarChange{Put: []Quarantine{quarN(8)}}); err != nil {
				t.Fatal(err)
			}
			img := crashImage(t, dir)
			if tc.file {
				db, err := bolt.Open(img+"/"+DBName, 0o600, nil)
				if err != nil {
					t.Fatal(err)
				}
				err = db.Update(func(tx *bolt.Tx) error {
					b := tx.Bucket(bucketQuar)
					k, v := b.Cursor().First()
					v = bytes.Clone(v)
					v[3] ^= 0x10
					return b.Put(bytes.Clone(k), v)
				})
				db.Close()
				if err != nil {
					t.Fatal(err)
				}
			}
			if tc.logged {
				// The newest generation's segment (the other one still
				// holds the folded generation's records).
				var path string
				var data []byte
				var sc segScan
				for i := range 2 {
					p := filepath.Join(img, segName(i))
					d, err := os.ReadFile(p)
					if err != nil {
						t.Fatal(err)
					}
					if c := scanSegment(d, i); c.hdrOK && len(c.recs) > 0 && (path == "" || c.hdr.gen > sc.hdr.gen) {
						path, data, sc = p, d, c
					}
				}
				offs := recordOffsets(sc)
				rec := data[offs[len(offs)-2]:offs[len(offs)-1]]
				rec[len(rec)-10] ^= 0x01 // in quarN(8)'s value, the last entry
				finishRecord(rec)        // the record's own CRC holds
				if err := os.WriteFile(path, data, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			s, st := openT(t, img)
			if st.Fresh || !st.EpochOrigin.Equal(t0) || !strings.Contains(st.Recovered, "MAP-22 quarantines damaged") ||
				strings.Contains(st.Recovered, "log damaged") {
				t.Fatalf("fresh %v, epoch %v, recovered %q; want leases, epoch and log kept, the quarantine damage named",
					st.Fresh, st.EpochOrigin, st.Recovered)
			}
			wantLeases(t, st.Leases, leasesN(0, 10))
			wantQuars(t, st.Quarantines, tc.want)
			_, st = reopen(t, s)
			if st.Fresh || st.Recovered != "" {
				t.Fatalf("after the rebuild: fresh %v, recovered %q", st.Fresh, st.Recovered)
			}
			wantQuars(t, st.Quarantines, tc.want)
		})
	}
}

// quarMoved is quarN(n) held longer (a newer record under the same key).
func quarMoved(n int) Quarantine {
	q := quarN(n)
	q.Until = q.Until.Add(time.Minute)
	return q
}
