package store

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

const (
	killChildEnv  = "PCPD_STORE_KILL_CHILD"
	killCycleEnv  = "PCPD_STORE_KILL_CYCLE"
	killCyclesEnv = "PCPD_STORE_KILL_CYCLES" // more cycles on demand
	killCkptEnv   = "PCPD_STORE_KILL_CKPT"   // checkpoint size in octets: fold often, so kills land mid-fold
)

// TestKillHelperProcess is the child of TestKill9MidCommit: it commits in a
// loop from several goroutines through the Committer, as the engine does,
// and reports on fd 3 what it is about to delete ("D n") and what each
// acknowledged commit held ("P n", "X n") — only after Commit returned nil.
func TestKillHelperProcess(t *testing.T) {
	dir := os.Getenv(killChildEnv)
	if dir == "" {
		t.Skip("helper process for TestKill9MidCommit")
	}
	cycle, _ := strconv.Atoi(os.Getenv(killCycleEnv))
	out := os.NewFile(3, "acks")
	var mu sync.Mutex
	say := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		if _, err := fmt.Fprintf(out, format+"\n", args...); err != nil {
			os.Exit(3)
		}
	}
	var opts []Option
	if n, err := strconv.Atoi(os.Getenv(killCkptEnv)); err == nil {
		opts = append(opts, WithCheckpoint(int64(n), 10*time.Millisecond))
	}
	s, st, err := Open(dir, nil, opts...)
	if err != nil {
		say("E %v", err)
		os.Exit(2)
	}
	if st.Fresh {
		if err := s.ResetEpoch(time.Now()); err != nil {
			say("E %v", err)
			os.Exit(2)
		}
	}
	say("S %d %d", len(st.Leases), st.EpochOrigin.UnixNano())
	c := s.NewCommitter()
	var next atomic.Int64
	for range 4 {
		go func() {
			var mine []int
			for {
				n := cycle*1_000_000 + int(next.Add(1))
				put := []Lease{leaseN(n)}
				var del []Key
				if len(mine) > 2 && n%3 == 0 {
					d := mine[0]
					mine = mine[1:]
					say("D %d", d)
					del = []Key{leaseN(d).Key}
					if err := c.Commit(put, del); err != nil {
						say("E %v", err)
						os.Exit(2)
					}
					say("X %d", d)
				} else if err := c.Commit(put, nil); err != nil {
					say("E %v", err)
					os.Exit(2)
				}
				say("P %d", n)
				mine = append(mine, n)
			}
		}()
	}
	select {} // until SIGKILL
}

// TestKill9MidCommit kills a process with SIGKILL while it commits as fast
// as it can, reopens, and checks that every acknowledged commit is there,
// nothing deleted came back, and the epoch continued (issue 9 "kill -9
// under load"; EPO-04). With the default checkpoint size the kills land
// between log appends (everything since Open is in the log); with 4 KiB
// checkpoints every few milliseconds, they also land in rotations and in
// the folds into bbolt.
func TestKill9MidCommit(t *testing.T) {
	if os.Getenv(killChildEnv) != "" {
		t.Skip("in the helper")
	}
	for _, tt := range []struct {
		name string
		ckpt string
	}{
		{"log only", ""},
		{"checkpoints every 4 KiB", "4096"},
	} {
		t.Run(tt.name, func(t *testing.T) { kill9MidCommit(t, tt.ckpt) })
	}
}

func kill9MidCommit(t *testing.T, ckpt string) {
	cycles := 8
	if v, err := strconv.Atoi(os.Getenv(killCyclesEnv)); err == nil {
		cycles = v
	}
	dir := t.TempDir()
	present := map[int]bool{} // acknowledged put, not (possibly) deleted since
	maybeGone := map[int]bool{}
	deleted := map[int]bool{} // acknowledged delete
	var origin int64
	var total int
	for cycle := 1; cycle <= cycles; cycle++ {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(os.Args[0], "-test.run=^TestKillHelperProcess$", "-test.count=1")
		cmd.Env = append(os.Environ(), killChildEnv+"="+dir, killCycleEnv+"="+strconv.Itoa(cycle), killCkptEnv+"="+ckpt)
		cmd.ExtraFiles = []*os.File{w}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		w.Close()
		lines := make(chan string, 1024)
		go func() {
			sc := bufio.NewScanner(r)
			for sc.Scan() {
				lines <- sc.Text()
			}
			close(lines)
		}()
		kill := time.After(time.Duration(100+rand.IntN(300)) * time.Millisecond)
		acks := 0
	read:
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					break read
				}
				var op string
				var n, o int64
				fmt.Sscan(l, &op, &n, &o)
				switch op {
				case "S":
					if cycle > 1 && (int(n) != len(present) || o != origin) {
						t.Fatalf("cycle %d: child loaded %d leases, epoch origin %d; want %d, %d", cycle, n, o, len(present), origin)
					}
				case "P":
					present[int(n)] = true
					acks++
				case "D":
					if present[int(n)] {
						delete(present, int(n))
						maybeGone[int(n)] = true
					}
				case "X":
					delete(maybeGone, int(n))
					deleted[int(n)] = true
				case "E":
					t.Fatalf("cycle %d: child: %s", cycle, l)
				}
			case <-kill:
				cmd.Process.Signal(syscall.SIGKILL)
				kill = nil
			}
		}
		r.Close()
		err = cmd.Wait()
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Fatalf("cycle %d: child ended with %v, not by SIGKILL", cycle, err)
		}
		total += acks

		s, st, err := Open(dir, testLog(t), WithoutOpenSnapshot())
		if err != nil {
			t.Fatalf("cycle %d: reopen: %v", cycle, err)
		}
		if st.Fresh || st.Recovered != "" {
			t.Fatalf("cycle %d: Fresh = %v, Recovered = %q after kill -9", cycle, st.Fresh, st.Recovered)
		}
		if cycle == 1 {
			origin = st.EpochOrigin.UnixNano()
		} else if st.EpochOrigin.UnixNano() != origin {
			t.Fatalf("cycle %d: epoch origin changed", cycle)
		}
		got := map[int]bool{}
		for _, l := range st.Leases {
			n := leaseNumber(t, l)
			got[n] = true
			if d := cmpLease(l, leaseN(n)); d != "" {
				t.Fatalf("cycle %d: lease %d differs: %s", cycle, n, d)
			}
		}
		for n := range present {
			if !got[n] {
				t.Fatalf("cycle %d: acknowledged lease %d lost", cycle, n)
			}
		}
		for n := range deleted {
			if got[n] {
				t.Fatalf("cycle %d: lease %d came back after an acknowledged delete", cycle, n)
			}
		}
		// What survived is now the truth for the next cycle: in-flight
		// puts that made it are present, in-flight deletes that made it
		// are gone.
		present = got
		maybeGone = map[int]bool{}
		s.Close()
		t.Logf("cycle %d: %d commits acknowledged, %d leases on disk, all acknowledged ones present", cycle, acks, len(got))
	}
	if total < cycles*10 {
		t.Fatalf("only %d commits acknowledged over %d cycles: the child hardly ran", total, cycles)
	}
}

func leaseNumber(t *testing.T, l Lease) int {
	t.Helper()
	b := l.InternalAddr.As16()
	n := int(b[6])<<24 | int(b[7])<<16 | int(b[14])<<8 | int(b[15])
	if !strings.HasPrefix(l.Owner, "peer") {
		t.Fatalf("unexpected lease %+v", l)
	}
	return n
}
