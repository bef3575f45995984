package pinhole_test

import (
	"net/netip"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/pcpd/pcpd/internal/netlab"
	"github.com/pcpd/pcpd/pinhole"
)

// TestBatchSocketsCapAcks (h/capack): every socket of the Backend's that
// sends transactions (Apply's, Healthy's kept one, flowed6's) sets
// NETLINK_CAP_ACK, so that the kernel's error replies to a refused batch
// quote a failing message's header, not the message (a NEWSETELEM of 256
// elements: 4 168 bytes, each allocated, copied and read; 36 with it).
// Also after the main connection is replaced (resetConn: dialConn again).
func TestBatchSocketsCapAcks(t *testing.T) {
	b := newBackend(t, netlab.NewNS(t, "capack"), pinhole.Config{})
	apply(t, b, install(everyShape[0], time.Minute))
	if err := b.Healthy(); err != nil {
		t.Fatalf("Healthy: %v", err)
	}
	b.Reflowed([]netip.Addr{netip.MustParseAddr("2001:db8:ff00::1")})
	want := map[string]bool{"main": true, "health": true, "flowed": true}
	got, err := pinhole.CapAcks(b)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("NETLINK_CAP_ACK on the Backend's sockets (-want +got):\n%s", diff)
	}
	// A failed commit (QueueCommitFailure: one reply more than messages)
	// replaces the main connection; blame's retry then applies the op.
	before := pinhole.ConnOf(b)
	pinhole.QueueCommitFailure(b)
	apply(t, b, install(everyShape[1], time.Minute))
	if pinhole.ConnOf(b) == before {
		t.Fatal("the main connection was not replaced after a failed commit")
	}
	if got, err := pinhole.CapAcks(b); err != nil || !got["main"] {
		t.Errorf("after the main socket was replaced: NETLINK_CAP_ACK %v (%v); want true", got["main"], err)
	}
}
