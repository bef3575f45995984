package control

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
)

// stopping is a Backend whose Revoke ends one lease, then waits for its
// context to end (Serve's, pcpd stopping) and reports being cut short, as
// server.Revoke does between chunks.
type stopping struct {
	table
	entered chan struct{}
}

func (b *stopping) Revoke(ctx context.Context, r Revoke) (int, error) {
	close(b.entered)
	select {
	case <-ctx.Done():
		return 1, fmt.Errorf("revoke cut short (pcpd is stopping): 1 of the 3 lease(s) selected ended, the others kept: %w", ctx.Err())
	case <-time.After(10 * time.Second):
		return 3, errors.New("the revoke's context did not end with Serve's")
	}
}

// TestRevokeCutShortReply (h/opsleft): a revoke in progress when Serve's
// context ends (SIGTERM) gets that context, ended, and the client gets
// the revoke's error, saying it was cut short and how many leases were
// ended; Serve returns once the reply is sent. A listing or an idle
// connection is closed at once, as before.
//
// Fails before (the connection closed under the request): the client
// got "control: read reply: EOF", nothing said of what was revoked.
func TestRevokeCutShortReply(t *testing.T) {
	b := &stopping{entered: make(chan struct{})}
	path := filepath.Join(t.TempDir(), "pcpd.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, ln, b, zap.NewNop()) }()
	c := &Client{Path: path}
	got := make(chan error, 1)
	go func() {
		_, err := c.Revoke(context.Background(), Request{All: true})
		got <- err
	}()
	<-b.entered
	cancel()
	err = <-got
	t.Logf("client: %v", err)
	var re *RemoteError
	if !errors.As(err, &re) || re.Code != CodeFailed || !strings.Contains(re.Message, "cut short") || !strings.Contains(re.Message, "1 of the 3") {
		t.Errorf("client got %v; want the daemon's reply that the revoke was cut short", err)
	}
	if err := <-done; err != nil {
		t.Errorf("Serve: %v", err)
	}
}
