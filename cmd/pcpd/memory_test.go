package main

import (
	"runtime"
	"runtime/debug"
	"testing"

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
