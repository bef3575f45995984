package store

import (
	"bufio"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// mappingLen reads from /proc/self/maps the length of the mapping that
// contains addr.
func mappingLen(t *testing.T, addr uintptr) int64 {
	t.Helper()
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		t.Skipf("no maps: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 {
			continue
		}
		lo, hi, ok := strings.Cut(fields[0], "-")
		if !ok {
			continue
		}
		a, err1 := strconv.ParseUint(lo, 16, 64)
		b, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 == nil && err2 == nil && uint64(addr) >= a && uint64(addr) < b {
			return int64(b - a)
		}
	}
	t.Fatalf("no mapping at %#x in /proc/self/maps", addr)
	return 0
}

// TestFoldKeepsTheMap: a checkpoint that grows the state file well past
// its old size folds into the same mapping (boltMmap), so bbolt never
// re-maps in the middle of a fold (a re-map copies everything the fold
// touched onto the heap: BENCHMARKS.md item 21); and the file still grows
// only boltGrow past what it holds (bbolt's 16 MiB step would make a small
// state file 16 MiB of zeros, and TestANN03Corruption's truncations would
// then cut nothing).
func TestFoldKeepsTheMap(t *testing.T) {
	const n = 20_000
	s, _ := openT(t, t.TempDir(), WithoutOpenSnapshot(), WithCheckpoint(64<<20, time.Hour))
	if err := s.ResetEpoch(time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := s.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	state := func() (addr uintptr, mapped, used, file int64) {
		t.Helper()
		s.mu.RLock()
		defer s.mu.RUnlock()
		_ = s.db.View(func(tx *bolt.Tx) error {
			addr, used = s.db.Info().Data, tx.Size()
			mapped = mappingLen(t, addr)
			return nil
		})
		fi, err := os.Stat(filepath.Join(s.Dir(), DBName))
		if err != nil {
			t.Fatal(err)
		}
		return addr, mapped, used, fi.Size()
	}
	addr0, mapped0, used0, file0 := state()
	for i := 0; i < n; i += 1000 {
		if err := s.Commit(leasesN(i, i+1000), nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	addr1, mapped1, used1, file1 := state()
	t.Logf("before the fold: map %#x, %d MiB, file %d KiB (%d KiB used); after: map %#x, %d MiB, file %d KiB (%d KiB used)",
		addr0, mapped0>>20, file0>>10, used0>>10, addr1, mapped1>>20, file1>>10, used1>>10)
	if used1 < 8*used0 || used1 < 2<<20 {
		t.Fatalf("the fold grew the state file only %d → %d octets: the test proves nothing", used0, used1)
	}
	if mapped0 < boltMmap || addr1 != addr0 || mapped1 != mapped0 {
		t.Errorf("the state file's map went from %#x (%d octets) to %#x (%d octets), want one map of ≥ %d octets throughout",
			addr0, mapped0, addr1, mapped1, int64(boltMmap))
	}
	for _, c := range []struct {
		when       string
		used, file int64
	}{{"empty", used0, file0}, {"after the fold", used1, file1}} {
		// bbolt grows the file to its high-water mark plus one page,
		// plus the step.
		if limit := c.used + int64(os.Getpagesize()) + boltGrow; c.file > limit {
			t.Errorf("%s: state file %d octets for %d used, want at most %d", c.when, c.file, c.used, limit)
		}
	}
}
