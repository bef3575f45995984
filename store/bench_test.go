package store

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Benchmarks for BENCHMARKS.md "### store". The state files are built once
// per process and removed by TestMain.

var (
	benchMu   sync.Mutex
	benchDirs = map[string]string{}
)

func TestMain(m *testing.M) {
	code := m.Run()
	for _, d := range benchDirs {
		os.RemoveAll(d)
	}
	os.Exit(code)
}

// benchDir returns a closed state directory holding n leases (leaseN).
func benchDir(b *testing.B, n int) string {
	return cachedStateDir(b, fmt.Sprintf("plain/%d", n), n, leasesN)
}

// cachedStateDir returns a closed state directory holding n leases made
// by leases(from, to), built once per process under key (removed by
// TestMain).
func cachedStateDir(b *testing.B, key string, n int, leases func(from, to int) []Lease) string {
	b.Helper()
	benchMu.Lock()
	defer benchMu.Unlock()
	if d, ok := benchDirs[key]; ok {
		return d
	}
	d, err := os.MkdirTemp("", "pcpd-store-bench-")
	if err != nil {
		b.Fatal(err)
	}
	benchDirs[key] = d
	s, _, err := Open(d, nil, WithoutOpenSnapshot())
	if err != nil {
		b.Fatal(err)
	}
	if err := s.ResetEpoch(t0); err != nil {
		b.Fatal(err)
	}
	const chunk = 50_000
	for i := 0; i < n; i += chunk {
		if err := s.Commit(leases(i, min(i+chunk, n)), nil); err != nil {
			b.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		b.Fatal(err)
	}
	return d
}

// BenchmarkOpen: Open of a cleanly closed state (nothing to replay), with
// State.Leases and with WithStream (each lease handed to a callback that
// keeps nothing: what the engine's own table costs comes on top); and
// after a crash that left 100 000 renewals in the log (replay and fold).
func BenchmarkOpen(b *testing.B) {
	for _, n := range []int{100_000, 1_000_000} {
		for _, stream := range []bool{false, true} {
			name := fmt.Sprintf("leases=%d", n)
			if stream {
				name += "/stream"
			}
			b.Run(name, func(b *testing.B) {
				dir := benchDir(b, n)
				benchOpen(b, dir, n, stream)
			})
		}
	}
	// MAP-22 quarantines beside the leases (quarantine.go): Open reads
	// them in the same transaction; compare with leases=1000000.
	b.Run("leases=1000000/quarantines=100000", func(b *testing.B) {
		dir := benchQuarDir(b, 1_000_000, 100_000)
		benchOpen(b, dir, 1_000_000, false)
	})
	b.Run("leases=100000/log=100000", func(b *testing.B) {
		img := benchCrashDir(b)
		b.ResetTimer()
		for b.Loop() {
			b.StopTimer()
			dir := b.TempDir()
			for _, f := range []string{DBName, segName(0), segName(1)} {
				if err := copyFile(filepath.Join(img, f), filepath.Join(dir, f)); err != nil {
					b.Fatal(err)
				}
			}
			b.StartTimer()
			s, st, err := Open(dir, nil, WithoutOpenSnapshot())
			if err != nil {
				b.Fatal(err)
			}
			if len(st.Leases) != 100_000 || st.Fresh {
				b.Fatalf("%d leases, Fresh = %v, %q", len(st.Leases), st.Fresh, st.Recovered)
			}
			s.Close()
		}
	})
}

// benchQuarDir returns a closed state directory holding n leases and q
// quarantines (quarN: distinct ports, TCP then UDP), built once.
func benchQuarDir(b *testing.B, n, q int) string {
	d := cachedStateDir(b, fmt.Sprintf("quar/%d/%d", n, q), n, leasesN)
	benchMu.Lock()
	defer benchMu.Unlock()
	if benchDirs["quar-done/"+d] != "" {
		return d
	}
	s, _, err := Open(d, nil, WithoutOpenSnapshot())
	if err != nil {
		b.Fatal(err)
	}
	const chunk = 50_000
	for i := 0; i < q; i += chunk {
		if err := s.CommitQuar(nil, nil, &QuarChange{Put: quarsN(i, min(i+chunk, q))}); err != nil {
			b.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		b.Fatal(err)
	}
	benchDirs["quar-done/"+d] = d
	return d
}

func benchOpen(b *testing.B, dir string, n int, stream bool) {
	fi, err := os.Stat(filepath.Join(dir, DBName))
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for b.Loop() {
		var opts []Option
		got := 0
		if stream {
			opts = append(opts, WithStream(func(*Lease) error { got++; return nil }))
		}
		s, st, err := Open(dir, nil, append(opts, WithoutOpenSnapshot())...)
		if err != nil {
			b.Fatal(err)
		}
		if !stream {
			got = len(st.Leases)
		}
		if got != n || st.Fresh {
			b.Fatalf("%d leases, Fresh = %v", got, st.Fresh)
		}
		s.Close()
	}
	b.StopTimer()
	b.ReportMetric(float64(fi.Size())/(1<<20), "file-MB")
	rss, hwm, heap := openRSS(b, dir, stream)
	b.ReportMetric(rss, "RSS-MB")
	b.ReportMetric(hwm, "peak-RSS-MB")
	b.ReportMetric(heap, "heap-MB")
}

// benchCrashDir: 100 000 leases in the state file and 100 000 renewals
// (1 000 records of 100) only in the log, as a kill -9 leaves them.
func benchCrashDir(b *testing.B) string {
	src := benchDir(b, 100_000)
	d := b.TempDir()
	if err := copyFile(filepath.Join(src, DBName), filepath.Join(d, DBName)); err != nil {
		b.Fatal(err)
	}
	copyLog(b, src, d)
	s, _, err := Open(d, nil, WithoutOpenSnapshot(), WithCheckpoint(1<<30, time.Hour))
	if err != nil {
		b.Fatal(err)
	}
	for r := range 1000 {
		ls := make([]Lease, 100)
		for j := range ls {
			ls[j] = leaseN((r*100 + j) % 100_000)
			ls[j].Expires = ls[j].Expires.Add(time.Hour)
		}
		if err := s.Commit(ls, nil); err != nil {
			b.Fatal(err)
		}
	}
	img := b.TempDir()
	for _, f := range []string{segName(0), segName(1), DBName} {
		if err := copyFile(filepath.Join(d, f), filepath.Join(img, f)); err != nil {
			b.Fatal(err)
		}
	}
	s.Close()
	return img
}

const (
	rssChildEnv  = "PCPD_STORE_RSS_CHILD"
	rssStreamEnv = "PCPD_STORE_RSS_STREAM"
)

// TestRSSHelperProcess opens a state directory in a process of its own and
// reports its memory with the State still referenced: what a daemon holding
// the loaded leases costs.
func TestRSSHelperProcess(t *testing.T) {
	dir := os.Getenv(rssChildEnv)
	if dir == "" {
		t.Skip("helper process for BenchmarkOpen")
	}
	var opts []Option
	n := 0
	if os.Getenv(rssStreamEnv) != "" {
		opts = append(opts, WithStream(func(*Lease) error { n++; return nil }))
	}
	s, st, err := Open(dir, nil, append(opts, WithoutOpenSnapshot())...)
	if err != nil {
		t.Fatal(err)
	}
	n += len(st.Leases)
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	status, _ := os.ReadFile("/proc/self/status")
	fmt.Printf("RESULT %d %s heap=%d\n", n, strings.Join(strings.Fields(grepStatus(string(status))), " "), ms.HeapAlloc)
	runtime.KeepAlive(st)
	s.Close()
}

func grepStatus(s string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, "VmRSS:") || strings.HasPrefix(l, "VmHWM:") {
			out = append(out, l)
		}
	}
	return strings.Join(out, " ")
}

func openRSS(b *testing.B, dir string, stream bool) (rss, hwm, heap float64) {
	cmd := exec.Command(os.Args[0], "-test.run=^TestRSSHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), rssChildEnv+"="+dir)
	if stream {
		cmd.Env = append(cmd.Env, rssStreamEnv+"=1")
	}
	out, err := cmd.Output()
	if err != nil {
		b.Fatalf("rss helper: %v\n%s", err, out)
	}
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 || f[0] != "RESULT" {
			continue
		}
		// RESULT n VmHWM: X kB VmRSS: Y kB heap=Z
		for i := 0; i+1 < len(f); i++ {
			v, _ := strconv.ParseFloat(f[i+1], 64)
			switch f[i] {
			case "VmHWM:":
				hwm = v / 1024
			case "VmRSS:":
				rss = v / 1024
			}
		}
		h, _ := strconv.ParseFloat(strings.TrimPrefix(f[len(f)-1], "heap="), 64)
		heap = h / (1 << 20)
	}
	return rss, hwm, heap
}

// benchStore opens a copy of the benchmarks' store of 100 000 leases
// (benchDir), closed at the end of b.
func benchStore(b *testing.B) *Store {
	b.Helper()
	src := benchDir(b, 100_000)
	dir := b.TempDir()
	copyFileT(b, filepath.Join(src, DBName), filepath.Join(dir, DBName))
	copyLog(b, src, dir)
	s, _, err := Open(dir, nil, WithoutOpenSnapshot())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	return s
}

// BenchmarkCommit: one Commit of `batch` renewals into a store of 100 000
// leases; each op is one transaction.
func BenchmarkCommit(b *testing.B) {
	for _, batch := range []int{1, 16, 256} {
		b.Run(fmt.Sprintf("batch=%d", batch), func(b *testing.B) {
			s := benchStore(b)
			i := 0
			b.ResetTimer()
			for b.Loop() {
				ls := make([]Lease, batch)
				for j := range ls {
					ls[j] = leaseN((i*7919 + j*104729) % 100_000)
					ls[j].Expires = ls[j].Expires.Add(1)
				}
				i++
				if err := s.Commit(ls, nil); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*batch), "ns/lease")
			reportSyncs(b, s)
		})
	}
}

// reportSyncs reports fdatasyncs per op as the store counts them: one per
// log record, two per checkpoint (bbolt's data, then meta). `strace -f -c
// -e trace=fsync,fdatasync` on the test binary agrees (BENCHMARKS.md).
func reportSyncs(b *testing.B, s *Store) {
	st := s.Stats()
	b.ReportMetric(float64(st.Commits+2*st.Checkpoints)/float64(b.N), "syncs/op")
	b.ReportMetric(float64(st.Checkpoints), "checkpoints")
}

// BenchmarkCommitter: 64 goroutines per core (128 here) each committing
// one lease at a time through one Committer, as the engine's request
// handlers would.
func BenchmarkCommitter(b *testing.B) {
	s := benchStore(b)
	c := s.NewCommitter()
	var next sync.Mutex
	n := 0
	b.SetParallelism(64)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			next.Lock()
			n++
			l := leaseN(n % 100_000)
			next.Unlock()
			if err := c.Commit([]Lease{l}, nil); err != nil {
				b.Error(err)
				return
			}
		}
	})
	st := c.Stats()
	b.ReportMetric(float64(st.Requests)/float64(st.Transactions), "callers/tx")
	reportSyncs(b, s)
}

func copyFileT(b *testing.B, from, to string) {
	b.Helper()
	if err := copyFile(from, to); err != nil {
		b.Fatal(err)
	}
}

// openFoldCopy opens a copy of the closed state directory src (none: an
// empty one) in a fresh directory, with no background checkpoint, for a
// benchmark that times one fold.
func openFoldCopy(b *testing.B, src string) *Store {
	b.Helper()
	dir := b.TempDir()
	if src != "" {
		copyFileT(b, filepath.Join(src, DBName), filepath.Join(dir, DBName))
		copyLog(b, src, dir)
	}
	s, _, err := Open(dir, nil, WithoutOpenSnapshot(), WithCheckpoint(1<<30, time.Hour))
	if err != nil {
		b.Fatal(err)
	}
	return s
}

// BenchmarkCheckpointNew: the checkpoint that folds a log of `leases` new
// leases (committed 32 at a time, as the engine's batches do) into a state
// file that already holds `have`: the background work behind a run of new
// MAPs. Only the fold is timed.
func BenchmarkCheckpointNew(b *testing.B) {
	for _, c := range []struct{ have, leases int }{{0, 50_000}, {100_000, 50_000}} {
		b.Run(fmt.Sprintf("have=%d/leases=%d", c.have, c.leases), func(b *testing.B) {
			for b.Loop() {
				b.StopTimer()
				var src string
				if c.have > 0 {
					src = benchDir(b, c.have)
				}
				s := openFoldCopy(b, src)
				for i := c.have; i < c.have+c.leases; i += 32 {
					if err := s.Commit(leasesN(i, min(i+32, c.have+c.leases)), nil); err != nil {
						b.Fatal(err)
					}
				}
				b.StartTimer()
				if err := s.checkpoint(ckAll); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if err := s.Close(); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}
