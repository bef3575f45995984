package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/pcpd/pcpd/internal/fsperm"
	"github.com/pcpd/pcpd/store"
)

// requestTimeout bounds how long a connected client may take to send a
// request line; a stuck client must not pin a goroutine forever.
const requestTimeout = 30 * time.Second

// maxRequest bounds a request line (a revoke names at most a few thousand
// leases by hand).
const maxRequest = 1 << 20

// writeTimeout bounds how long one write of a reply may wait for the client
// to read: a client that stops reading is dropped, and the listing it held
// pinned in the engine (server.ListLeases) is let go, while one that reads
// slowly takes a listing of any length. A blocked write on the Unix socket
// resumes only once the client has drained it to a quarter of its send
// buffer (180-213 KB of the default 208 KiB, net.core.wmem_default), so
// "slowly" is about 7 KB/s at 30 s. A variable so that tests can shorten
// it; Serve reads it once.
var writeTimeout = 30 * time.Second

// maxConns bounds the connections served at once, so a runaway script
// cannot make pcpd open fds and goroutines without end. Clients over it
// wait in the listen backlog (the kernel's, not pcpd's) until one ends,
// rather than being refused: the socket is the operator's (mode 0600), a
// `pcpd status` typed during a burst should be answered late, not fail,
// and every served connection ends by itself (requestTimeout when idle,
// writeTimeout when stalled). A variable for tests; Serve reads it once.
var maxConns = 64

// Accept's backoff after a transient failure (net/http's), and how often
// a run of failures is logged at warn.
const (
	acceptBackoffMin = 5 * time.Millisecond
	acceptBackoffMax = time.Second
	acceptWarnEvery  = 30 * time.Second
)

// Listen creates the control socket at path, mode 0600, creating its
// directory mode 0700 if missing. If a socket file is already there and a
// daemon answers on it, Listen fails with ErrInUse and leaves it alone; if
// nobody answers (the previous daemon was killed), the stale file is removed
// first. Anything else at path is never removed (ErrNotSocket).
//
// The directory must be one no other user can change (fsperm.MkdirAll:
// what is missing of it is created only inside checked directories), or
// Listen fails with ErrUnsafeDir before touching anything in it: whoever
// can rename entries there can put their own socket in place of pcpd's
// (the operator's `pcpd revoke` then talks to them and is told it
// worked), or swap the new socket for a symlink before the chmod below.
func Listen(path string) (*net.UnixListener, error) {
	// ".." taken lexically, as filepath.Dir takes it: the directory
	// checked is the one bound in (review h/revfsperm2: bind took
	// link/.. after the link, in the directory it leads to).
	path = filepath.Clean(path)
	if err := fsperm.MkdirAll(filepath.Dir(path), 0o700, false); err != nil {
		if errors.Is(err, fsperm.ErrUnsafe) {
			return nil, fmt.Errorf("control: socket directory: %w: %w", ErrUnsafeDir, err)
		}
		return nil, fmt.Errorf("control: socket directory: %w", err)
	}
	if err := removeStale(path); err != nil {
		return nil, err
	}
	// The umask makes the socket 0600 from its first instant; the chmod
	// after is belt and braces for filesystems that ignore it. The umask
	// is process-wide: pcpd creates no other files at this moment.
	old := syscall.Umask(0o177)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("control: listen: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("control: chmod socket: %w", err)
	}
	ln.SetUnlinkOnClose(true)
	return ln, nil
}

func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("control: %w", err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("control: %s: %w", path, ErrNotSocket)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("control: %s: %w (is pcpd already running? stop it, or give this one another --socket)", path, ErrInUse)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("control: probe %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("control: remove stale socket: %w", err)
	}
	return nil
}

// Serve answers connections on ln until ctx ends, then closes ln and waits
// for the connections being served.
//
// A failed Accept that may succeed later (out of file descriptors or
// buffers: transientAccept) is logged and retried, acceptBackoffMin
// doubling to acceptBackoffMax apart, as net/http does: pcpd exits when
// Serve returns, and a burst that exhausts its descriptors for a moment
// must not stop the daemon. Serve returns an error only when the listener
// is unusable (closed by someone else).
//
// At most maxConns connections are served at once; further clients wait
// in the listen backlog until one ends (see maxConns). A connection from a
// user other than root and pcpd's own is closed unanswered (peerAllowed).
func Serve(ctx context.Context, ln net.Listener, b Backend, log *zap.Logger) error {
	timeout, slots := writeTimeout, make(chan struct{}, maxConns)
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]*connState{}
	closing := false // once set, a connection accepted late is closed at once
	// closeConns ends every connection: one waiting for a request, or
	// sending a listing (which a stalled client could make last the
	// write timeout), is closed; one answering a revoke or status ends
	// after its reply, which the client is sent: a revoke stops between
	// chunks once ctx has ended, and its reply says it was cut short
	// (before h/opsleft the connection was closed under the request: to
	// the client, a daemon gone away, nothing said of what was revoked).
	closeConns := func() {
		mu.Lock()
		closing = true
		for c, st := range conns {
			if st.busy && st.keep {
				st.closing = true
				c.SetReadDeadline(time.Now())
				continue
			}
			c.Close()
		}
		mu.Unlock()
	}
	// begin marks c answering a request (keep: one to be answered if
	// Serve ends meanwhile); false once closing (c is then to end
	// unanswered). end marks it done; false if it is to end.
	begin := func(c net.Conn, keep bool) bool {
		mu.Lock()
		defer mu.Unlock()
		st := conns[c]
		if closing || st.closing {
			return false
		}
		st.busy, st.keep = true, keep
		return true
	}
	end := func(c net.Conn) bool {
		mu.Lock()
		defer mu.Unlock()
		st := conns[c]
		st.busy = false
		return !closing && !st.closing
	}
	stop := context.AfterFunc(ctx, func() {
		ln.Close()
		closeConns()
	})
	defer stop()
	// ended returns once ctx has ended: the AfterFunc may still be
	// running, so close here too (both idempotent) to return with the
	// socket file gone.
	ended := func() error {
		ln.Close()
		closeConns()
		wg.Wait()
		return nil
	}
	var retry acceptRetry
	for {
		// A slot first, then Accept: a client over the bound stays in
		// the kernel's backlog, costing pcpd neither fd nor goroutine.
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			return ended()
		}
		c, err := ln.Accept()
		if err != nil {
			<-slots
			if ctx.Err() == nil && transientAccept(err) && retry.wait(ctx, err, log) {
				continue
			}
			if ctx.Err() != nil {
				return ended()
			}
			// pcpd exits when Serve returns: end the connections
			// now rather than wait for idle clients.
			closeConns()
			wg.Wait()
			return fmt.Errorf("control: accept: %w", err)
		}
		retry.succeeded(log)
		mu.Lock()
		if closing {
			mu.Unlock()
			c.Close()
			<-slots
			continue // Accept fails next, the listener closed
		}
		conns[c] = &connState{}
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := peerAllowed(c); err != nil {
				log.Warn("refused a control connection", zap.Error(err))
			} else {
				serveConn(ctx, c, b, timeout, log, begin, end)
			}
			mu.Lock()
			delete(conns, c)
			mu.Unlock()
			c.Close()
			<-slots
		}()
	}
}

// transientAccept reports whether Accept failing with err may succeed when
// tried again: the process or the system is out of file descriptors,
// buffers or memory for a moment, or a pending connection went away before
// it was accepted. Anything else (the listener closed) is final.
func transientAccept(err error) bool {
	for _, e := range []syscall.Errno{
		syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM,
		syscall.ECONNABORTED, syscall.ECONNRESET, syscall.EPROTO, syscall.EINTR, syscall.EAGAIN,
	} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// acceptRetry paces Accept after transient failures: one warning when
// failing starts and at most one per acceptWarnEvery while it lasts (a
// warning per try would flood the journal at 200 a second), each try at
// debug, and one line when accepting works again.
type acceptRetry struct {
	delay    time.Duration
	failures int
	since    time.Time // first failure of this run
	warned   time.Time // last warning
}

// wait logs err and sleeps the next backoff; false if ctx ended first.
func (r *acceptRetry) wait(ctx context.Context, err error, log *zap.Logger) bool {
	now := time.Now()
	if r.failures == 0 {
		r.since, r.delay = now, acceptBackoffMin
	} else {
		r.delay = min(2*r.delay, acceptBackoffMax)
	}
	r.failures++
	if r.failures == 1 || now.Sub(r.warned) >= acceptWarnEvery {
		r.warned = now
		log.Warn("cannot accept control connections, retrying (out of file descriptors? see LimitNOFILE)",
			zap.Error(err), zap.Int("failures", r.failures), zap.Duration("for", now.Sub(r.since)))
	} else {
		log.Debug("accept retry", zap.Error(err), zap.Int("failures", r.failures), zap.Duration("backoff", r.delay))
	}
	t := time.NewTimer(r.delay)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// succeeded ends a run of failures.
func (r *acceptRetry) succeeded(log *zap.Logger) {
	if r.failures == 0 {
		return
	}
	log.Info("accepting control connections again", zap.Int("failures", r.failures), zap.Duration("after", time.Since(r.since)))
	*r = acceptRetry{}
}

// progressWriter gives each write its own deadline, so that the deadline
// bounds a stall, not the whole reply: a write is at most the reply
// buffer (64 KiB), which must fit in the socket within timeout (the
// client having read what the socket needs to wake the writer: see
// writeTimeout).
type progressWriter struct {
	c       net.Conn
	timeout time.Duration
}

func (w progressWriter) Write(p []byte) (int, error) {
	w.c.SetWriteDeadline(time.Now().Add(w.timeout))
	return w.c.Write(p)
}

// peerAllowed: only root and pcpd's own user may use the control socket.
// Its mode (0600) is the first gate; this one (the connecting process's
// effective uid, SO_PEERCRED) also holds where the mode is not enough: a
// process with CAP_DAC_OVERRIDE under another uid, a socket someone
// chmodded for a group.
func peerAllowed(c net.Conn) error {
	cred, err := peerCred(c, ErrPeer)
	if err != nil {
		return err
	}
	if cred.Uid != 0 && cred.Uid != uint32(os.Geteuid()) {
		return fmt.Errorf("uid %d (pid %d), neither root nor pcpd's user: %w", cred.Uid, cred.Pid, ErrPeer)
	}
	return nil
}

// connState is a served connection's: busy answering a request, and to
// end once it has (Serve's end).
type connState struct{ busy, keep, closing bool }

// serveConn answers c's requests until it ends or Serve does: begin and
// end bracket each answer (false: end c now).
func serveConn(ctx context.Context, c net.Conn, b Backend, timeout time.Duration, log *zap.Logger, begin func(c net.Conn, keep bool) bool, end func(net.Conn) bool) {
	r := bufio.NewReaderSize(c, 4096)
	w := bufio.NewWriterSize(progressWriter{c, timeout}, 64<<10)
	for {
		c.SetReadDeadline(time.Now().Add(requestTimeout))
		line, err := readLine(r)
		if err != nil {
			return // EOF, timeout or oversized: nothing useful to answer
		}
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		req, perr := parseRequest(line)
		if !begin(c, req.Op != OpLeases) {
			return
		}
		c.SetReadDeadline(time.Time{})
		err = handle(ctx, req, perr, w, b, log)
		if err == nil {
			err = w.Flush()
		}
		if !end(c) {
			return
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			log.Info("dropped a control client that stopped reading its reply", zap.Duration("stalled", timeout))
			return
		}
		if err != nil {
			log.Debug("control: write reply", zap.Error(err))
			return
		}
	}
}

// readLine returns the next line without its newline. A line that fits
// the reader's buffer is returned without copying (valid until the next
// read); longer ones, up to maxRequest, are assembled.
func readLine(r *bufio.Reader) ([]byte, error) {
	line, err := r.ReadSlice('\n')
	if err == nil {
		return line[:len(line)-1], nil
	}
	if !errors.Is(err, bufio.ErrBufferFull) {
		return nil, err
	}
	long := append([]byte(nil), line...)
	for {
		line, err = r.ReadSlice('\n')
		long = append(long, line...)
		if len(long) > maxRequest {
			return nil, fmt.Errorf("control: line too long: %w", ErrProtocol)
		}
		switch {
		case err == nil:
			return long[:len(long)-1], nil
		case !errors.Is(err, bufio.ErrBufferFull):
			return nil, err
		}
	}
}

// parseRequest decodes a request line (no unknown fields).
func parseRequest(line []byte) (Request, error) {
	var req Request
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	err := dec.Decode(&req)
	return req, err
}

// handle answers one request (perr: its line did not parse). ctx is Serve's: a listing in progress
// when it ends is cut short (the connection then ends: the client sees a
// stream short of its count), a revoke stops between chunks and its error
// is the reply.
func handle(ctx context.Context, req Request, perr error, w *bufio.Writer, b Backend, log *zap.Logger) error {
	enc := json.NewEncoder(w)
	fail := func(code, format string, args ...any) error {
		return enc.Encode(Reply{Error: &ReplyError{Code: code, Message: fmt.Sprintf(format, args...)}})
	}
	if perr != nil {
		return fail(CodeBadRequest, "request is not valid: %v", perr)
	}
	switch req.Op {
	case OpLeases:
		var buf []byte
		return b.StreamLeases(func(n int) error {
			return enc.Encode(Reply{OK: true, Count: n})
		}, func(l *store.Lease) error {
			if err := ctx.Err(); err != nil {
				return err
			}
			buf = append(appendLeaseJSON(buf[:0], l), '\n')
			_, err := w.Write(buf)
			return err
		})
	case OpStatus:
		st := b.Status()
		return enc.Encode(Reply{OK: true, Status: &st})
	case OpRevoke:
		n, err := revoke(ctx, req, b, log)
		if err != nil {
			if errors.Is(err, ErrProtocol) {
				return fail(CodeBadRequest, "%v", err)
			}
			return fail(CodeFailed, "%v", err)
		}
		return enc.Encode(Reply{OK: true, Revoked: n})
	}
	return fail(CodeUnknownOp, "unknown op %q (want %s, %s or %s)", req.Op, OpLeases, OpStatus, OpRevoke)
}

// resolveOwner lets the operator name a client as pcpd leases shows it
// ("wg:KEY", "static:NAME") or without the prefix ("KEY", "NAME"),
// asking the backend about each candidate (HasOwner: not a copy of every
// lease, which before h/lowfix held the engine for a pause before the
// revoke began).
func resolveOwner(name string, b Backend) string {
	for _, cand := range []string{name, "static:" + name, "wg:" + name} {
		if b.HasOwner(cand) {
			return cand
		}
	}
	return name
}

func revoke(ctx context.Context, req Request, b Backend, log *zap.Logger) (int, error) {
	set := 0
	for _, on := range []bool{req.All, req.Client != "", len(req.Leases) > 0} {
		if on {
			set++
		}
	}
	if set != 1 {
		return 0, fmt.Errorf("control: revoke needs exactly one of all, client, leases: %w", ErrProtocol)
	}
	switch {
	case req.All:
		n, err := b.Revoke(ctx, Revoke{All: true})
		log.Info("revoked all leases", zap.Int("count", n), zap.Error(err))
		return n, err
	case req.Client != "":
		owner := resolveOwner(req.Client, b)
		n, err := b.Revoke(ctx, Revoke{Owner: owner})
		log.Info("revoked a client's leases", zap.String("client", req.Client), zap.Int("count", n), zap.Error(err))
		return n, err
	}
	// Leases named by what they open, whoever holds them (the owner is
	// part of a lease's identity, the operator need not know it): the
	// engine finds them a step at a time, as for a client's (before
	// h/opsleft, from a copy of every lease made under its lock).
	var ops []Opening
	for _, ref := range req.Leases {
		p, err := ParseProtocol(ref.Protocol)
		if err != nil || !ref.InternalAddress.IsValid() {
			return 0, fmt.Errorf("control: bad lease %s: %w", ref, ErrProtocol)
		}
		ops = append(ops, Opening{Protocol: p, InternalAddr: ref.InternalAddress.Unmap(), InternalPort: ref.InternalPort})
	}
	n, err := b.Revoke(ctx, Revoke{Opens: ops})
	log.Info("revoked leases named", zap.Int("named", len(ops)), zap.Int("count", n), zap.Error(err))
	return n, err
}
