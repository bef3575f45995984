package main

import (
	"bufio"
	"fmt"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestProcStop: stop ends a server that exits on SIGTERM without SIGKILL,
// and one that ignores SIGTERM with SIGKILL once its grace runs out,
// saying so in the log (a cut-short shutdown, e.g. pcpd's backup copy at
// 1 000 000 leases, must not pass unseen). The grace here is short only
// to keep the test quick; nothing is asserted about how long a stop took.
func TestProcStop(t *testing.T) {
	for _, c := range []struct {
		name       string
		script     string
		wantKilled bool
	}{
		{"exits on SIGTERM", "echo ready; exec sleep 30", false},
		// sleep inherits the ignored SIGTERM (signal(7): across exec).
		{"ignores SIGTERM", `trap "" TERM; echo ready; exec sleep 30`, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			cmd := exec.Command("sh", "-c", c.script)
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			// Past the trap: the signal then finds it set.
			if line, err := bufio.NewReader(out).ReadString('\n'); line != "ready\n" {
				t.Fatalf("sh said %q, %v", line, err)
			}
			var logged []string
			p := &proc{cmd: cmd, name: "srv", grace: 300 * time.Millisecond,
				say: func(format string, args ...any) { logged = append(logged, fmt.Sprintf(format, args...)) }}
			p.stop(syscall.SIGTERM)
			if p.killed != c.wantKilled {
				t.Fatalf("killed = %v, want %v (log %q)", p.killed, c.wantKilled, logged)
			}
			if cmd.ProcessState == nil {
				t.Fatal("stop returned before the process was reaped")
			}
			saidKill := len(logged) == 1 && strings.Contains(logged[0], "SIGKILL") && strings.HasPrefix(logged[0], "srv: ")
			if saidKill != c.wantKilled {
				t.Fatalf("log %q: want a SIGKILL line: %v", logged, c.wantKilled)
			}
		})
	}
}
