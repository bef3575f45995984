package main

import (
	"strings"
	"testing"
	"time"
)

func TestNextTick(t *testing.T) {
	start := time.Date(2026, 12, 3, 6, 0, 0, 0, time.UTC)
	const every = 30 * time.Second
	for _, c := range []struct {
		name string
		now  time.Duration // after start
		want time.Duration // after start
	}{
		{"at start", 0, 30 * time.Second},
		{"before the first tick", 5 * time.Second, 30 * time.Second},
		{"just before a tick", 29*time.Second + 999*time.Millisecond, 30 * time.Second},
		{"at a tick: the next one", 30 * time.Second, 60 * time.Second},
		{"after a tick", 31 * time.Second, 60 * time.Second},
		{"several ticks on", 95 * time.Second, 120 * time.Second},
		{"clock before start", -time.Second, 30 * time.Second},
	} {
		t.Run(c.name, func(t *testing.T) {
			got := nextTick(start, start.Add(c.now), every)
			if want := start.Add(c.want); !got.Equal(want) {
				t.Fatalf("nextTick(+%s) = +%s, want +%s", c.now, got.Sub(start), c.want)
			}
			if !got.After(start.Add(c.now)) {
				t.Fatalf("nextTick(+%s) = +%s: not after now", c.now, got.Sub(start))
			}
		})
	}
}

// TestScaleRowsOrder: the error rows at 100 000 leases run before any row
// that adds leases, so that they measure 100 000 leases and no fold of
// another row's log runs beside them.
func TestScaleRowsOrder(t *testing.T) {
	writes := false
	errorRows := 0
	for _, r := range scaleRows {
		isErr := strings.HasPrefix(r.mix, "malformed=") || strings.HasPrefix(r.mix, "unauth=")
		if isErr {
			errorRows++
			if writes {
				t.Fatalf("error row %s runs after a row that adds leases", r.key)
			}
			continue
		}
		writes = true
	}
	if errorRows != 2 {
		t.Fatalf("%d error rows at 100 000 leases, want 2 (malformed, unauth)", errorRows)
	}
}

// TestRunsNewForOpen80: the open loop runs at 80 % of the new-MAP closed
// loop's rate in the same run, so asking for open80 runs that closed loop
// too, unless --open-rate gives the rate.
func TestRunsNewForOpen80(t *testing.T) {
	for _, c := range []struct {
		scenarios string // "": all
		openRate  float64
		key       string
		want      bool
	}{
		{"open80", 0, "new", true},
		{"open80", 0, "renew", false},
		{"open80", 20000, "new", false},
		{"new,open80", 20000, "new", true},
		{"renew", 0, "new", false},
		{"", 0, "new", true},
		{"", 0, "malformed", true},
		{"malformed", 0, "malformed", true},
	} {
		o := options{openRate: c.openRate}
		if c.scenarios != "" {
			o.scenarios = map[string]bool{}
			for _, k := range strings.Split(c.scenarios, ",") {
				o.scenarios[k] = true
			}
		}
		if got := o.runs(c.key); got != c.want {
			t.Errorf("--scenarios %q --open-rate %g: runs(%s) = %v, want %v", c.scenarios, c.openRate, c.key, got, c.want)
		}
	}
}
