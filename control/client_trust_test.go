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

	"github.com/pcpd/pcpd/internal/asuser"
)

// TestClientTrustsServer (h/lowfix): the CLI (Client) checks who can have
// put the socket at its path before it connects, and who serves it after:
// the directory must be one only root and pcpd's user can change (pcpd's
// user: the owner root gave the directory to, systemd's RuntimeDirectory=
// for the DynamicUser), and the server (SO_PEERCRED) root or that user.
// Here a forged daemon (status PID 4242) listens as uid 65534 where it
// could plant its socket while pcpd was down, and root's Status must
// refuse it with ErrUntrustedServer; root's own socket, and the DynamicUser
// layout served by its user, must be answered.
//
// Fails on main (no checks in the client): the three planted rows are
// answered with the forged status.
func TestClientTrustsServer(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to serve as another user")
	}
	const other = 65534
	mk := func(t *testing.T, dir string, mode os.FileMode, uid int) {
		t.Helper()
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(dir, uid, -1); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, base string) (sock string, after func(t *testing.T))
		uid   int // who listens
		ok    bool
	}{
		{"root's socket in root's directory", func(t *testing.T, b string) (string, func(*testing.T)) {
			mk(t, b+"/run", 0o700, 0)
			return b + "/run/pcpd.sock", nil
		}, 0, true},
		{"directory given to pcpd's user (DynamicUser), served by it", func(t *testing.T, b string) (string, func(*testing.T)) {
			mk(t, b+"/run", 0o700, other)
			return b + "/run/pcpd.sock", nil
		}, other, true},
		{"planted in a world-writable directory", func(t *testing.T, b string) (string, func(*testing.T)) {
			mk(t, b+"/run", 0o777, 0)
			return b + "/run/pcpd.sock", nil
		}, other, false},
		{"planted in its own directory in /tmp (sticky)", func(t *testing.T, b string) (string, func(*testing.T)) {
			mk(t, b+"/tmp", os.ModeSticky|0o777, 0)
			mk(t, b+"/tmp/pcpd", 0o700, other)
			return b + "/tmp/pcpd/pcpd.sock", nil
		}, other, false},
		{"root's directory, socket served by another user", func(t *testing.T, b string) (string, func(*testing.T)) {
			mk(t, b+"/run", 0o777, 0) // writable while it binds, then closed
			return b + "/run/pcpd.sock", func(t *testing.T) {
				if err := os.Chmod(b+"/run", 0o755); err != nil {
					t.Fatal(err)
				}
			}
		}, other, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base := t.TempDir()
			// t.TempDir's directories are 0700: let the other user reach in.
			for _, d := range []string{filepath.Dir(base), base} {
				if err := os.Chmod(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			sock, after := tc.setup(t, base)
			var ln *net.UnixListener
			var lerr error
			if err := asuser.Do(tc.uid, func() {
				ln, lerr = net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
			}); err != nil || lerr != nil {
				t.Fatalf("listen as uid %d: %v, %v", tc.uid, err, lerr)
			}
			if after != nil {
				after(t)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- Serve(ctx, ln, &table{status: Status{PID: 4242}}, zap.NewNop()) }()
			defer func() {
				cancel()
				<-done
			}()
			st, err := (&Client{Path: sock, Timeout: 10 * time.Second}).Status(context.Background())
			if tc.ok {
				if err != nil || st.PID != 4242 {
					t.Fatalf("Status: %+v, %v; want answered", st, err)
				}
				return
			}
			if !errors.Is(err, ErrUntrustedServer) {
				t.Fatalf("Status: %+v, %v; want ErrUntrustedServer (forged daemon as uid %d)", st, err, tc.uid)
			}
			t.Logf("refused: %v", err)
		})
	}
}
