package pinhole

import (
	"errors"
	"fmt"
	"os"
	"testing"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// TestOutOfStep: which failed Flushes (as google/nftables v0.3.0 returns
// them) may leave a lasting connection out of step with the kernel's
// replies, so that flush replaces it (h/nftconn).
func TestOutOfStep(t *testing.T) {
	msgErr := func(e error) error { return &netlink.OpError{Op: "receive", Err: e} }
	joined := func(errs ...error) error { return fmt.Errorf("conn.Receive: %w", errors.Join(errs...)) }
	missing := func(n int) error {
		return fmt.Errorf("replies missing after 30s (%d reads): %w", n, os.ErrDeadlineExceeded)
	}
	for _, tc := range []struct {
		name string
		err  error
		want bool
	}{
		{"success", nil, false},
		{"per-message conflict", joined(msgErr(unix.EEXIST)), false},
		{"blame probe: conflict and sentinel", joined(msgErr(unix.EEXIST), msgErr(unix.EINVAL)), false},
		{"ENOBUFS: Flush returned at once", msgErr(unix.ENOBUFS), true},
		{"EPERM: Flush returned at once", msgErr(unix.EPERM), true},
		{"ENOMEM: batch-wide error", joined(msgErr(unix.ENOMEM)), true},
		{"ENOMEM among others", joined(msgErr(unix.EEXIST), msgErr(unix.ENOMEM)), true},
		{"reply not an errno", joined(errors.New("error delivered in message: [1 2]")), true},
		{"send failed", fmt.Errorf("SendMessages: %w", unix.EMSGSIZE), true},
		// flush's read deadline (h/nftdeadline), as readReplies reports it.
		{"ENOMEM, then the read deadline", joined(msgErr(unix.ENOMEM), missing(3)), true},
		{"read deadline alone", joined(missing(1)), true},
		{"conflict, then the read deadline", joined(msgErr(unix.EEXIST), missing(1)), true},
	} {
		if got := outOfStep(tc.err); got != tc.want {
			t.Errorf("%s: outOfStep(%v) = %v, want %v", tc.name, tc.err, got, tc.want)
		}
	}
}

// TestUnread: flushConn makes Flush only send (its reads fail at once on
// a past read deadline) and counts its failed reads as the messages sent;
// a Flush that failed otherwise (encoding, the send) read nothing
// (h/nftenomem).
func TestUnread(t *testing.T) {
	msgErr := func(e error) error { return &netlink.OpError{Op: "receive", Err: e} }
	dl := os.ErrDeadlineExceeded
	// As Flush builds it: errors.Join one reply's error at a time.
	var flushErr error
	for range 3 {
		flushErr = errors.Join(flushErr, msgErr(dl))
	}
	for _, tc := range []struct {
		name     string
		err      error
		n        int
		sentOnly bool
	}{
		{"nothing to send", nil, 0, true},
		{"three messages sent", fmt.Errorf("conn.Receive: %w", flushErr), 3, true},
		{"send failed", fmt.Errorf("SendMessages: %w", unix.EMSGSIZE), 0, false},
		{"a reply read after all", fmt.Errorf("conn.Receive: %w", errors.Join(flushErr, msgErr(unix.EEXIST))), 3, false},
	} {
		n, sentOnly := unread(tc.err)
		if n != tc.n || sentOnly != tc.sentOnly {
			t.Errorf("%s: unread = %d, %v; want %d, %v", tc.name, n, sentOnly, tc.n, tc.sentOnly)
		}
	}
}
