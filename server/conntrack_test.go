package server

import (
	"sync"
	"testing"
	"time"
)

// TestConntrackFlushCoalesced (PMP-12, LIFE-05): flushes queued while a
// conntrack walk runs share the next walk, at most one walk is in flight,
// and a batch's replies are released only after a walk that covered its
// filters.
func TestConntrackFlushCoalesced(t *testing.T) {
	release := make(chan struct{})
	started := make(chan struct{}, 10)
	var mu sync.Mutex
	var walks [][]ctFilter
	inFlight, maxInFlight := 0, 0
	c := &ctFlusher{walk: func(fs []ctFilter) {
		mu.Lock()
		walks = append(walks, fs)
		inFlight++
		maxInFlight = max(maxInFlight, inFlight)
		mu.Unlock()
		started <- struct{}{}
		<-release
		mu.Lock()
		inFlight--
		mu.Unlock()
	}}
	var order []int
	var omu sync.Mutex
	done := make(chan int, 10)
	for i := range 10 {
		c.add([]ctFilter{{v4: i%2 == 0}})
		c.after(c.seq(), func() {
			omu.Lock()
			order = append(order, i)
			omu.Unlock()
			done <- i
		})
		if i == 0 {
			<-started
		}
	}
	select {
	case i := <-done:
		t.Fatalf("batch %d released before its walk ended", i)
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	for range 10 {
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("not every batch released")
		}
	}
	mu.Lock()
	defer mu.Unlock()
	// The first batch's walk started alone; the nine queued meanwhile
	// went in one more.
	if len(walks) != 2 || len(walks[0]) != 1 || len(walks[1]) != 9 || maxInFlight != 1 {
		t.Fatalf("walks of %v filters (at most %d in flight), want [1 9] one at a time", lens(walks), maxInFlight)
	}
	if n := len(order); n != 10 || order[0] != 0 {
		t.Fatalf("release order %v", order)
	}
	// Nothing queued: released at once.
	ran := false
	c.after(c.seq(), func() { ran = true })
	if !ran {
		t.Fatal("nothing pending, yet not released at once")
	}
}

func lens(w [][]ctFilter) []int {
	out := make([]int, len(w))
	for i := range w {
		out[i] = len(w[i])
	}
	return out
}
