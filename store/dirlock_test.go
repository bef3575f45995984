package store

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestConcurrentRecoveryLocked (review h/revbk): two pcpds started
// together on a directory whose state file is damaged. Before, both
// recovered before either held a lock (bbolt's lock on leases.db came
// after): both Opens succeeded, on two different leases.db files, each
// writing the same directory; or one moved the backup aside and put an
// empty file over the other's restored one. Now the directory is locked
// first: exactly one recovers, the other fails with ErrLocked, and the
// backup's leases are all there afterwards.
//
// "paused": the first Open to recover stops after moving the damaged file
// aside until the other Open has returned (testHookRecover), which without
// the lock lets the other recover too, every time. "free": no pause.
func TestConcurrentRecoveryLocked(t *testing.T) {
	for _, c := range []struct {
		name  string
		pause bool
		later bool // WithLeasesLater, as pcpd opens it
	}{
		{"paused", true, false},
		{"paused, leases later", true, true},
		{"free", false, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := corruptFixture(t) // backup: leases 0-299
			want := leasesN(0, 300)
			truncate(t, filepath.Join(dir, DBName), 0.5, -1)

			returned := make(chan struct{})
			var once sync.Once
			var calls atomic.Int32
			if c.pause {
				testHookRecover = func() {
					if calls.Add(1) == 1 {
						<-returned
					}
				}
				t.Cleanup(func() { testHookRecover = nil })
			}
			type result struct {
				s   *Store
				st  State
				err error
			}
			res := make([]result, 2)
			var wg sync.WaitGroup
			for i := range res {
				wg.Go(func() {
					opts := []Option{WithLockTimeout(200 * time.Millisecond)}
					if c.later {
						opts = append(opts, WithLeasesLater())
					}
					s, st, err := Open(dir, testLog(t), opts...)
					res[i] = result{s, st, err}
					once.Do(func() { close(returned) })
				})
			}
			wg.Wait()
			var winner *result
			for i := range res {
				r := &res[i]
				if r.err == nil {
					t.Cleanup(func() { r.s.Close() })
					if winner != nil {
						t.Fatalf("both Opens succeeded: Recovered %q and %q", winner.st.Recovered, r.st.Recovered)
					}
					winner = r
					continue
				}
				if !errors.Is(r.err, ErrLocked) || !strings.Contains(r.err.Error(), "another pcpd holds the state directory") {
					t.Fatalf("losing Open: %v, want ErrLocked naming the state directory", r.err)
				}
			}
			if winner == nil {
				t.Fatalf("no Open succeeded: %v; %v", res[0].err, res[1].err)
			}
			if c.pause && calls.Load() != 1 {
				t.Errorf("recover ran %d times, want once", calls.Load())
			}
			if !winner.st.Fresh || !strings.Contains(winner.st.Recovered, "restored 300 leases from backup") {
				t.Fatalf("winner: Fresh %v, Recovered %q", winner.st.Fresh, winner.st.Recovered)
			}
			got := winner.st.Leases
			if c.later {
				got = streamOneAtATime(t, winner.st)
			}
			wantLeases(t, got, want)
			if n := len(asideFiles(t, dir, BackupName)); n != 0 {
				t.Fatalf("backup copy moved aside %d times", n)
			}
			if n := len(asideFiles(t, dir, DBName)); n != 1 {
				t.Fatalf("%d state files moved aside, want the damaged one", n)
			}
			// The state as the next start sees it, and the copy itself.
			_, st := reopen(t, winner.s)
			wantLeases(t, st.Leases, want)
			_, st = openT(t, copyDir(t, dir, BackupName, DBName))
			wantLeases(t, st.Leases, want)
		})
	}
}

// TestReadOnlyDirLocked: a read-only state directory is locked too (its
// lock file, made when it was writable, is opened read-only; without one,
// TestReadOnlyNoLockFile): pcpd starts read-only, a second Open, while the
// directory is read-only and once it is writable again, fails with
// ErrLocked, and the first one writes once it can. Before, a read-only
// Open held no lock (its bbolt handle is closed after reading, or shared),
// so a second Open started beside it and both wrote once it was writable.
func TestReadOnlyDirLocked(t *testing.T) {
	for _, later := range []bool{false, true} {
		t.Run(map[bool]string{false: "leases", true: "leases later"}[later], func(t *testing.T) {
			dir := t.TempDir()
			s, _ := openT(t, dir)
			if err := s.Commit(leasesN(0, 10), nil); err != nil {
				t.Fatal(err)
			}
			s.Close()
			writable := bindReadOnly(t, dir)
			var opts []Option
			if later {
				opts = append(opts, WithLeasesLater())
			}
			s, st := openT(t, dir, opts...)
			if !strings.Contains(st.Recovered, "read-only") {
				t.Fatalf("Recovered = %q, want read-only", st.Recovered)
			}
			second := func(when string) {
				t.Helper()
				s2, _, err := Open(dir, testLog(t), append(opts, WithLockTimeout(100*time.Millisecond))...)
				if err == nil {
					s2.Close()
					t.Fatalf("second Open %s succeeded", when)
				}
				if !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), "another pcpd holds the state directory") {
					t.Fatalf("second Open %s: %v, want ErrLocked", when, err)
				}
			}
			second("on the read-only directory")
			if err := s.Commit([]Lease{leaseN(10)}, nil); !errors.Is(err, ErrUnavailable) {
				t.Fatalf("Commit on read-only dir = %v", err)
			}
			writable()
			second("once writable")
			if err := s.Commit([]Lease{leaseN(10)}, nil); err != nil {
				t.Fatalf("Commit once writable: %v", err)
			}
			second("after the first write")
			_, st = reopen(t, s)
			wantLeases(t, st.Leases, leasesN(0, 11))
		})
	}
}

// TestLockReleasedOnFailedOpen: an Open that fails after taking the
// directory's lock lets it go (the next Open is not locked out).
func TestLockReleasedOnFailedOpen(t *testing.T) {
	dir := t.TempDir()
	s, _ := openT(t, dir, WithoutOpenSnapshot())
	if err := s.Commit(leasesN(0, 5), nil); err != nil {
		t.Fatal(err)
	}
	s.Close()
	stop := errors.New("stop")
	if _, _, err := Open(dir, testLog(t), WithStream(func(*Lease) error { return stop })); !errors.Is(err, stop) {
		t.Fatalf("Open with a failing stream = %v, want its error", err)
	}
	_, st := openT(t, dir, WithLockTimeout(100*time.Millisecond))
	wantLeases(t, st.Leases, leasesN(0, 5))
}

// TestDirLockAcrossProcesses (review h/revlock): the directory's lock is
// the holding process's alone and goes with it.
//   - "kill -9": another process holding the directory keeps Open out
//     (ErrLocked); once it is killed with SIGKILL (no Close), the next
//     Open gets it at once;
//   - "child outlives": a process started while a Store is open (pcpd
//     itself starts none; tests and wrappers do) does not inherit the
//     lock's descriptor: once the Store is closed another process opens
//     the directory while the child still runs. flock is per open file
//     description, so an inherited descriptor (no O_CLOEXEC) would keep
//     the directory locked for as long as the child lives: a restarted
//     pcpd would fail with ErrLocked.
//
// Fails with lockState opening the lock file (then: the directory)
// without O_CLOEXEC (syscall.Open without it): "child outlives" gets
// ErrLocked.
func TestDirLockAcrossProcesses(t *testing.T) {
	if dir := os.Getenv("PCPD_DIRLOCK_CHILD"); dir != "" {
		// The child: hold the directory until killed or stdin closes.
		s, _, err := Open(dir, nil, WithLockTimeout(5*time.Second))
		if err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		fmt.Println("locked")
		io.Copy(io.Discard, os.Stdin)
		s.Close()
		os.Exit(0)
	}
	// holder starts the test binary holding dir; it returns once the
	// child holds it.
	holder := func(t *testing.T, dir string) *exec.Cmd {
		t.Helper()
		cmd := exec.Command(os.Args[0], "-test.run=^TestDirLockAcrossProcesses$")
		cmd.Env = append(os.Environ(), "PCPD_DIRLOCK_CHILD="+dir)
		stdin, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { stdin.Close(); cmd.Process.Kill(); cmd.Wait() })
		line, _ := bufio.NewReader(out).ReadString('\n')
		if line != "locked\n" {
			t.Fatalf("child: %q", line)
		}
		return cmd
	}
	openQuick := func(dir string) error {
		s, _, err := Open(dir, testLog(t), WithLockTimeout(200*time.Millisecond), WithoutOpenSnapshot())
		if err == nil {
			s.Close()
		}
		return err
	}

	t.Run("kill -9", func(t *testing.T) {
		dir := t.TempDir()
		cmd := holder(t, dir)
		if err := openQuick(dir); !errors.Is(err, ErrLocked) {
			t.Fatalf("Open beside the holder: %v, want ErrLocked", err)
		}
		if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		cmd.Wait()
		if err := openQuick(dir); err != nil {
			t.Fatalf("Open after the holder was killed: %v", err)
		}
	})
	t.Run("child outlives", func(t *testing.T) {
		dir := t.TempDir()
		s, _ := openT(t, dir, WithoutOpenSnapshot())
		child := exec.Command("sleep", "60")
		if err := child.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { child.Process.Kill(); child.Wait() })
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		cmd := holder(t, dir) // fails ("error: ... ErrLocked") if the child holds it
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
	})
}
