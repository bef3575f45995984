package pinhole_test

import (
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestApplyAfterRepliesLeftQueued (h/nftconn): a failure that leaves
// replies of its batch queued on the Backend's lasting connection (as
// pcpd's serve dials it) must not make a later Apply read them as its own.
// The kernel commits a batch in the sender's sendmsg and queues every
// acknowledgement then; past the socket's receive buffer (208 KiB by
// default, about 300 acknowledgements) the rest are dropped and the next
// read fails with ENOBUFS, on which google/nftables' Flush returns at once,
// the queued acknowledgements unread. Without a fresh connection after
// that error, the next batch, which the kernel refuses (a delete of an open
// pinhole and a conflicting install), read stale acknowledgements and
// Apply answered nil: the pinhole stayed open while pcpd thought it gone.
// (The Backend writes over a lasting connection of its own, whatever the
// caller's; since review h/revnftconn with an 8 MiB receive buffer, so
// this test dials it with the kernel's default to overflow it.)
func TestApplyAfterRepliesLeftQueued(t *testing.T) {
	taken := pinhole.Pinhole{Protocol: tcp, InternalAddr: c4, InternalPort: 80, ExternalAddr: pub, ExternalPort: 8080}
	clash := taken
	clash.InternalAddr = c4b // same public port, another client: the kernel refuses
	open := everyShape[1]
	churn := everyShape[0]
	for _, tc := range []struct {
		name   string
		rounds int // of the batch that leaves replies queued
	}{
		// 256 ops alternating Install and Delete of one pinhole: 256
		// phases, 384 messages, more acknowledgements than the receive
		// buffer holds. Without the fix Apply then reported the refused
		// batch as applied.
		{"ENOBUFS", 1},
		// Again before the queue drained: the socket still counts as
		// congested, so the second overflow raises no ENOBUFS, and
		// without the fix Apply waited for ever (under the Backend's
		// lock) for the acknowledgements the kernel dropped.
		{"ENOBUFS twice", 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// pinhole.New writes over a lasting connection of its own, as
			// in pcpd, dialled here with the kernel's default receive
			// buffer (208 KiB), which this batch's acknowledgements
			// overflow (pcpd's 8 MiB holds them: TestApplyOverflowedBatchOutcome).
			restore := pinhole.SetReplyBuffer(212992 / 2)
			b := newBackend(t, netlab.NewNS(t, "nftconn"), pinhole.Config{})
			restore()
			apply(t, b, install(taken, time.Minute), install(open, time.Minute))
			var ops []pinhole.Op
			for i := range pinhole.MaxBatch {
				if i%2 == 0 {
					ops = append(ops, install(churn, time.Minute))
				} else {
					ops = append(ops, del(churn))
				}
			}
			for range tc.rounds {
				err := b.Apply(ops)
				t.Logf("trigger batch of %d ops: %v", len(ops), err)
			}

			// The kernel refuses this batch as a whole: open stays open.
			err := b.Apply([]pinhole.Op{del(open), install(clash, time.Minute)})
			var oe *pinhole.OpError
			if !errors.As(err, &oe) || oe.Index != 1 || !errors.Is(err, pinhole.ErrConflict) {
				t.Errorf("Apply of a refused batch: %v; want op 1 ErrConflict", err)
			}
			got, _ := listPinholes(t, b)
			want := []pinhole.Pinhole{taken, open}
			slices.SortFunc(want, sortPinholes)
			if diff := cmp.Diff(want, got, cmpAddr, cmpPrefix, cmpOdd); diff != "" {
				t.Errorf("kernel after the refused batch (-want +got):\n%s", diff)
			}
			// And a batch the kernel takes is reported so.
			for i, ops := range [][]pinhole.Op{{del(taken), del(open)}, {install(clash, time.Minute)}, {del(clash)}} {
				if err := b.Apply(ops); err != nil {
					t.Errorf("Apply %d (%v): %v; want nil", i, ops[0].Kind, err)
				}
			}
			if got, _ := listPinholes(t, b); len(got) != 0 {
				t.Errorf("kernel after deleting everything: %v", got)
			}
		})
	}
}

// TestApplyOverflowedBatchOutcome (review h/revnftconn): a batch the
// kernel takes must not be reported as failed because its
// acknowledgements overflowed the lasting connection's receive buffer
// (ENOBUFS: nfnetlink queues them after the commit). The server takes a
// failed Apply as one that changed nothing (applyAtomic), so it kept no
// lease for pinholes the kernel held open until the next audit. Each batch
// deletes and installs n/2 distinct pinholes in turn (a phase per op, three
// messages a phase): on main, 200 and 256 ops failed with ENOBUFS while the
// kernel held 100 and 128 pinholes.
func TestApplyOverflowedBatchOutcome(t *testing.T) {
	for _, n := range []int{64, 200, pinhole.MaxBatch} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			// pinhole.New writes over a lasting connection of its own,
			// as in pcpd (review h/revnftconn).
			b := newBackend(t, netlab.NewNS(t, "revnftc"), pinhole.Config{})
			var ops []pinhole.Op
			for i := range n {
				p := everyShape[0]
				p.InternalPort, p.ExternalPort = uint16(2000+i/2), uint16(2000+i/2)
				if i%2 == 0 {
					ops = append(ops, del(p))
				} else {
					ops = append(ops, install(p, time.Minute))
				}
			}
			err := b.Apply(ops)
			got, _ := listPinholes(t, b)
			if err != nil || len(got) != n/2 {
				t.Errorf("Apply of %d ops: %v; kernel holds %d pinholes, want nil and %d", n, err, len(got), n/2)
			}
		})
	}
}
