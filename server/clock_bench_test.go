package server

import (
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/store"
)

// BenchmarkRebaseShift: what rebase holds s.mu for at a wall-clock step,
// at 1 000 000 leases: the table's shift (expiries, creations, the expiry
// heap) and the dirty map's, all absorbed renewals dirty (the worst case).
//
//	go test ./server -run '^$' -bench RebaseShift -benchtime 20x
func BenchmarkRebaseShift(b *testing.B) {
	const n = 1_000_000
	tab, gen := benchTable(n)
	b.Run("table", func(b *testing.B) {
		for b.Loop() {
			tab.shift(int64(time.Hour))
		}
		b.ReportMetric(float64(b.Elapsed().Microseconds())/1e3/float64(b.N), "ms/shift")
	})
	b.Run("dirty", func(b *testing.B) {
		dirty := make(map[store.Key]time.Time, n)
		for i := range n {
			l := gen(i)
			dirty[l.Key] = l.Expires
		}
		for b.Loop() {
			for k, at := range dirty {
				dirty[k] = at.Add(time.Hour)
			}
		}
		b.ReportMetric(float64(b.Elapsed().Microseconds())/1e3/float64(b.N), "ms/shift")
	})
}

// BenchmarkRewriteAll: the store rewrite after a step, 1 000 000 leases
// in an on-disk store of as many, through rewriteStep's chunks of
// rewriteChunk, back to back as finishRebase writes them: the whole (what
// finishRebase adds to Serve's return when the step came less than ≈ 2 min
// before the stop) and the longest chunk (s.mu held; back to back the log
// fills and a commit waits for the checkpoint; at the sweep tick's pace,
// 8192 leases a second, see the checkpoints the rewrite causes).
//
//	go test ./server -run '^$' -bench RewriteAll -benchtime 1x
func BenchmarkRewriteAll(b *testing.B) {
	const n = 1_000_000
	tab, gen := benchTable(n)
	st, _, err := store.Open(b.TempDir(), nil)
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	put := make([]store.Lease, 0, 4096)
	for i := range n {
		put = append(put, gen(i))
		if len(put) == cap(put) || i == n-1 {
			if err := st.Commit(put, nil); err != nil {
				b.Fatal(err)
			}
			put = put[:0]
		}
	}
	if err := st.Checkpoint(); err != nil { // a settled store, as after a day of service
		b.Fatal(err)
	}
	s := &Server{tab: tab, st: st, now: func() time.Time { return tNow }, log: zap.NewNop(),
		dirty: map[store.Key]time.Time{}, storeDebt: map[store.Key]struct{}{}, m: newMetrics(func() float64 { return 0 })}
	for b.Loop() {
		var longest time.Duration
		steps := 0
		ck := st.Stats().Checkpoints
		start := time.Now()
		for s.rewriteAt = 1; s.rewriteAt != 0; steps++ {
			t0 := time.Now()
			if !s.rewriteStep(rewriteChunk) {
				b.Fatal("rewrite commit failed")
			}
			longest = max(longest, time.Since(t0))
		}
		b.ReportMetric(time.Since(start).Seconds(), "s/rewrite")
		b.ReportMetric(float64(longest.Microseconds())/1e3, "ms/longest-step")
		b.ReportMetric(float64(steps), "steps")
		b.ReportMetric(float64(st.Stats().Checkpoints-ck), "checkpoints")
	}
}
