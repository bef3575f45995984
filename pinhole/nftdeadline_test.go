package pinhole_test

import (
	"errors"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestApplyENOMEMMidBatch (h/nftdeadline, h/nftenomem): a message failing with ENOMEM in
// the middle of a batch makes nfnetlink answer the whole batch with that
// one error and abort it; google/nftables' Flush then waited for ever for
// the other replies, under the Backend's lock (RELIABILITY.md known bug
// 13). The trigger is real: a NEWSET of 0xfffffff0 elements
// (QueueOversizedSet) queued into the Backend's next batch, before a
// harmless message. Apply returns ENOMEM, read as the reply that ends the
// batch, not after flush's read deadline (h/nftdeadline's fix waited it
// out: 30 s per batch under the lock), the connection is replaced, the kernel holds what it held before (the batch
// was aborted, so the caller's "nothing applied" is true), and the same
// batch then goes through. Without the deadline Apply hangs (shown with
// -timeout).
func TestApplyENOMEMMidBatch(t *testing.T) {
	kept := pinhole.Pinhole{Protocol: tcp, InternalAddr: c4, InternalPort: 80, ExternalAddr: pub, ExternalPort: 8080}
	for _, tc := range []struct {
		name string
		n    int // pinholes the batch installs, besides deleting kept
	}{
		{"small batch", 1},
		{"MaxBatch", pinhole.MaxBatch - 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// pcpd waits 30 s; the test need not.
			t.Cleanup(pinhole.SetFlushDeadline(2 * time.Second))
			b := newBackend(t, netlab.NewNS(t, "nftdeadl"), pinhole.Config{})
			apply(t, b, install(kept, time.Minute))
			ops := []pinhole.Op{del(kept)}
			var want []pinhole.Pinhole
			for i := range tc.n {
				p := everyShape[0]
				p.InternalPort, p.ExternalPort = uint16(3000+i), uint16(3000+i)
				ops = append(ops, install(p, time.Minute))
				want = append(want, p)
			}
			slices.SortFunc(want, sortPinholes)

			before := pinhole.ConnOf(b)
			pinhole.QueueOversizedSet(b)
			err := b.Apply(ops) // must return: the test's -timeout catches a hang
			t.Logf("Apply with an ENOMEM message mid-batch: %v", err)
			// The ENOMEM reply ends the batch (h/nftenomem): Apply fails at
			// once, without waiting out the read deadline (with it, 30 s
			// under the Backend's lock per batch in pcpd).
			if err == nil || !errors.Is(err, unix.ENOMEM) || errors.Is(err, os.ErrDeadlineExceeded) {
				t.Errorf("Apply with an ENOMEM message mid-batch: %v; want ENOMEM, the read deadline not waited out", err)
			}
			if pinhole.ConnOf(b) == before {
				t.Errorf("connection not replaced after the timed-out batch")
			}
			// The kernel aborted the batch: nothing of it applied.
			got, _ := listPinholes(t, b)
			if diff := cmp.Diff([]pinhole.Pinhole{kept}, got, cmpAddr, cmpPrefix, cmpOdd); diff != "" {
				t.Errorf("kernel after the aborted batch (-want +got):\n%s", diff)
			}
			if err := b.Healthy(); err != nil {
				t.Errorf("Healthy after the aborted batch: %v", err)
			}

			// The same batch again, on the fresh connection, is applied.
			if err := b.Apply(ops); err != nil {
				t.Fatalf("Apply after the reset: %v", err)
			}
			got, _ = listPinholes(t, b)
			if diff := cmp.Diff(want, got, cmpAddr, cmpPrefix, cmpOdd); diff != "" {
				t.Errorf("kernel after the retried batch (-want +got):\n%s", diff)
			}
		})
	}
}

// TestHealthySentinelENOMEM (review h/revdeadline): Healthy's sentinel
// check is a transaction too (checkSentinels), on Healthy's kept
// connection, and its Flush read without flushDeadline: an ENOMEM message
// in it (memory pressure; here the real oversized NEWSET) made it wait for
// ever, holding healthMu and the server's firewall watch (tamper checks and
// audits) with it. It must return an error with ENOMEM, and the next check
// must pass. Without the fix Healthy hangs (shown with -timeout).
func TestHealthySentinelENOMEM(t *testing.T) {
	t.Cleanup(pinhole.SetFlushDeadline(2 * time.Second))
	b := newBackend(t, netlab.NewNS(t, "revdeadl"), pinhole.Config{})
	p := pinhole.Pinhole{Protocol: tcp, InternalAddr: c4, InternalPort: 80, ExternalAddr: pub, ExternalPort: 8080}
	apply(t, b, install(p, time.Minute))
	if err := b.Healthy(); err != nil {
		t.Fatalf("Healthy before: %v", err)
	}
	t.Cleanup(pinhole.QueueOversizedSentinelSet(b))
	err := b.Healthy() // must return: the test's -timeout catches a hang
	t.Logf("Healthy with an ENOMEM message in the sentinel check: %v", err)
	if err == nil || !errors.Is(err, unix.ENOMEM) {
		t.Errorf("Healthy with an ENOMEM sentinel check: %v; want an error with ENOMEM", err)
	}
	// The aborted check says nothing of the sentinels (h/nftenomem): not
	// damage, for which the server runs Setup and re-installs every
	// lease's pinholes; and it ends at the ENOMEM, not at the deadline.
	if errors.Is(err, pinhole.ErrUnhealthy) || !errors.Is(err, pinhole.ErrCheckFailed) || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("Healthy with an ENOMEM sentinel check: %v; want ErrCheckFailed, neither ErrUnhealthy nor the read deadline", err)
	}
	if err := b.Healthy(); err != nil {
		t.Errorf("Healthy after: %v", err)
	}
	got, _ := listPinholes(t, b)
	if diff := cmp.Diff([]pinhole.Pinhole{p}, got, cmpAddr, cmpPrefix, cmpOdd); diff != "" {
		t.Errorf("kernel after (-want +got):\n%s", diff)
	}
}
