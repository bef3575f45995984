package main

import (
	"context"
	"math"
	"runtime"
	"runtime/debug"
	"testing"
	"time"

	"github.com/pcpd/pcpd/config"
)

// The environment's GOMEMLIMIT and GOGC win over --memory-limit and pcpd's
// own GC percentage; otherwise the config's limit (auto or given) holds.
func TestChooseMemory(t *testing.T) {
	tests := []struct {
		name  string
		limit int64
		env   map[string]string
		want  memoryPolicy
	}{
		{"config limit, pcpd's GOGC", 320 << 20, nil, memoryPolicy{limit: 320 << 20, gcPercent: gcPercent, source: "memory-limit"}},
		{"no limit", 0, nil, memoryPolicy{limit: 0, gcPercent: gcPercent, source: "memory-limit"}},
		{"GOMEMLIMIT wins", 320 << 20, map[string]string{"GOMEMLIMIT": "1GiB"}, memoryPolicy{limit: -1, gcPercent: gcPercent, source: "GOMEMLIMIT"}},
		{"GOGC wins", 320 << 20, map[string]string{"GOGC": "200"}, memoryPolicy{limit: 320 << 20, gcPercent: -2, source: "memory-limit"}},
		{"both from the environment", 0, map[string]string{"GOGC": "off", "GOMEMLIMIT": "512MiB"}, memoryPolicy{limit: -1, gcPercent: -2, source: "GOMEMLIMIT"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := chooseMemory(&config.Config{MemoryLimit: tc.limit}, func(k string) string { return tc.env[k] })
			if got != tc.want {
				t.Fatalf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// heapFree sees memory freed by a transient as free, and FreeOSMemory (what
// trimMemory calls) returns it: what the trimmer relies on.
func TestHeapFreeSeesTransient(t *testing.T) {
	debug.FreeOSMemory()
	free0, _ := heapFree()
	big := make([][]byte, 64)
	for i := range big {
		big[i] = make([]byte, 1<<20)
	}
	runtime.KeepAlive(big)
	big = nil
	runtime.GC()
	free1, _ := heapFree()
	if free1 < free0+32<<20 {
		t.Fatalf("64 MiB freed: free heap %d → %d bytes, want ≥ 32 MiB more", free0, free1)
	}
	debug.FreeOSMemory()
	if free2, _ := heapFree(); free2 > free0+8<<20 {
		t.Fatalf("after FreeOSMemory %d bytes free, want about %d", free2, free0)
	}
}

// The floor: a small live heap gets a goal of at least live + headroom; a
// big one keeps pcpd's GOGC, which then gives more than the headroom.
func TestFloorPercent(t *testing.T) {
	const mib = 1 << 20
	tests := []struct {
		name     string
		live     uint64
		base     int
		headroom uint64
		want     int
	}{
		{"bench heap: 19 MiB live", 19 * mib, 25, 64 * mib, 337},
		{"exact multiple", 16 * mib, 25, 64 * mib, 400},
		{"at the crossover GOGC's own growth is the headroom", 256 * mib, 25, 64 * mib, 25},
		{"big heap keeps GOGC 25", 200 * 1000 * 1000 * 4, 25, 64 * mib, 25},
		{"headroom off", 19 * mib, 25, 0, 25},
		{"empty heap caps at MaxInt32", 0, 25, 64 * mib, math.MaxInt32},
		{"a higher base wins", 19 * mib, 500, 64 * mib, 500},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := floorPercent(tc.live, tc.base, tc.headroom)
			if got != tc.want {
				t.Fatalf("floorPercent(%d, %d, %d) = %d, want %d", tc.live, tc.base, tc.headroom, got, tc.want)
			}
			if goal := tc.live + tc.live*uint64(got)/100; tc.live > 0 && goal < tc.live+tc.headroom {
				t.Fatalf("goal %d < live %d + headroom %d", goal, tc.live, tc.headroom)
			}
		})
	}
}

// followGC keeps the floor after each collection, and leaves the
// collector alone when the environment's GOGC rules (gcPercent -2).
func TestFollowGC(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	tests := []struct {
		name    string
		policy  memoryPolicy
		set     int // percentage in force before
		wantMin int // after a collection, at least
		wantMax int
	}{
		{"pcpd's GOGC: the floor rules a small heap", memoryPolicy{gcPercent: gcPercent}, 25, 100, math.MaxInt32},
		{"GOGC from the environment: left alone", memoryPolicy{gcPercent: -2}, 77, 77, 77},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			debug.SetGCPercent(tc.set)
			tc.policy.followGC(ctx)
			var got int
			for range 50 {
				runtime.GC()
				time.Sleep(2 * time.Millisecond) // cleanups run on their own goroutine
				got = debug.SetGCPercent(-1)
				debug.SetGCPercent(got)
				if got != tc.set {
					break
				}
			}
			if got < tc.wantMin || got > tc.wantMax {
				t.Errorf("GC percent %d after collections, want %d..%d", got, tc.wantMin, tc.wantMax)
			}
			if want := floorPercent(liveHeap(), gcPercent, gcHeadroom); tc.policy.gcPercent != -2 && got != want {
				t.Errorf("GC percent %d, want floorPercent of the live heap %d", got, want)
			}
			cancel()
			runtime.GC()
			time.Sleep(5 * time.Millisecond)
		})
	}
}
