package store

import (
	"iter"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestDamageInOlderSegmentStopsReplay: damage at rest in the older of two
// unfolded segments. The doc
// promises Open "keeps what precedes it"; the newer segment's records come
// after the damage and must not be replayed on top of a gap (that yields a
// state that never existed: here two leases on one external endpoint).
func TestDamageInOlderSegmentStopsReplay(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir, fixedClock(t0), noCheckpoint, WithoutOpenSnapshot())
	stopCheckpointer(s)
	if err := s.ResetEpoch(t0); err != nil {
		t.Fatal(err)
	}
	x := leaseN(1)
	y := leaseN(2)
	y.ExternalAddr, y.ExternalPort = x.ExternalAddr, x.ExternalPort // Y takes X's endpoint once X is gone
	if err := s.Commit([]Lease{x}, nil); err != nil {               // rec 1
		t.Fatal(err)
	}
	if err := s.Commit(nil, []Key{x.Key}); err != nil { // rec 2: to be damaged
		t.Fatal(err)
	}
	if err := s.Commit([]Lease{leaseN(3)}, nil); err != nil { // rec 3: intact after the damage
		t.Fatal(err)
	}
	// Rotate without folding (what a commit finding the log full does).
	if err := s.checkpoint(ckRoom); err != nil {
		t.Fatal(err)
	}
	if err := s.Commit([]Lease{y}, nil); err != nil { // newer segment
		t.Fatal(err)
	}
	img := crashImage(t, dir)
	// The older segment: generation of the first (active at Open) one.
	var old string
	var sc segScan
	for p, c := range segments(img) {
		if c.hdrOK && len(c.recs) == 4 {
			old, sc = p, c
		}
	}
	if old == "" {
		t.Fatal("older segment not found")
	}
	offs := recordOffsets(sc)
	b, _ := os.ReadFile(old)
	b[offs[2]+60] ^= 0x40 // inside rec 2 (the delete of X)
	writeFile(t, old, b)

	_, st := openT(t, img, fixedClock(t0.Add(time.Minute)))
	t.Logf("Fresh=%v Recovered=%q", st.Fresh, st.Recovered)
	have := map[string]bool{}
	for _, l := range st.Leases {
		have[l.Owner+"/"+l.InternalAddr.String()] = true
		for _, m := range st.Leases {
			if l.Key != m.Key && l.ExternalAddr == m.ExternalAddr && l.ExternalPort == m.ExternalPort && l.Protocol == m.Protocol {
				t.Errorf("two leases hold external %v:%d: %v and %v", l.ExternalAddr, l.ExternalPort, l.Key, m.Key)
			}
		}
	}
	if len(st.Leases) != 1 {
		t.Errorf("got %d leases, want only X (what precedes the damage)", len(st.Leases))
	}
}

// TestLostActiveSegmentIsNoticed: the active segment (holding acknowledged,
// unfolded commits) is lost: truncated to zero or deleted. The other
// segment names walgen-1; Open must not report continuity (it did, before
// rotate synced the new header and the check asked for walgen itself).
func TestLostActiveSegmentIsNoticed(t *testing.T) {
	for _, how := range []string{"truncate", "delete"} {
		t.Run(how, func(t *testing.T) {
			dir, s := walStore(t)
			if err := s.Commit([]Lease{leaseN(1)}, nil); err != nil {
				t.Fatal(err)
			}
			// Restart: the record is folded, a new generation starts in
			// the other file; the first file keeps generation walgen-1.
			s, _ = reopen(t, s, fixedClock(t0), noCheckpoint, WithoutOpenSnapshot())
			stopCheckpointer(s)
			for i := 2; i < 6; i++ {
				if err := s.Commit([]Lease{leaseN(i)}, nil); err != nil {
					t.Fatal(err)
				}
			}
			img := crashImage(t, dir)
			var p string
			var best uint64
			for q, c := range segments(img) {
				if c.hdrOK && c.hdr.gen >= best {
					p, best = q, c.hdr.gen
				}
			}
			t.Logf("active segment %s gen %d", p, best)
			if how == "truncate" {
				if err := os.Truncate(p, 0); err != nil {
					t.Fatal(err)
				}
			} else if err := os.Remove(p); err != nil {
				t.Fatal(err)
			}
			_, st := openT(t, img, fixedClock(t0.Add(time.Minute)))
			t.Logf("leases=%d Fresh=%v Recovered=%q", len(st.Leases), st.Fresh, st.Recovered)
			if len(st.Leases) != 5 && !st.Fresh {
				t.Errorf("4 acknowledged commits lost, yet the epoch continues (Fresh=false, Recovered=%q)", st.Recovered)
			}
		})
	}
}

// segments yields the path and scan of each log segment file in dir, in
// segment order (a missing file scans as empty).
func segments(dir string) iter.Seq2[string, segScan] {
	return func(yield func(string, segScan) bool) {
		for i := range 2 {
			p := filepath.Join(dir, segName(i))
			b, _ := os.ReadFile(p)
			if !yield(p, scanSegment(b, i)) {
				return
			}
		}
	}
}
