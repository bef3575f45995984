package pinhole

import (
	"errors"
	"fmt"
	"testing"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// TestOutOfStep: which failed Flushes (as google/nftables v0.3.0 returns
// them) may leave a lasting connection out of step with the kernel's
// replies, so that flush replaces it (h/nftconn).
func TestOutOfStep(t *testing.T) {
	msgErr := func(e unix.Errno) error { return &netlink.OpError{Op: "receive", Err: e} }
	joined := func(errs ...error) error { return fmt.Errorf("conn.Receive: %w", errors.Join(errs...)) }
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
	} {
		if got := outOfStep(tc.err); got != tc.want {
			t.Errorf("%s: outOfStep(%v) = %v, want %v", tc.name, tc.err, got, tc.want)
		}
	}
}
