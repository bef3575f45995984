package main

import (
	"testing"
	"time"
)

func TestParseBoxTicks(t *testing.T) {
	for _, c := range []struct {
		name string
		line string
		want boxTicks
	}{
		// user nice system idle iowait irq softirq steal guest guest_nice
		{"all fields", "cpu  8479 1 4757 56601 462 3 926 6 0 0", boxTicks{idle: 56601 + 462, busy: 8479 + 1 + 4757 + 3 + 926, all: 8479 + 1 + 4757 + 56601 + 462 + 3 + 926 + 6}},
		// guest time is already in user: counting it again would make
		// others' CPU out of nothing.
		{"guest counted once", "cpu  100 0 50 1000 0 0 10 0 40 5", boxTicks{idle: 1000, busy: 160, all: 1160}},
		{"steal is nobody's", "cpu  100 0 50 1000 0 0 10 300 0 0", boxTicks{idle: 1000, busy: 160, all: 1460}},
		{"old kernel, 7 fields", "cpu  100 0 50 1000 20 1 9", boxTicks{idle: 1020, busy: 160, all: 1180}},
		{"a per-CPU line is not the machine", "cpu0 100 0 50 1000 0 0 10 0 0 0", boxTicks{}},
		{"empty", "", boxTicks{}},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := parseBoxTicks(c.line); got != c.want {
				t.Fatalf("parseBoxTicks(%q) = %+v, want %+v", c.line, got, c.want)
			}
		})
	}
}

func TestOthersCPU(t *testing.T) {
	t0 := boxTicks{idle: 1000, busy: 5000, all: 6000}
	for _, c := range []struct {
		name      string
		busyTicks uint64 // busy ticks between the readings (10 ms each)
		srv, load time.Duration
		want      time.Duration
	}{
		{"alone: busy is the server's and pcpload's", 300, 1200 * time.Millisecond, 1800 * time.Millisecond, 0},
		{"a compile beside the row", 500, 1200 * time.Millisecond, 1800 * time.Millisecond, 2 * time.Second},
		{"readings a tick apart: never negative", 290, 1200 * time.Millisecond, 1800 * time.Millisecond, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			t1 := t0
			t1.busy += c.busyTicks
			if got := othersCPU(t0, t1, c.srv, c.load); got != c.want {
				t.Fatalf("othersCPU = %s, want %s", got, c.want)
			}
		})
	}
}

func TestRowNote(t *testing.T) {
	for _, c := range []struct {
		name string
		p    loadPhase
		want string
	}{
		{"quiet, nothing lost", loadPhase{Total: loadStats{Sent: 100}, OthersCores: 0.02}, ""},
		{"crowded", loadPhase{Total: loadStats{Sent: 100}, OthersCores: 0.45}, "others 0.45 cores"},
		{"just below a tenth of a core", loadPhase{Total: loadStats{Sent: 100}, OthersCores: 0.099}, ""},
		{"lost and crowded", loadPhase{Total: loadStats{Sent: 100, Timeouts: 2}, OthersCores: 1.2}, "2.00% lost; others 1.20 cores"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := rowNote(&c.p); got != c.want {
				t.Fatalf("rowNote = %q, want %q", got, c.want)
			}
		})
	}
}
