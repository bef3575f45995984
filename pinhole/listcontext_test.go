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
	var ops []pinhole.Op
	for i := range 2000 {
		ops = append(ops, install(benchPinhole(i), time.Hour))
	}
	for i := 0; i < len(ops); i += pinhole.MaxBatch {
		apply(t, b, ops[i:min(i+pinhole.MaxBatch, len(ops))]...)
	}
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
		if es, err := b.List(); err != nil || len(es) != len(ops) {
			t.Fatalf("concurrent %v: List after a cut one: %d entries, error %v; want %d", concurrent, len(es), err, len(ops))
		}
	}
}
