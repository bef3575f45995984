package main

import (
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestFIFOArgs: every real-time command carries a CPU limit, and the
// command itself is run unchanged behind prlimit and chrt (both exec).
func TestFIFOArgs(t *testing.T) {
	for _, c := range []struct {
		limit time.Duration
		want  string
	}{
		{2 * time.Minute, "prlimit --cpu=120:125 chrt -f 1 pcpd serve"},
		{10 * time.Minute, "prlimit --cpu=600:605 chrt -f 1 pcpd serve"},
		{300 * time.Millisecond, "prlimit --cpu=1:6 chrt -f 1 pcpd serve"},
	} {
		if got := strings.Join(fifoArgs(c.limit, []string{"pcpd", "serve"}), " "); got != c.want {
			t.Errorf("fifoArgs(%s) = %q, want %q", c.limit, got, c.want)
		}
	}
}

// TestFIFOLimitBounds: --fifo needs a limit, and not a long one.
func TestFIFOLimitBounds(t *testing.T) {
	for _, c := range []struct {
		fifo  bool
		limit time.Duration
		bad   bool
	}{
		{true, 0, true},
		{true, 11 * time.Minute, true},
		{true, -time.Minute, true},
		{true, 10 * time.Minute, false},
		{true, 2 * time.Minute, false},
		{false, 11 * time.Minute, false}, // no --fifo: unused
	} {
		o := options{fifo: c.fifo, fifoLimit: c.limit}
		if err := o.checkFIFO(); (err != nil) != c.bad {
			t.Errorf("fifo %v, limit %s: checkFIFO() = %v, want an error: %v", c.fifo, c.limit, err, c.bad)
		}
	}
}

// TestFIFOWatchKills: at the limit the watchdog kills the process, however
// long it would otherwise have lived; stopped in time, it does not.
func TestFIFOWatchKills(t *testing.T) {
	b := &bench{o: options{fifoLimit: 100 * time.Millisecond}}
	for _, stopFirst := range []bool{false, true} {
		cmd := exec.Command("sleep", "30")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		w := b.fifoWatch(cmd.Process.Pid, "sleep")
		if stopFirst {
			w.Stop()
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if stopFirst {
				t.Errorf("stopped watchdog: sleep ended anyway: %v", err)
			} else if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
				t.Errorf("sleep ended with %v, want SIGKILL", err)
			}
		case <-time.After(2 * time.Second):
			if !stopFirst {
				t.Errorf("sleep still running 2 s after a 100 ms limit")
			}
			cmd.Process.Kill()
			<-done
		}
	}
}
