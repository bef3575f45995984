package control

import (
	"context"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestAcceptOffNetpoller: the control socket is idle nearly always, so
// Serve's Accept waits on the side poller (internal/sidepoll), not parked
// in Go's netpoller, where a permanent waiter makes every idle thread of
// pcpd poll epoll (BENCHMARKS.md items 29, 31); connections are still
// served, one after another, and Serve still ends with its context
// (start's cleanup checks that).
func TestAcceptOffNetpoller(t *testing.T) {
	path := start(t, &table{status: Status{Epoch: 7}})
	for round := range 3 {
		deadline := time.Now().Add(10 * time.Second)
		for !serveWaiting() {
			if time.Now().After(deadline) {
				t.Fatalf("round %d: Serve never waited for a connection", round)
			}
			time.Sleep(time.Millisecond)
		}
		if g := serveInIOWait(); g != "" {
			t.Fatalf("round %d: Serve's Accept waits in Go's netpoller:\n%s", round, g)
		}
		c := &Client{Path: path}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		st, err := c.Status(ctx)
		cancel()
		if err != nil || st.Epoch != 7 {
			t.Fatalf("round %d: status %+v, %v", round, st, err)
		}
	}
}

// serveGoroutine is Serve's own goroutine's stack, or "".
func serveGoroutine() string {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "control.Serve(") {
			return g
		}
	}
	return ""
}

// serveWaiting: Serve is blocked waiting for a connection, by either path.
func serveWaiting() bool {
	g := serveGoroutine()
	head, _, _ := strings.Cut(g, "\n")
	return strings.Contains(head, "IO wait") || strings.Contains(g, "sidepoll.(*Poller).Wait")
}

func serveInIOWait() string {
	g := serveGoroutine()
	if head, _, _ := strings.Cut(g, "\n"); strings.Contains(head, "IO wait") {
		return g
	}
	return ""
}
