package pinhole_test

import (
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestRouteWatchClose (review4): Close ends the watch's goroutine and the
// watch then reports that it cannot tell (every FollowRoutes asks again),
// and Changes does not block a reader forever without telling.
func TestRouteWatchClose(t *testing.T) {
	ns := netlab.NewNS(t, "watchclose")
	h, err := ns.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	before := watchGoroutines()
	var rs []interface{ Close() error }
	for range 20 {
		r, err := pinhole.NetlinkRoutesAt(h)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := r.Generation(); !ok {
			t.Fatal("a new watch cannot tell")
		}
		rs = append(rs, r)
		defer func() {
			if _, ok := r.Generation(); ok {
				t.Error("a closed watch still tells")
			}
		}()
	}
	if n := watchGoroutines(); n < before+20 {
		t.Fatalf("%d goroutines with 20 watches, %d before", n, before)
	}
	for _, r := range rs {
		r.Close()
	}
	deadline := time.Now().Add(2 * time.Second)
	for watchGoroutines() > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := watchGoroutines(); n > before {
		t.Errorf("%d goroutines 2 s after closing 20 watches, %d before", n, before)
	}
}

// watchGoroutines counts the route watches' goroutines alone: the whole
// count also moved with other tests' goroutines ending meanwhile (CI at
// 883dd3d: '22 goroutines with 20 watches, 3 before', one of the three
// gone by then).
func watchGoroutines() int {
	buf := make([]byte, 1<<16)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return strings.Count(string(buf[:n]), "created by github.com/pcpd/pcpd/pinhole.startWatch")
		}
		buf = make([]byte, 2*len(buf))
	}
}
