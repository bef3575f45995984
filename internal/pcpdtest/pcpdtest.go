// Package pcpdtest runs the real pcpd daemon for tests: it builds
// ./cmd/pcpd (once per test binary, relinked only when stale: Build),
// starts it in a netlab namespace with the test's command line, waits
// until it answers PCP, keeps its output for failure messages, and stops
// it when the test ends.
//
// The reliability, conformance and interop suites test the daemon an
// operator runs, not an in-process server; this is their one way to run
// it.
package pcpdtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pcp"
)

var build struct {
	once sync.Once
	dir  string // private directory to remove at exit ("" when shared)
	path string
	err  error
}

// Build builds ./cmd/pcpd of the module the test runs in, once per test
// binary, and returns the binary's path. Later calls return the first
// call's result.
//
// The binary is shared by the module's test binaries: it lives in a
// directory of the temporary directory named by the module's path and
// the user (sharedDir), and go build rewrites it only when it is not up
// to date with the sources (its build ID), so the packages of one
// `go test ./...` link pcpd once instead of once each (2.4-5 s a link on
// the 2-core box). A file lock keeps two packages from building at once;
// a rebuilt binary replaces the old one by rename, so a pcpd another
// package is running keeps its own. Where the shared directory cannot be
// trusted (not ours, not 0700), the build goes to a private one.
func Build() (string, error) {
	build.once.Do(func() {
		out, err := exec.Command("go", "env", "GOMOD").Output()
		if err != nil {
			build.err = fmt.Errorf("pcpdtest: go env GOMOD: %w", err)
			return
		}
		gomod := strings.TrimSpace(string(out))
		if gomod == "" || gomod == os.DevNull {
			build.err = errors.New("pcpdtest: not inside the pcpd module")
			return
		}
		dir, unlock, err := sharedDir(gomod)
		if err != nil {
			if build.dir, err = os.MkdirTemp("", "pcpdtest-bin-"); err != nil {
				build.err = fmt.Errorf("pcpdtest: %w", err)
				return
			}
			dir, unlock = build.dir, func() {}
		}
		defer unlock()
		path := filepath.Join(dir, "pcpd")
		cmd := exec.Command("go", "build", "-o", path, "./cmd/pcpd")
		cmd.Dir = filepath.Dir(gomod)
		if out, err := cmd.CombinedOutput(); err != nil {
			build.err = fmt.Errorf("pcpdtest: go build ./cmd/pcpd: %v: %s", err, out)
			return
		}
		build.path = path
	})
	return build.path, build.err
}

// sharedDir returns the module's shared build directory, locked (unlock
// releases it), creating it if need be. It refuses a directory that is a
// symlink, not the user's or open to others: tests run as root, and a
// binary planted there would run as root.
func sharedDir(gomod string) (dir string, unlock func(), err error) {
	h := fnv.New64a()
	h.Write([]byte(gomod))
	dir = filepath.Join(os.TempDir(), fmt.Sprintf("pcpdtest-%d-%x", os.Getuid(), h.Sum64()))
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return "", nil, err
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return "", nil, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !fi.IsDir() || fi.Mode().Perm() != 0o700 || !ok || int(st.Uid) != os.Getuid() {
		return "", nil, fmt.Errorf("pcpdtest: %s: not a private directory of ours", dir)
	}
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return "", nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return "", nil, err
	}
	return dir, func() { f.Close() }, nil
}

// Binary is Build for a test: a build failure fails it.
func Binary(t testing.TB) string {
	t.Helper()
	path, err := Build()
	if err != nil {
		t.Fatal(err)
	}
	return path
}

// Main runs the package's tests and removes the binary Build made in a
// private directory (the shared one stays for the module's next test
// binary). Call it from TestMain: os.Exit(pcpdtest.Main(m)).
func Main(m *testing.M) int {
	code := m.Run()
	if build.dir != "" {
		os.RemoveAll(build.dir)
	}
	return code
}

// Config says how to run one pcpd.
type Config struct {
	NS   *netlab.NS // where pcpd runs
	Args []string   // pcpd's command line after the binary, e.g. "serve", "--interface", ...
	// Ready returns nil once pcpd serves; Start polls it. See Announce.
	Ready func(ctx context.Context) error
	// Timeout bounds Start's wait for Ready; default 15 s.
	Timeout time.Duration
	// LogTail is how many lines of pcpd's output a failed test shows;
	// default 60.
	LogTail int
}

// Daemon is one pcpd, started, stopped and restarted at will, whose
// output across all its runs is kept in Log.
type Daemon struct {
	t   testing.TB
	cfg Config
	bin string
	log *Log

	mu      sync.Mutex
	cmd     *exec.Cmd
	exited  chan struct{}
	exitErr error // exit status once exited closes
}

// New prepares a pcpd (building the binary if needed) without starting
// it. When the test ends pcpd is killed and, if the test failed, the tail
// of its output is logged.
func New(t testing.TB, cfg Config) *Daemon {
	t.Helper()
	if cfg.Timeout == 0 {
		cfg.Timeout = 15 * time.Second
	}
	if cfg.LogTail == 0 {
		cfg.LogTail = 60
	}
	d := &Daemon{t: t, cfg: cfg, bin: Binary(t), log: &Log{}}
	t.Cleanup(func() {
		d.Kill()
		if t.Failed() {
			t.Logf("pcpd log (last %d lines):\n%s", cfg.LogTail, d.log.Tail(cfg.LogTail))
		}
	})
	return d
}

// Start is New followed by MustStart.
func Start(t testing.TB, cfg Config) *Daemon {
	t.Helper()
	d := New(t, cfg)
	d.MustStart()
	return d
}

// Bin is the pcpd binary's path, for its other commands (pcpd leases).
func (d *Daemon) Bin() string { return d.bin }

// Log is pcpd's output across its runs, each run headed by its command
// line and each stop by the signal that ended it.
func (d *Daemon) Log() *Log { return d.log }

// MustStart is Start for the test: an error fails it.
func (d *Daemon) MustStart() {
	d.t.Helper()
	if err := d.Start(); err != nil {
		d.t.Fatal(err)
	}
}

// Start runs pcpd and waits until Ready holds, pcpd exits (an error with
// its exit status) or the timeout passes. The error carries the tail of
// pcpd's output.
func (d *Daemon) Start() error {
	d.mu.Lock()
	if d.cmd != nil {
		d.mu.Unlock()
		return errors.New("pcpdtest: pcpd already running")
	}
	fmt.Fprintf(d.log, "=== %s pcpd %s\n", time.Now().Format("15:04:05.000"), strings.Join(d.cfg.Args, " "))
	cmd, err := d.cfg.NS.Start(func(c *exec.Cmd) { c.Stdout, c.Stderr = d.log, d.log }, append([]string{d.bin}, d.cfg.Args...)...)
	if err != nil {
		d.mu.Unlock()
		return err
	}
	exited := make(chan struct{})
	d.cmd, d.exited = cmd, exited
	d.mu.Unlock()
	go func() {
		err := cmd.Wait()
		d.mu.Lock()
		d.exitErr = err
		d.mu.Unlock()
		close(exited)
	}()
	if d.cfg.Ready == nil {
		return nil
	}
	deadline := time.Now().Add(d.cfg.Timeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		err := d.cfg.Ready(ctx)
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-exited:
			d.mu.Lock()
			exitErr := d.exitErr
			d.mu.Unlock()
			return fmt.Errorf("pcpdtest: pcpd exited before serving (%v); log:\n%s", exitErr, d.log.Tail(30))
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pcpdtest: pcpd not ready after %v (last: %v); log:\n%s", d.cfg.Timeout, err, d.log.Tail(30))
		}
	}
}

// PID is the running pcpd's process id (ip netns exec execs pcpd, so it
// is pcpd's own), or 0.
func (d *Daemon) PID() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.cmd == nil {
		return 0
	}
	return d.cmd.Process.Pid
}

// Running reports whether the pcpd last started is alive.
func (d *Daemon) Running() bool {
	d.mu.Lock()
	ex := d.exited
	d.mu.Unlock()
	if ex == nil {
		return false
	}
	select {
	case <-ex:
		return false
	default:
		return true
	}
}

// Kill ends pcpd with SIGKILL (a crash) and waits until it is gone.
func (d *Daemon) Kill() { d.Signal(syscall.SIGKILL) }

// Stop ends pcpd with SIGTERM (an orderly stop) and waits until it is
// gone; after 10 s it is killed.
func (d *Daemon) Stop() { d.Signal(syscall.SIGTERM) }

// Signal sends sig to pcpd and waits up to 10 s for it to exit, then
// kills its process group. It does nothing when pcpd is not running.
func (d *Daemon) Signal(sig syscall.Signal) {
	d.mu.Lock()
	cmd, ex := d.cmd, d.exited
	d.cmd = nil
	d.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Signal(sig)
	select {
	case <-ex:
	case <-time.After(10 * time.Second):
		// netlab starts pcpd in its own process group: take anything
		// it left behind too.
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-ex
	}
	fmt.Fprintf(d.log, "=== %s pcpd stopped by %v\n", time.Now().Format("15:04:05.000"), sig)
}

// Announce is the usual Ready: one PCP ANNOUNCE from the client address
// from, on a socket opened in ns, to server, answered SUCCESS.
func Announce(ns *netlab.NS, from netip.Addr, server netip.AddrPort) func(context.Context) error {
	return func(ctx context.Context) error {
		var conn *net.UDPConn
		err := ns.Do(func() (err error) {
			conn, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(from, 0)))
			return err
		})
		if err != nil {
			return fmt.Errorf("pcpdtest: client socket: %w", err)
		}
		defer conn.Close()
		c := &pcp.Client{Conn: conn, Server: server, InitialTimeout: 200 * time.Millisecond, MaxAttempts: 1}
		var resp pcp.Response
		if err := c.Do(ctx, pcp.NewAnnounce(from), &resp); err != nil {
			return err
		}
		if resp.Result != pcp.Success {
			return fmt.Errorf("pcpdtest: ANNOUNCE answered %v", resp.Result)
		}
		return nil
	}
}

// Log collects pcpd's output; it is safe for concurrent use.
type Log struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *Log) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// String is everything logged so far.
func (l *Log) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Len is how many bytes were logged so far: an offset for Since.
func (l *Log) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Len()
}

// Since returns what was logged after offset off (see Len).
func (l *Log) Since(off int) string {
	s := l.String()
	if off > len(s) {
		return ""
	}
	return s[off:]
}

// Tail returns the last n lines logged.
func (l *Log) Tail(n int) string {
	lines := strings.Split(strings.TrimRight(l.String(), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
