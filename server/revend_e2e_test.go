package server

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// tailWatch is a deafWatch whose watch, once the Backend's has returned
// (its ctx ended), runs on for a second (a watch goroutine still
// unwinding), and then records its end.
type tailWatch struct {
	*deafWatch
	ended atomic.Bool
}

func (w *tailWatch) Watch(ctx context.Context, fn func(pinhole.WatchEvent)) error {
	return w.WatchJoined(ctx, fn, nil)
}

func (w *tailWatch) WatchJoined(ctx context.Context, fn func(pinhole.WatchEvent), joined func()) error {
	err := w.deafWatch.WatchJoined(ctx, fn, joined)
	time.Sleep(time.Second)
	w.ended.Store(true)
	return err
}

// TestE2EServeWaitsForWatch (review h/revend): Serve returns only once
// its firewall watch's goroutine has (nothing of Serve's runs after it:
// cmd/pcpd closes the Backend next). Before, startWatch's goroutine was
// waited for by nobody: 'Serve returned while its firewall watch was
// still running'.
func TestE2EServeWaitsForWatch(t *testing.T) {
	l := watchLab(t)
	l.stop()
	w := &tailWatch{deafWatch: &deafWatch{Backend: l.fw}}
	l.firewall = w
	l.start()
	if err := netlab.Eventually(watchBound, func() error {
		if w.fn.Load() == nil {
			return errors.New("no watch")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	l.stop()
	if !w.ended.Load() {
		t.Fatal("Serve returned while its firewall watch was still running")
	}
}
