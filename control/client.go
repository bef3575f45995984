package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/fsperm"
)

// Client talks to a daemon's control socket. The zero Timeout means 30 s
// for the whole exchange, which 100 000 leases fit in many times over.
type Client struct {
	Path    string
	Timeout time.Duration
}

// conn dials and sends req; the caller reads the reply.
func (c *Client) call(ctx context.Context, req Request) (net.Conn, *bufio.Reader, Reply, error) {
	timeout := c.Timeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	user, err := socketUser(c.Path)
	if err != nil {
		return nil, nil, Reply{}, err
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.Path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
			return nil, nil, Reply{}, fmt.Errorf("control: no pcpd answering on %s (is it running? is --socket right?): %w", c.Path, err)
		}
		return nil, nil, Reply{}, fmt.Errorf("control: %w", err)
	}
	if err := servedBy(conn, user); err != nil {
		conn.Close()
		return nil, nil, Reply{}, fmt.Errorf("control: %s: %w", c.Path, err)
	}
	deadline, _ := ctx.Deadline()
	conn.SetDeadline(deadline)
	b, err := json.Marshal(req)
	if err != nil {
		conn.Close()
		return nil, nil, Reply{}, fmt.Errorf("control: %w", err)
	}
	if _, err := conn.Write(append(b, '\n')); err != nil {
		conn.Close()
		return nil, nil, Reply{}, fmt.Errorf("control: send: %w", err)
	}
	r := bufio.NewReaderSize(conn, 64<<10)
	line, err := readLine(r)
	if err != nil {
		conn.Close()
		return nil, nil, Reply{}, fmt.Errorf("control: read reply: %v: %w", err, ErrProtocol)
	}
	var rep Reply
	if err := json.Unmarshal(line, &rep); err != nil {
		conn.Close()
		return nil, nil, Reply{}, fmt.Errorf("control: bad reply: %v: %w", err, ErrProtocol)
	}
	if !rep.OK {
		conn.Close()
		if rep.Error == nil {
			return nil, nil, Reply{}, fmt.Errorf("control: failed reply without error: %w", ErrProtocol)
		}
		return nil, nil, Reply{}, &RemoteError{*rep.Error}
	}
	// The deadline covers what the caller still reads; the context ends
	// here, so keep the absolute deadline on the connection.
	return conn, r, rep, nil
}

// Leases calls fn for every live lease, streaming: the daemon's reply is
// never held in memory whole. It returns how many leases there were.
func (c *Client) Leases(ctx context.Context, fn func(Lease) error) (int, error) {
	return c.LeasesJSON(ctx, func(line []byte) error {
		var l Lease
		if err := json.Unmarshal(line, &l); err != nil {
			return fmt.Errorf("control: bad lease: %v: %w", err, ErrProtocol)
		}
		return fn(l)
	})
}

// LeasesJSON is Leases without decoding: fn gets each lease as the JSON
// object the daemon sent (one line, no newline; valid JSON, checked), which
// `pcpd leases --json` prints as it is. The slice is reused after fn returns.
func (c *Client) LeasesJSON(ctx context.Context, fn func(line []byte) error) (int, error) {
	conn, r, rep, err := c.call(ctx, Request{Op: OpLeases})
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	for i := 0; i < rep.Count; i++ {
		line, err := readLine(r)
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return i, fmt.Errorf("control: lease %d of %d: %v: %w", i+1, rep.Count, err, ErrProtocol)
		}
		if !json.Valid(line) {
			return i, fmt.Errorf("control: lease %d of %d is not JSON: %w", i+1, rep.Count, ErrProtocol)
		}
		if err := fn(line); err != nil {
			return i, err
		}
	}
	return rep.Count, nil
}

// Status returns the daemon's status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	conn, _, rep, err := c.call(ctx, Request{Op: OpStatus})
	if err != nil {
		return Status{}, err
	}
	conn.Close()
	if rep.Status == nil {
		return Status{}, fmt.Errorf("control: status reply without status: %w", ErrProtocol)
	}
	return *rep.Status, nil
}

// Revoke ends the leases req selects (Op is set here) and returns how many.
func (c *Client) Revoke(ctx context.Context, req Request) (int, error) {
	req.Op = OpRevoke
	conn, _, rep, err := c.call(ctx, req)
	if err != nil {
		return 0, err
	}
	conn.Close()
	return rep.Revoked, nil
}

// socketUser checks, before the client connects, that nobody but root and
// pcpd's user can have put the socket at path (h/lowfix; the daemon's
// Listen refuses such a directory, but the CLI trusted any path: a socket
// in a directory another user can write, planted while pcpd was down, fed
// root's `pcpd revoke` a forged "revoked 7 lease(s)"). It returns pcpd's
// user. Run by root, that is the owner root gave the socket's directory,
// or a directory above it, to: the first directory from / not owned by
// root (systemd's RuntimeDirectory= for the DynamicUser: /run/pcpd), when
// the root-owned directory it is in is writable by nobody else (a
// directory anyone may create, as one in /tmp, is not given; its owner is
// not trusted and the path is refused). Run by another user, it is that
// user (as the daemon's own check). The socket's directory must then pass
// fsperm with that user: owned by root or them up to /, not group- or
// world-writable (ancestors may be sticky).
func socketUser(path string) (uint32, error) {
	dir := filepath.Dir(filepath.Clean(path))
	user := uint32(os.Geteuid())
	if user == 0 {
		user = givenUser(dir)
	}
	if err := fsperm.DirAs(dir, user, false); err != nil {
		return 0, fmt.Errorf("control: refusing the socket %s: %w: %w", path, ErrUntrustedServer, err)
	}
	return user, nil
}

// givenUser is the owner of the first directory on dir's resolved path
// not owned by root, if the directory above it is root's and writable by
// no one else (so only root could have made it theirs); else 0.
func givenUser(dir string) uint32 {
	real, err := filepath.EvalSymlinks(dir)
	if err != nil || !filepath.IsAbs(real) {
		return 0 // fsperm reports it
	}
	parent := "/"
	for _, c := range append([]string{""}, splitPath(real)...) {
		d := filepath.Join(parent, c)
		var st syscall.Stat_t
		if syscall.Stat(d, &st) != nil {
			return 0
		}
		if st.Uid != 0 {
			var pst syscall.Stat_t
			if syscall.Stat(parent, &pst) != nil || pst.Uid != 0 || pst.Mode&0o022 != 0 {
				return 0
			}
			return st.Uid
		}
		parent = d
	}
	return 0
}

func splitPath(p string) []string {
	var out []string
	for p != "/" && p != "." {
		out = append([]string{filepath.Base(p)}, out...)
		p = filepath.Dir(p)
	}
	return out
}

// servedBy checks that the process serving conn (its listener's
// credentials, SO_PEERCRED) is root or user.
func servedBy(conn net.Conn, user uint32) error {
	cred, err := peerCred(conn, ErrUntrustedServer)
	if err != nil {
		return err
	}
	if cred.Uid != 0 && cred.Uid != user {
		return fmt.Errorf("served by uid %d (pid %d), neither root nor pcpd's user (uid %d): %w", cred.Uid, cred.Pid, user, ErrUntrustedServer)
	}
	return nil
}

// peerCred is the credentials of conn's other end (SO_PEERCRED: the
// connecting process's for the server, the listener's for the client);
// notUnix wraps the error for a connection that is not a unix socket's.
func peerCred(conn net.Conn, notUnix error) (*unix.Ucred, error) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return nil, fmt.Errorf("not a unix socket connection (%T): %w", conn, notUnix)
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	cerr := rc.Control(func(fd uintptr) {
		cred, err = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	})
	if err = errors.Join(cerr, err); err != nil {
		return nil, fmt.Errorf("SO_PEERCRED: %w", err)
	}
	return cred, nil
}
