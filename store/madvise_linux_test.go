package store

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// mappedRSS reads from /proc/self/smaps how much of the mapping that
// contains addr is resident in this process.
func mappedRSS(t *testing.T, addr uintptr) int64 {
	t.Helper()
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Skipf("no smaps: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	in := false
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		if lo, hi, ok := strings.Cut(fields[0], "-"); ok && !strings.HasSuffix(fields[0], ":") {
			a, err1 := strconv.ParseUint(lo, 16, 64)
			b, err2 := strconv.ParseUint(hi, 16, 64)
			in = err1 == nil && err2 == nil && uint64(addr) >= a && uint64(addr) < b
			continue
		}
		if in && fields[0] == "Rss:" && len(fields) >= 2 {
			kb, err := strconv.ParseInt(fields[1], 10, 64)
			if err != nil {
				t.Fatalf("smaps: %q: %v", line, err)
			}
			return kb << 10
		}
	}
	t.Fatalf("no mapping at %#x in /proc/self/smaps", addr)
	return 0
}

// TestFoldDropsMappedPages: a checkpoint leaves the pages of the state
// file it read through bbolt's mapping out of the process's resident set.
// A fold into a big state file reads nearly every leaf page; before, at
// 1 000 000 leases, the whole file (≈ 200 MB) stayed counted in pcpd's RSS
// (bench/run --scale-only: 397-443 MB, of which file-backed 202-224 MB).
func TestFoldDropsMappedPages(t *testing.T) {
	const n = 40_000
	for _, tc := range []struct {
		name string
		fold func(t *testing.T, s *Store) *Store
	}{
		{"checkpoint", func(t *testing.T, s *Store) *Store {
			if err := s.Checkpoint(); err != nil {
				t.Fatal(err)
			}
			return s
		}},
		{"open replays the log", func(t *testing.T, s *Store) *Store {
			// kill -9: the log is replayed and folded by Open.
			img := crashImage(t, s.Dir())
			s2, _ := openT(t, img, WithoutOpenSnapshot(), WithCheckpoint(64<<20, time.Hour))
			return s2
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := openT(t, t.TempDir(), WithoutOpenSnapshot(), WithCheckpoint(64<<20, time.Hour))
			if err := s.ResetEpoch(time.Now()); err != nil {
				t.Fatal(err)
			}
			for i := 0; i < n; i += 1000 {
				if err := s.Commit(leasesN(i, i+1000), nil); err != nil {
					t.Fatal(err)
				}
			}
			if err := s.Checkpoint(); err != nil { // the file now holds n leases
				t.Fatal(err)
			}
			// Rewrite every lease: the next fold reads every leaf page.
			for i := 0; i < n; i += 1000 {
				ls := leasesN(i, i+1000)
				for j := range ls {
					ls[j].ExternalPort++
				}
				if err := s.Commit(ls, nil); err != nil {
					t.Fatal(err)
				}
			}
			s = tc.fold(t, s)
			s.mu.RLock()
			defer s.mu.RUnlock()
			var size int64
			var rss int64
			_ = s.db.View(func(tx *bolt.Tx) error {
				size = tx.Size()
				rss = mappedRSS(t, s.db.Info().Data)
				return nil
			})
			t.Logf("state file %d KiB, resident in the mapping %d KiB", size>>10, rss>>10)
			if size < 2<<20 {
				t.Fatalf("state file only %d octets: the test proves nothing", size)
			}
			if limit := int64(256 << 10); rss > limit {
				t.Errorf("%s of the state file's mapping resident after the fold, want ≤ %d KiB", fmt.Sprintf("%d KiB", rss>>10), limit>>10)
			}
		})
	}
}
