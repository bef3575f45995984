package pinhole

import (
	"encoding/binary"
	"errors"
	"testing"

	"golang.org/x/sys/unix"
)

// nlMsg is a netlink message of type typ and sequence seq carrying data.
func nlMsg(typ uint16, seq uint32, data []byte) []byte {
	m := make([]byte, unix.NLMSG_HDRLEN, unix.NLMSG_HDRLEN+len(data)+3)
	binary.NativeEndian.PutUint32(m, uint32(unix.NLMSG_HDRLEN+len(data)))
	binary.NativeEndian.PutUint16(m[4:], typ)
	binary.NativeEndian.PutUint16(m[6:], unix.NLM_F_MULTI)
	binary.NativeEndian.PutUint32(m[8:], seq)
	m = append(m, data...)
	for len(m)%4 != 0 {
		m = append(m, 0)
	}
	return m
}

// TestCtMessagesDoneWithError (review h/revops): a dump the kernel ends
// with NLMSG_DONE carrying an error (netlink_dump's dump_done_errno: the
// dump failed part way) is that error, never "no such flow" (the callers
// then say CutsFlows false, the safe answer). Before, ctScan returned
// (false, nil) for any NLMSG_DONE (and for an NLMSG_ERROR too short to hold
// its errno): a dump cut short read as one that found no unlabelled flow.
func TestCtMessagesDoneWithError(t *testing.T) {
	errno := func(e unix.Errno) []byte {
		b := make([]byte, 4)
		binary.NativeEndian.PutUint32(b, uint32(-int32(e)))
		return b
	}
	for _, tc := range []struct {
		name string
		msg  []byte
		want error // nil: a clean end
	}{
		{"DONE, errno 0", nlMsg(unix.NLMSG_DONE, 7, errno(0)), nil},
		{"DONE, bare", nlMsg(unix.NLMSG_DONE, 7, nil), nil},
		{"DONE, ENOBUFS", nlMsg(unix.NLMSG_DONE, 7, errno(unix.ENOBUFS)), unix.ENOBUFS},
		{"DONE, EINTR", nlMsg(unix.NLMSG_DONE, 7, errno(unix.EINTR)), unix.EINTR},
		{"ERROR, EPERM", nlMsg(unix.NLMSG_ERROR, 7, errno(unix.EPERM)), unix.EPERM},
		{"ERROR, truncated", nlMsg(unix.NLMSG_ERROR, 7, []byte{1}), errors.New("any")},
	} {
		var f ctFlow
		end, found, err := ctMessages(tc.msg, 7, &f, func(*ctFlow) bool { return true })
		if !end || found {
			t.Errorf("%s: end %v, found %v; want the dump ended, nothing found", tc.name, end, found)
		}
		switch {
		case tc.want == nil && err != nil:
			t.Errorf("%s: %v; want a clean end", tc.name, err)
		case tc.want != nil && err == nil:
			t.Errorf("%s: a clean end (no flow found); want an error", tc.name)
		case tc.want != nil && tc.want.Error() != "any" && !errors.Is(err, tc.want):
			t.Errorf("%s: %v; want %v", tc.name, err, tc.want)
		}
	}
}
