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
)

// Benchmarks for BENCHMARKS.md "### store". The state files are built once
// per process and removed by TestMain.

var (
	benchMu   sync.Mutex
	benchDirs = map[int]string{}
)

func TestMain(m *testing.M) {
	code := m.Run()
	for _, d := range benchDirs {
		os.RemoveAll(d)
	}
	os.Exit(code)
}

// benchDir returns a closed state directory holding n leases.
func benchDir(b *testing.B, n int) string {
	b.Helper()
	benchMu.Lock()
	defer benchMu.Unlock()
	if d, ok := benchDirs[n]; ok {
		return d
	}
	d, err := os.MkdirTemp("", "pcpd-store-bench-")
	if err != nil {
		b.Fatal(err)
	}
	benchDirs[n] = d
	s, _, err := Open(d, nil, WithoutOpenSnapshot())
	if err != nil {
		b.Fatal(err)
	}
	if err := s.ResetEpoch(t0); err != nil {
		b.Fatal(err)
	}
	const chunk = 50_000
	for i := 0; i < n; i += chunk {
		if err := s.Commit(leasesN(i, min(i+chunk, n)), nil); err != nil {
			b.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		b.Fatal(err)
	}
	return d
}

func BenchmarkOpen(b *testing.B) {
	for _, n := range []int{100_000, 1_000_000} {
		b.Run(fmt.Sprintf("leases=%d", n), func(b *testing.B) {
			dir := benchDir(b, n)
			fi, err := os.Stat(filepath.Join(dir, DBName))
			if err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for b.Loop() {
				s, st, err := Open(dir, nil, WithoutOpenSnapshot())
				if err != nil {
					b.Fatal(err)
				}
				if len(st.Leases) != n || st.Fresh {
					b.Fatalf("%d leases, Fresh = %v", len(st.Leases), st.Fresh)
				}
				s.Close()
			}
			b.StopTimer()
			b.ReportMetric(float64(fi.Size())/(1<<20), "file-MB")
			rss, hwm, heap := openRSS(b, dir)
			b.ReportMetric(rss, "RSS-MB")
			b.ReportMetric(hwm, "peak-RSS-MB")
			b.ReportMetric(heap, "heap-MB")
		})
	}
}

const rssChildEnv = "PCPD_STORE_RSS_CHILD"

// TestRSSHelperProcess opens a state directory in a process of its own and
// reports its memory with the State still referenced: what a daemon holding
// the loaded leases costs.
func TestRSSHelperProcess(t *testing.T) {
	dir := os.Getenv(rssChildEnv)
	if dir == "" {
		t.Skip("helper process for BenchmarkOpen")
	}
	s, st, err := Open(dir, nil, WithoutOpenSnapshot())
	if err != nil {
		t.Fatal(err)
	}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	status, _ := os.ReadFile("/proc/self/status")
	fmt.Printf("RESULT %d %s heap=%d\n", len(st.Leases), strings.Join(strings.Fields(grepStatus(string(status))), " "), ms.HeapAlloc)
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

func openRSS(b *testing.B, dir string) (rss, hwm, heap float64) {
	cmd := exec.Command(os.Args[0], "-test.run=^TestRSSHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), rssChildEnv+"="+dir)
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

// BenchmarkCommit: one Commit of `batch` renewals into a store of 100 000
// leases; each op is one transaction.
func BenchmarkCommit(b *testing.B) {
	for _, batch := range []int{1, 16, 256} {
		b.Run(fmt.Sprintf("batch=%d", batch), func(b *testing.B) {
			src := benchDir(b, 100_000)
			dir := b.TempDir()
			copyFileT(b, filepath.Join(src, DBName), filepath.Join(dir, DBName))
			s, _, err := Open(dir, nil, WithoutOpenSnapshot())
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
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
	src := benchDir(b, 100_000)
	dir := b.TempDir()
	copyFileT(b, filepath.Join(src, DBName), filepath.Join(dir, DBName))
	s, _, err := Open(dir, nil, WithoutOpenSnapshot())
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
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
