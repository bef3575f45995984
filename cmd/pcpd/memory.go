package main

import (
	"context"
	"math"
	"runtime/debug"
	"runtime/metrics"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/config"
)

// gcPercent is pcpd's GOGC when the environment sets none. Go's default
// (100) lets the heap grow to twice the live data before a collection, and
// the process's resident memory follows the heap: ≈ 2× the lease table at
// 1 000 000 leases. The table holds no pointers, so a collection costs
// little however large it is (2-8 ms of marking with 1 000 000 leases,
// gctrace), and collecting at 1.25× costs a few such cycles a second at
// full load for ≈ 40 % less memory.
const gcPercent = 25

// memoryPolicy is how the Go runtime's memory is held: what was chosen and
// why, for the log.
type memoryPolicy struct {
	limit     int64  // soft limit in bytes; 0 none; -1 left to GOMEMLIMIT
	gcPercent int    // -2: left to GOGC
	source    string // "GOMEMLIMIT", "memory-limit" or "auto"
}

// chooseMemory decides the runtime's memory settings from the config and
// the environment (getenv: os.Getenv). The environment wins: GOMEMLIMIT
// and GOGC are the runtime's own knobs, and an operator who sets them
// means them.
func chooseMemory(cfg *config.Config, getenv func(string) string) memoryPolicy {
	p := memoryPolicy{limit: cfg.MemoryLimit, gcPercent: gcPercent, source: "memory-limit"}
	if getenv("GOMEMLIMIT") != "" {
		p.limit, p.source = -1, "GOMEMLIMIT"
	}
	if getenv("GOGC") != "" {
		p.gcPercent = -2
	}
	return p
}

// startGC sets the GC percentage before the state is read; apply sets the
// rest once it is restored. The stored leases stream into the lease table
// (store.WithLeasesLater), so what is live through the restore is the
// table itself, and the kernel's reconciliation makes garbage fast (≈ 170
// MB every 0.4 s at 1 000 000 leases): at Go's default (100) the heap
// grew to twice the table (goal 351 MB over 175 MB live), which was the
// restart's peak RSS (≈ 380 MB). A collection there costs little: the
// table holds no pointers.
func (p memoryPolicy) startGC() {
	if p.gcPercent != -2 {
		debug.SetGCPercent(p.gcPercent)
	}
}

// apply sets the soft memory limit and the GC percentage, and hands the
// memory freed since the start back to the system. The limit waits until
// the state is restored: the restore's own buffers (conntrack filters and
// keys of dropped leases, the kernel's listing) come on top of the table
// the limit is sized for, and the collector would run non-stop through it.
// Without the hand-back the process would keep the restore's peak
// resident until the runtime's background scavenger got round to it.
func (p memoryPolicy) apply(log *zap.Logger) {
	switch {
	case p.limit > 0:
		debug.SetMemoryLimit(p.limit)
	case p.limit == 0:
		debug.SetMemoryLimit(math.MaxInt64)
	}
	if p.gcPercent != -2 {
		debug.SetGCPercent(p.gcPercent)
	}
	debug.FreeOSMemory()
	gc := debug.SetGCPercent(-1)
	debug.SetGCPercent(gc)
	log.Info("memory", zap.Int64("limit_bytes", debug.SetMemoryLimit(-1)), zap.String("limit_from", p.source),
		zap.Int("gc_percent", gc))
}

// Trimming: memory freed by a transient (a restart's garbage, the sorted
// copy of every lease `pcpd leases` gets: ≈ 100 MB at 1 000 000)
// stays resident until the runtime's background scavenger returns it, at a
// pace of tens of MB a second, or for ever when the soft limit is far away
// (--max-leases well above the leases held). trimMemory hands it back at
// once when it is worth it.
const (
	trimEvery = 5 * time.Second
	trimMin   = 64 << 20 // free heap worth a forced collection and release
)

// trimMemory checks every trimEvery until ctx ends; when the free heap
// still held from the system exceeds trimMin and a quarter of the heap in
// use, it returns it (debug.FreeOSMemory: one collection, a few ms of
// marking with the lease table holding no pointers).
func trimMemory(ctx context.Context, log *zap.Logger) {
	t := time.NewTicker(trimEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if free, used := heapFree(); free > trimMin && free > used/4 {
			start := time.Now()
			debug.FreeOSMemory()
			log.Debug("returned free memory to the system", zap.Uint64("free_bytes", free),
				zap.Uint64("heap_bytes", used), zap.Duration("took", time.Since(start)))
		}
	}
}

// heapFree reads the heap memory free but still held from the system, and
// the heap memory holding objects.
func heapFree() (free, used uint64) {
	s := []metrics.Sample{{Name: "/memory/classes/heap/free:bytes"}, {Name: "/memory/classes/heap/objects:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64(), s[1].Value.Uint64()
}

// handBackMin is the listing size from which handBackAfter returns memory:
// at 1 000 000 leases a listing's sort keys and garbage are ≈ 100 MB, and
// a collection with the release costs ≈ 0.1 s, small beside the listing.
const handBackMin = 100_000

// handBackAfter returns the memory a listing of n leases used, if that is
// worth a forced collection: the trimmer would, but only within trimEvery.
func handBackAfter(n int) {
	if n >= handBackMin {
		debug.FreeOSMemory()
	}
}
