package main

import (
	"os"
	"testing"
)

// A /proc/<pid>/status as Linux 6.x writes it (abridged): VmHWM, the peak,
// comes before VmRSS, and RssAnon etc. share the "Rss" prefix.
const statusSample = `Name:	pcpd
State:	S (sleeping)
Pid:	4242
VmPeak:	 1734560 kB
VmSize:	 1734560 kB
VmHWM:	  612345 kB
VmRSS:	  220000 kB
RssAnon:	  200000 kB
RssFile:	   20000 kB
RssShmem:	       0 kB
Threads:	9
`

func TestStatusFieldMB(t *testing.T) {
	for _, c := range []struct {
		name   string
		status string
		field  string
		want   float64
		ok     bool
	}{
		{"peak", statusSample, "VmHWM", 612345 * 1024 / 1e6, true},
		{"current", statusSample, "VmRSS", 220000 * 1024 / 1e6, true},
		{"not a prefix of another field", statusSample, "Rss", 0, false},
		{"not the virtual peak", statusSample, "VmPea", 0, false},
		{"virtual peak is its own field", statusSample, "VmPeak", 1734560 * 1024 / 1e6, true},
		{"absent (kernel thread)", "Name:\tkthreadd\nState:\tS (sleeping)\n", "VmHWM", 0, false},
		{"empty", "", "VmRSS", 0, false},
		{"not kB", "VmHWM:\t612345 MB\n", "VmHWM", 0, false},
		{"not a number", "VmHWM:\tlots kB\n", "VmHWM", 0, false},
		{"negative", "VmHWM:\t-5 kB\n", "VmHWM", 0, false},
		{"zero", "VmHWM:\t0 kB\n", "VmHWM", 0, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, ok := statusFieldMB(c.status, c.field)
			if got != c.want || ok != c.ok {
				t.Fatalf("statusFieldMB(%s) = %g, %v; want %g, %v", c.field, got, ok, c.want, c.ok)
			}
		})
	}
}

// TestProcStatusMBSelf: this test process's own VmHWM is at least its
// VmRSS (the high-water mark of it) and both are read (non-zero).
func TestProcStatusMBSelf(t *testing.T) {
	pid := os.Getpid()
	rss, hwm := rssMB(pid), peakRSSMB(pid)
	if rss <= 0 || hwm <= 0 {
		t.Fatalf("VmRSS %g MB, VmHWM %g MB: not read", rss, hwm)
	}
	if hwm < rss {
		t.Fatalf("VmHWM %g MB < VmRSS %g MB", hwm, rss)
	}
}
