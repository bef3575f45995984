package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/pcpd/pcpd/store"
)

func TestTransientAccept(t *testing.T) {
	op := func(err error) error {
		return &net.OpError{Op: "accept", Net: "unix", Err: os.NewSyscallError("accept4", err)}
	}
	for _, tt := range []struct {
		name string
		err  error
		want bool
	}{
		{"out of fds (process)", op(syscall.EMFILE), true},
		{"out of fds (system)", op(syscall.ENFILE), true},
		{"out of buffers", op(syscall.ENOBUFS), true},
		{"out of memory", op(syscall.ENOMEM), true},
		{"pending connection aborted", op(syscall.ECONNABORTED), true},
		{"interrupted", op(syscall.EINTR), true},
		{"listener closed", op(net.ErrClosed), false},
		{"not a socket", op(syscall.ENOTSOCK), false},
		{"bad fd", op(syscall.EBADF), false},
		{"invalid (not listening)", op(syscall.EINVAL), false},
	} {
		if got := transientAccept(tt.err); got != tt.want {
			t.Errorf("%s: transientAccept(%v) = %v, want %v", tt.name, tt.err, got, tt.want)
		}
	}
}

// A listener closed under Serve (not by ctx) is final: Serve says so
// instead of retrying forever.
func TestServeListenerClosed(t *testing.T) {
	ln, err := Listen(filepath.Join(t.TempDir(), "pcpd.sock"))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- Serve(context.Background(), ln, &table{}, zap.NewNop()) }()
	time.Sleep(20 * time.Millisecond) // let Serve block in Accept (the check holds either way)
	ln.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Serve after its listener closed: %v, want net.ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve still running 10 s after its listener was closed")
	}
}

const emfileChildEnv = "PCPD_CONTROL_TEST_EMFILE_CHILD"

// Accept failing with EMFILE for real (the process's fd table full) is
// waited out: one warning, and the socket answers once fds are free.
// The scenario lowers RLIMIT_NOFILE, so it runs in a child process: this
// test binary, run again for this test alone.
func TestAcceptRetriesOnEMFILE(t *testing.T) {
	if os.Getenv(emfileChildEnv) == "1" {
		acceptUnderEMFILE(t)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestAcceptRetriesOnEMFILE$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), emfileChildEnv+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	if !bytes.Contains(out, []byte("--- PASS: TestAcceptRetriesOnEMFILE")) {
		t.Fatalf("child did not run the scenario:\n%s", out)
	}
	t.Logf("child:\n%s", out)
}

func acceptUnderEMFILE(t *testing.T) {
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	lim := syscall.Rlimit{Cur: uint64(len(fds) + 16), Max: uint64(len(fds) + 16)}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "pcpd.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zap.DebugLevel)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, ln, &table{status: Status{PID: 42}}, zap.New(core)) }()

	// Fill the fd table, then free one for the client's end: the
	// daemon's accept has none left.
	var hog []*os.File
	for {
		f, err := os.Open(os.DevNull)
		if errors.Is(err, syscall.EMFILE) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		hog = append(hog, f)
	}
	// Something else in the process may take the freed fd first (a
	// fresh-clone CI run saw "dial unix …: socket: too many open files"
	// once): free another and try again, then take back whatever is free
	// so that the daemon's accept still has none.
	var conn net.Conn
	for {
		hog[len(hog)-1].Close()
		hog = hog[:len(hog)-1]
		if conn, err = net.Dial("unix", path); err == nil {
			break
		}
		if !errors.Is(err, syscall.EMFILE) || len(hog) == 0 {
			t.Fatal(err)
		}
	}
	defer conn.Close()
	for {
		f, err := os.Open(os.DevNull)
		if err != nil {
			break
		}
		hog = append(hog, f)
	}

	// Wait for Serve to have tried, failed and retried a few times.
	const retries = 4
	for deadline := time.Now().Add(20 * time.Second); logs.FilterMessage("accept retry").Len() < retries; {
		select {
		case err := <-done:
			t.Fatalf("Serve returned with the fd table full: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %d accept retries in 20 s; logged: %v", retries, logs.All())
		}
		time.Sleep(5 * time.Millisecond)
	}
	for _, f := range hog {
		f.Close()
	}

	// The connection made while fds ran out is answered, and so is a new one.
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write([]byte(`{"op":"status"}` + "\n")); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(conn).ReadBytes('\n')
	var rep Reply
	if err != nil || json.Unmarshal(line, &rep) != nil || !rep.OK || rep.Status == nil || rep.Status.PID != 42 {
		t.Fatalf("status on the connection made without fds: %q, %v", line, err)
	}
	if st, err := (&Client{Path: path, Timeout: 10 * time.Second}).Status(context.Background()); err != nil || st.PID != 42 {
		t.Fatalf("status after fds came back: %+v, %v", st, err)
	}

	warns := logs.FilterLevelExact(zap.WarnLevel).All()
	if len(warns) != 1 || !errors.Is(loggedError(warns[0]), syscall.EMFILE) {
		t.Errorf("want exactly one warning, about EMFILE, for one run of failures; got %v", warns)
	}
	again := logs.FilterMessage("accepting control connections again").All()
	if len(again) != 1 || again[0].ContextMap()["failures"].(int64) < retries+1 {
		t.Errorf("want one 'accepting again' line counting ≥ %d failures; got %v", retries+1, again)
	}
	t.Logf("%d fds, EMFILE: %d failures before accepting again", lim.Cur, again[0].ContextMap()["failures"])
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Serve: %v", err)
	}
}

// loggedError is the error an entry logged with zap.Error.
func loggedError(e observer.LoggedEntry) error {
	for _, f := range e.Context {
		if err, ok := f.Interface.(error); ok && f.Key == "error" {
			return err
		}
	}
	return nil
}

// tracked reports when a listing ends, how, and how long it took: the
// engine's listing stays pinned until StreamLeases returns
// (server.ListLeases).
type tracked struct {
	*streamer
	ended chan error
	took  time.Duration
}

func (b *tracked) StreamLeases(count func(int) error, each func(*store.Lease) error) error {
	start := time.Now()
	err := b.streamer.StreamLeases(count, each)
	b.took = time.Since(start)
	b.ended <- err
	return err
}

// setWriteTimeout shortens writeTimeout for one test; Serve reads it when
// it starts.
func setWriteTimeout(t *testing.T, d time.Duration) {
	old := writeTimeout
	writeTimeout = d
	t.Cleanup(func() { writeTimeout = old })
}

// throttled reads at most chunk bytes per Read (0: any), pause before each.
type throttled struct {
	r     io.Reader
	chunk int
	pause time.Duration
}

func (t *throttled) Read(p []byte) (int, error) {
	time.Sleep(t.pause)
	if t.chunk > 0 {
		p = p[:min(len(p), t.chunk)]
	}
	return t.r.Read(p)
}

// A client that stops reading a listing is dropped once a write has made
// no progress for writeTimeout, and the listing ends; one that keeps
// reading, however much longer than writeTimeout the whole takes, gets
// every lease.
//
// What "progress" takes on a Unix socket: a blocked write is woken only
// once the client has drained the socket down to a quarter of its send
// buffer (unix_writable: 212 992 B by default, net.core.wmem_default),
// not once it has read the 64 KiB being written. Reading 16 KiB every
// 10 ms (this test until 2026-12-05) held each blocked write 123 ms (11-13
// reads, 180-213 KB), 62 % of the 200 ms timeout; a box loaded enough to
// add 6 ms to each of those sleeps dropped the client (9 of 60 runs). So
// the slow reader takes all that is queued each time, 30 ms apart: a
// blocked write waits for one sleep, 30 ms, and only a single stall of
// 170 ms drops it; the listing, 3.6 MB, still lasts well over the
// timeout (≥ 15 sleeps), which the test checks.
func TestStalledReaderDropped(t *testing.T) {
	const (
		n       = 16000 // 3.6 MB of lines: far more than the socket's and both ends' buffers
		timeout = 200 * time.Millisecond
	)
	var ls []store.Lease
	for i := range n {
		a := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 2, 14: byte(i >> 8), 15: byte(i)})
		ls = append(ls, lease(fmt.Sprintf("client%d", i%50), 6, a.String(), uint16(1024+i)))
	}
	tests := []struct {
		name string
		// stallAfter: bytes read before the client stops reading; -1
		// reads everything. Each read takes at most chunk bytes (0: all
		// that is queued, up to the reader's 256 KiB), pause before it.
		stallAfter int64
		chunk      int
		pause      time.Duration
	}{
		{name: "never reads", stallAfter: 0},
		{name: "reads the first 100 KiB, then stops", stallAfter: 100 << 10, chunk: 8 << 10, pause: 10 * time.Millisecond},
		{name: "reads slowly to the end", stallAfter: -1, pause: 30 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			setWriteTimeout(t, timeout)
			b := &tracked{streamer: &streamer{table: &table{leases: ls}}, ended: make(chan error, 1)}
			conn, err := net.Dial("unix", start(t, b))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(30 * time.Second)) // the test's own bound
			if _, err := conn.Write([]byte(`{"op":"leases"}` + "\n")); err != nil {
				t.Fatal(err)
			}
			r := bufio.NewReaderSize(&throttled{r: conn, chunk: tt.chunk, pause: tt.pause}, 256<<10)
			if tt.stallAfter < 0 {
				lines := 0
				for ; ; lines++ {
					line, err := r.ReadSlice('\n')
					if err != nil {
						t.Fatalf("after %d lines: %v", lines, err)
					}
					if lines > 0 && !json.Valid(line) {
						t.Fatalf("line %d is not JSON: %q", lines, line)
					}
					if lines == n {
						break
					}
				}
				if err := <-b.ended; err != nil {
					t.Fatalf("listing to a slow reader: %v", err)
				}
				// Load only lengthens it: a listing this short could not
				// tell a deadline per write from one on the whole reply.
				t.Logf("listing of %d leases to a slow reader took %v", n, b.took)
				if b.took < 2*timeout {
					t.Fatalf("the listing took %v, under 2 × the write timeout %v: the test proves nothing (a larger socket buffer than wmem_default 212 992?)", b.took, timeout)
				}
				return
			}
			var got bytes.Buffer
			if _, err := io.CopyN(&got, r, tt.stallAfter); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-b.ended:
				if !errors.Is(err, os.ErrDeadlineExceeded) {
					t.Fatalf("listing ended with %v, want a write deadline", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("still listing to a client that stopped reading 10 s ago (write timeout %v)", timeout)
			}
			// What was sent before the drop, then EOF: short of the count.
			if _, err := got.ReadFrom(r); err != nil {
				t.Fatalf("reading what was sent before the drop: %v", err)
			}
			if lines := bytes.Count(got.Bytes(), []byte("\n")); lines >= 1+n {
				t.Fatalf("dropped client got all %d lines", lines)
			}
		})
	}
}

// gate is a Backend whose Status waits for release, counting the requests
// inside it at once.
type gate struct {
	table
	release chan struct{}
	entered chan struct{}
	mu      sync.Mutex
	in      int
	peak    int
}

func (g *gate) Status() Status {
	g.mu.Lock()
	g.in++
	g.peak = max(g.peak, g.in)
	g.mu.Unlock()
	g.entered <- struct{}{}
	<-g.release
	g.mu.Lock()
	g.in--
	g.mu.Unlock()
	return Status{PID: 7}
}

func openFDs(t *testing.T) int {
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(fds)
}

// At most maxConns connections are served at once; the others wait and
// are served when a slot frees. When ctx ends, Serve returns and leaves no
// goroutine and no fd behind, with connections in service and waiting.
func TestConnectionBound(t *testing.T) {
	for _, tt := range []struct{ limit, clients int }{{1, 3}, {4, 10}} {
		t.Run(fmt.Sprintf("%d of %d", tt.limit, tt.clients), func(t *testing.T) {
			old := maxConns
			maxConns = tt.limit
			defer func() { maxConns = old }()
			path := filepath.Join(t.TempDir(), "pcpd.sock")
			ln, err := Listen(path)
			if err != nil {
				t.Fatal(err)
			}
			fdsBefore, goroutinesBefore := openFDs(t), runtime.NumGoroutine()
			g := &gate{release: make(chan struct{}), entered: make(chan struct{}, tt.clients)}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := make(chan error, 1)
			go func() { done <- Serve(ctx, ln, g, zap.NewNop()) }()

			results := make(chan error, tt.clients)
			for range tt.clients {
				go func() {
					st, err := (&Client{Path: path, Timeout: 20 * time.Second}).Status(context.Background())
					if err == nil && st.PID != 7 {
						err = fmt.Errorf("status %+v", st)
					}
					results <- err
				}()
			}
			for i := range tt.limit {
				select {
				case <-g.entered:
				case <-time.After(10 * time.Second):
					t.Fatalf("%d of %d requests served after 10 s", i, tt.limit)
				}
			}
			// Over the bound, nobody more comes in while the first are held.
			select {
			case <-g.entered:
				t.Fatalf("a request beyond the bound of %d was served at once", tt.limit)
			case <-time.After(200 * time.Millisecond):
			}
			close(g.release)
			for range tt.clients {
				if err := <-results; err != nil {
					t.Errorf("a client over the bound: %v", err)
				}
			}
			if g.peak != tt.limit {
				t.Errorf("%d requests served at once, want %d", g.peak, tt.limit)
			}

			// Idle connections hold their slots: of clients that each ask
			// once and stay, limit are answered.
			var conns []net.Conn
			answered := make(chan struct{}, tt.clients)
			for range tt.clients {
				c, err := net.Dial("unix", path)
				if err != nil {
					t.Fatal(err)
				}
				conns = append(conns, c)
				c.Write([]byte(`{"op":"status"}` + "\n"))
				go func() {
					if _, err := bufio.NewReader(c).ReadBytes('\n'); err == nil {
						answered <- struct{}{}
					}
				}()
			}
			for range tt.limit {
				<-answered
			}
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("Serve: %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("Serve still running 10 s after ctx ended")
			}
			if len(answered) != 0 {
				t.Errorf("%d idle clients over the bound were answered", len(answered))
			}
			for _, c := range conns {
				c.Close()
			}
			// The listener is gone (Serve closes it); nothing else is left.
			var fds, goroutines int
			for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				fds, goroutines = openFDs(t), runtime.NumGoroutine()
				if fds <= fdsBefore-1 && goroutines <= goroutinesBefore || time.Now().After(deadline) {
					break
				}
			}
			if fds > fdsBefore-1 || goroutines > goroutinesBefore {
				buf := make([]byte, 1<<20)
				t.Fatalf("after Serve: %d fds (before: %d with the listener), %d goroutines (before: %d)\n%s",
					fds, fdsBefore, goroutines, goroutinesBefore, buf[:runtime.Stack(buf, true)])
			}
		})
	}
}
