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
	timeout := os.ErrDeadlineExceeded
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
		// flush's read deadline (h/nftdeadline), as timedOut leaves it.
		{"ENOMEM, then the read deadline", timedOut(joined(errors.Join(msgErr(unix.ENOMEM), msgErr(timeout)), msgErr(timeout))), true},
		{"read deadline alone", timedOut(joined(msgErr(timeout))), true},
		{"conflict, then the read deadline", timedOut(joined(msgErr(unix.EEXIST), msgErr(timeout))), true},
	} {
		if got := outOfStep(tc.err); got != tc.want {
			t.Errorf("%s: outOfStep(%v) = %v, want %v", tc.name, tc.err, got, tc.want)
		}
	}
}

// TestTimedOut: timedOut keeps the kernel's own errors of a Flush that
// read past flushDeadline and folds its many "i/o timeout" reads into one.
func TestTimedOut(t *testing.T) {
	msgErr := func(e error) error { return &netlink.OpError{Op: "receive", Err: e} }
	dl := os.ErrDeadlineExceeded
	// As Flush builds it: errors.Join one reply's error at a time.
	var flushErr error
	for _, e := range []error{msgErr(unix.ENOMEM), msgErr(dl), msgErr(dl), msgErr(dl)} {
		flushErr = errors.Join(flushErr, e)
	}
	for _, tc := range []struct {
		name     string
		err      error
		wantMsg  string
		enomem   bool
		deadline bool
	}{
		{"no deadline: unchanged", fmt.Errorf("conn.Receive: %w", msgErr(unix.EEXIST)), "conn.Receive: netlink receive: file exists", false, false},
		{"ENOMEM and three timeouts", fmt.Errorf("conn.Receive: %w", flushErr),
			"netlink receive: cannot allocate memory\nreplies missing after 30s (3 reads): i/o timeout", true, true},
		{"timeouts only", fmt.Errorf("conn.Receive: %w", errors.Join(errors.Join(msgErr(dl)), msgErr(dl))),
			"replies missing after 30s (2 reads): i/o timeout", false, true},
	} {
		got := timedOut(tc.err)
		if got.Error() != tc.wantMsg || errors.Is(got, unix.ENOMEM) != tc.enomem || errors.Is(got, dl) != tc.deadline {
			t.Errorf("%s: timedOut = %q (ENOMEM %v, deadline %v); want %q (%v, %v)", tc.name, got,
				errors.Is(got, unix.ENOMEM), errors.Is(got, dl), tc.wantMsg, tc.enomem, tc.deadline)
		}
	}
}
