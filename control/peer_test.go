package control

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/asuser"
)

// dialAs connects to path as uid (the credentials SO_PEERCRED records and
// the kernel checks the socket's mode against).
func dialAs(uid int, path string) (c net.Conn, err error) {
	if e := asuser.Do(uid, func() { c, err = net.DialTimeout("unix", path, 5*time.Second) }); e != nil {
		return nil, e
	}
	return c, err
}

// TestPeerCredentials (review h/revfsperm): only root and pcpd's user are
// served, also where the socket's mode would let another user connect
// (here chmodded 0666, as a filesystem ignoring modes or an operator
// opening it to a group would). On main the other user's `status` was
// answered.
func TestPeerCredentials(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to connect as another user")
	}
	const other = 65534
	base := t.TempDir()
	// t.TempDir's directories are 0700: let the other user reach the socket.
	for _, d := range []string{filepath.Dir(base), base} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	path := filepath.Join(base, "pcpd.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zap.WarnLevel)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, ln, &table{status: Status{PID: 42}}, zap.New(core)) }()
	defer func() {
		cancel()
		<-done
	}()

	status := func(c net.Conn) (string, error) {
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write([]byte(`{"op":"status"}` + "\n")); err != nil {
			return "", err
		}
		buf := make([]byte, 4096)
		n, err := c.Read(buf)
		return string(buf[:n]), err
	}
	// 0600: the kernel refuses the other user's connect.
	if c, err := dialAs(other, path); !errors.Is(err, unix.EACCES) {
		if c != nil {
			c.Close()
		}
		t.Fatalf("connect as uid %d to the 0600 socket: %v, want EACCES", other, err)
	}
	if err := os.Chmod(path, 0o666); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		uid  int
		ok   bool
	}{
		{"root", 0, true},
		{"another user", other, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := dialAs(tc.uid, path)
			if err != nil {
				t.Fatalf("connect: %v", err)
			}
			reply, err := status(c)
			if tc.ok {
				if err != nil || reply == "" {
					t.Fatalf("status as uid %d: %q, %v", tc.uid, reply, err)
				}
				return
			}
			if reply != "" {
				t.Fatalf("uid %d was answered: %q", tc.uid, reply)
			}
			if n := logs.FilterMessage("refused a control connection").Len(); n != 1 {
				t.Errorf("%d refusals logged, want 1", n)
			}
		})
	}
}
