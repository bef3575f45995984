package pinhole_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestListContextCutMidDump (h/auditend): a ListContext whose ctx ends
// while it dumps (here before its second set, ListSetHookForTest; the
// read deadline it sets stops a read of a set as well) returns ctx's
// error and no entries, on the kept socket and on a concurrent call's
// own, and a List after it reads every element (the socket left mid-dump
// is not read again). Before, ListContext did not exist: the audit's
// List could not be stopped and Serve's return waited for its rest.
func TestListContextCutMidDump(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "listctx")
	b := newBackend(t, ns, pinhole.Config{})
	const n = 2000
	prefill(t, b, n)
	for _, concurrent := range []bool{false, true} {
		ctx, cancel := context.WithCancel(context.Background())
		var once sync.Once
		pinhole.ListSetHookForTest(func(set int) {
			if set == 1 {
				once.Do(cancel)
			}
		})
		var es []pinhole.Entry
		var err error
		if concurrent {
			// A List in flight holds the kept socket: this one dials
			// its own (held before its first set until ours is cut).
			entered, release := make(chan struct{}), make(chan struct{})
			var held atomic.Bool
			pinhole.ListSetHookForTest(func(set int) {
				if held.CompareAndSwap(false, true) {
					close(entered)
					<-release
				}
				if set == 1 {
					once.Do(cancel)
				}
			})
			done := make(chan error, 1)
			go func() { _, err := b.List(); done <- err }()
			<-entered
			es, err = b.ListContext(ctx)
			close(release)
			if err := <-done; err != nil {
				t.Fatalf("the List in flight: %v", err)
			}
		} else {
			es, err = b.ListContext(ctx)
		}
		pinhole.ListSetHookForTest(nil)
		cancel()
		if !errors.Is(err, context.Canceled) || es != nil {
			t.Fatalf("concurrent %v: ListContext returned %d entries, error %v after its ctx ended mid-dump; want context.Canceled and none", concurrent, len(es), err)
		}
		if es, err := b.List(); err != nil || len(es) != n {
			t.Fatalf("concurrent %v: List after a cut one: %d entries, error %v; want %d", concurrent, len(es), err, n)
		}
	}
}

// TestListContextDeadlineStopsDump (review h/revend): once ListContext's
// ctx has ended and its read deadline is set (ListCutHookForTest), the
// next set's read fails and no set after it is read: the deadline, not
// only the check of ctx after the whole dump, is what ends a dump in
// progress. TestListContextCutMidDump passes without the deadline (its
// ListContext reads every set and then returns ctx's error), so it could
// not tell: without the SetReadDeadline this one fails with 'read sets
// [2 3 ...] after its ctx ended and its deadline was set'.
func TestListContextDeadlineStopsDump(t *testing.T) {
	b, ctx, cancel := oneElementList(t, "listcut")
	cut := make(chan struct{})
	var after []int
	pinhole.ListCutHookForTest(func() { close(cut) })
	pinhole.ListSetHookForTest(func(set int) {
		switch {
		case set == 1:
			cancel()
			<-cut
		case set > 1:
			after = append(after, set)
		}
	})
	t.Cleanup(func() { pinhole.ListSetHookForTest(nil); pinhole.ListCutHookForTest(nil) })
	es, err := b.ListContext(ctx)
	if !errors.Is(err, context.Canceled) || es != nil {
		t.Fatalf("ListContext returned %d entries, error %v; want context.Canceled and none", len(es), err)
	}
	if len(after) > 0 {
		t.Fatalf("ListContext read sets %v after its ctx ended and its deadline was set: the deadline did not stop the dump", after)
	}
	if es, err := b.List(); err != nil || len(es) != 1 {
		t.Fatalf("List after a cut one: %d entries, error %v; want 1", len(es), err)
	}
}

// TestListContextWaitsForCut (h/auditlife): the goroutine that cuts a
// ListContext whose ctx ended (its read deadline, ListCutHookForTest)
// has ended by the time ListContext returns: nothing of the dump outlives
// the call. Here the cut is held in the hook until ListContext returns,
// or a second at most (a bound, not an assertion: with the wait,
// ListContext returns only after it). Before, ListContext returned with
// the cut still running ('ListContext returned while its cut's goroutine
// still ran').
func TestListContextWaitsForCut(t *testing.T) {
	b, ctx, cancel := oneElementList(t, "listwait")
	returned, cutDone := make(chan struct{}), make(chan struct{})
	var outlived atomic.Bool
	pinhole.ListCutHookForTest(func() {
		defer close(cutDone)
		select {
		case <-returned:
			outlived.Store(true)
		case <-time.After(time.Second):
		}
	})
	pinhole.ListSetHookForTest(func(set int) {
		if set == 1 {
			cancel()
		}
	})
	t.Cleanup(func() { pinhole.ListSetHookForTest(nil); pinhole.ListCutHookForTest(nil) })
	es, err := b.ListContext(ctx)
	close(returned)
	<-cutDone
	if !errors.Is(err, context.Canceled) || es != nil {
		t.Fatalf("ListContext returned %d entries, error %v; want context.Canceled and none", len(es), err)
	}
	if outlived.Load() {
		t.Fatal("ListContext returned while its cut's goroutine still ran")
	}
}

// oneElementList is a Backend in a namespace of its own (named name)
// holding one element, and a ctx for a ListContext of it (cancelled at
// the test's end at the latest).
func oneElementList(t *testing.T, name string) (*pinhole.Backend, context.Context, context.CancelFunc) {
	t.Helper()
	netlab.RequireRoot(t)
	b := newBackend(t, netlab.NewNS(t, name), pinhole.Config{})
	apply(t, b, install(benchPinhole(0), time.Hour))
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	return b, ctx, cancel
}
