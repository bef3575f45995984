package main

import (
	"context"
	"math"
	"runtime"
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

// gcHeadroom is the least heap growth allowed between collections, over
// the live heap. GOGC 25 alone sizes the goal for the big heap it was set
// for (1 000 000 leases: ≈ 40 MB of growth); with a small table (≈ 19 MB
// live under the bench's 10 000 new MAPs/s) it leaves ≈ 5 MB, a collection
// every ≈ 70 ms, and their STW pauses and assists land in the open-loop
// tail (BENCHMARKS.md items 24 and 26). The floor costs at most this much
// resident memory, and nothing once the heap is big enough that GOGC 25's
// own growth exceeds it (live ≥ 4 × gcHeadroom = 256 MiB).
const gcHeadroom = 64 << 20

// floorPercent is the GC percentage that gives a heap of live bytes a goal
// of at least live + headroom, and never less than base (pcpd's GOGC): the
// runtime's goal is live + (live + roots) × percent/100, so a percentage
// from the live heap alone errs a little towards more headroom.
func floorPercent(live uint64, base int, headroom uint64) int {
	if live == 0 {
		live = 1
	}
	p := (headroom*100 + live - 1) / live // ceil: at least the headroom
	if p > math.MaxInt32 {
		p = math.MaxInt32
	}
	return max(base, int(p))
}

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

// apply sets the soft memory limit and the GC percentage, and hands the
// memory freed since the start back to the system. It runs once the state
// is restored: until then the stored leases (≈ 290 bytes each, as
// store.Open decodes them) sit next to the lease table being built from
// them, above a limit sized for the table alone, and the collector would
// run non-stop through the restore. Without the hand-back the process would
// keep the restore's peak resident until the runtime's background scavenger
// got round to it.
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
	if p.gcPercent != -2 {
		gc = setFloor(p.gcPercent, gcHeadroom)
	}
	log.Info("memory", zap.Int64("limit_bytes", debug.SetMemoryLimit(-1)), zap.String("limit_from", p.source),
		zap.Int("gc_percent", gc))
}

// setFloor sets the GC percentage from the live heap the last collection
// left (floorPercent), and returns it. The soft memory limit is a separate
// bound in the runtime and still caps the goal.
func setFloor(base int, headroom uint64) int {
	p := floorPercent(liveHeap(), base, headroom)
	debug.SetGCPercent(p)
	return p
}

// gcSentinel is an object no one references: its cleanup runs after the
// collection that finds it unreachable. Bigger than the tiny allocator's
// 16 bytes, so it is not batched with other objects and dies each cycle.
type gcSentinel [32]byte

// followGC keeps the heap-headroom floor after every collection until ctx
// ends: a sentinel's cleanup recomputes the percentage from the new live
// heap (one metrics read, a SetGCPercent when it changed: microseconds a
// collection) and arms the next sentinel. Unless the environment's GOGC
// rules (gcPercent -2): then pcpd leaves the collector alone.
func (p memoryPolicy) followGC(ctx context.Context) {
	if p.gcPercent == -2 {
		return
	}
	last := -1
	var arm func()
	arm = func() {
		s := new(gcSentinel)
		runtime.AddCleanup(s, func(struct{}) {
			if ctx.Err() != nil {
				debug.SetGCPercent(p.gcPercent)
				return
			}
			if pct := floorPercent(liveHeap(), p.gcPercent, gcHeadroom); pct != last {
				debug.SetGCPercent(pct)
				last = pct
			}
			arm()
		}, struct{}{})
	}
	arm()
}

// liveHeap reads the heap the last collection marked live.
func liveHeap() uint64 {
	s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// Trimming: memory freed by a transient (a restart's stored leases, the
// sorted copy of every lease `pcpd leases` gets: ≈ 290 MB at 1 000 000)
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
