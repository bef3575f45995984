package main

import (
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
