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
	"syscall"
	"time"
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
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.Path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
			return nil, nil, Reply{}, fmt.Errorf("control: no pcpd answering on %s (is it running? is --socket right?): %w", c.Path, err)
		}
		return nil, nil, Reply{}, fmt.Errorf("control: %w", err)
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
