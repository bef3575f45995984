package pinhole

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// TestReadRepliesBatchWideError (h/lowfix): nfnetlink answers some
// batches with one error for the whole batch, its only reply, before any
// message is looked at (nfnetlink_rcv_batch: a stale NFNL_BATCH_GENID,
// ERESTART; a subsystem id out of range, EINVAL; no nf_tables,
// EOPNOTSUPP). readReplies ended the read at once only for ENOMEM and
// EPERM; any other such error waited out flushDeadline (30 s in pcpd,
// under the Backend's lock) and was reported as replies missing. The
// batches here are real, sent raw on the Backend's kind of socket
// (dialConn) in a namespace of their own: two NEWTABLEs asking for
// acknowledgements, under a batch header the kernel refuses. The read
// must end with the kernel's errno, not the deadline, and leave nothing
// queued. Per-message errors (a DELTABLE of a table not there, first or
// last) answer every message: all are read, the batch is not "ended"
// (blame may replay it), nothing is left queued.
//
// Fails without the queued check: the first two rows end at the 2 s
// deadline ("replies missing after 2s (1 reads)").
func TestReadRepliesBatchWideError(t *testing.T) {
	t.Cleanup(func(old time.Duration) func() { return func() { flushDeadline = old } }(flushDeadline))
	flushDeadline = 2 * time.Second
	const nftables = unix.NFNL_SUBSYS_NFTABLES
	table := func(typ uint16, name string) netlink.Message {
		ae := netlink.NewAttributeEncoder()
		ae.String(unix.NFTA_TABLE_NAME, name)
		attrs, err := ae.Encode()
		if err != nil {
			t.Fatal(err)
		}
		return netlink.Message{
			Header: netlink.Header{Type: netlink.HeaderType(nftables<<8 | typ),
				Flags: netlink.Request | netlink.Acknowledge | netlink.Create},
			Data: append([]byte{unix.NFPROTO_INET, unix.NFNETLINK_V0, 0, 0}, attrs...),
		}
	}
	header := func(typ uint16, resID uint16, genID uint32) netlink.Message {
		data := []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, 0, 0}
		binary.BigEndian.PutUint16(data[2:], resID)
		if genID != 0 {
			ae := netlink.NewAttributeEncoder()
			ae.Uint32(unix.NFNL_BATCH_GENID, genID)
			ae.ByteOrder = binary.BigEndian
			attrs, err := ae.Encode()
			if err != nil {
				t.Fatal(err)
			}
			data = append(data, attrs...)
		}
		return netlink.Message{Header: netlink.Header{Type: netlink.HeaderType(typ), Flags: netlink.Request}, Data: data}
	}
	for _, tc := range []struct {
		name  string
		begin netlink.Message
		msgs  []netlink.Message
		errno unix.Errno
		ended bool
	}{
		{"stale generation: one ERESTART", header(unix.NFNL_MSG_BATCH_BEGIN, nftables, 0xdeadbeef),
			[]netlink.Message{table(unix.NFT_MSG_NEWTABLE, "a"), table(unix.NFT_MSG_NEWTABLE, "b")}, unix.ERESTART, true},
		{"subsystem out of range: one EINVAL", header(unix.NFNL_MSG_BATCH_BEGIN, 0xff, 0),
			[]netlink.Message{table(unix.NFT_MSG_NEWTABLE, "a"), table(unix.NFT_MSG_NEWTABLE, "b")}, unix.EINVAL, true},
		{"first message fails: every message answered", header(unix.NFNL_MSG_BATCH_BEGIN, nftables, 0),
			[]netlink.Message{table(unix.NFT_MSG_DELTABLE, "none"), table(unix.NFT_MSG_NEWTABLE, "b")}, unix.ENOENT, false},
		{"last message fails: every message answered", header(unix.NFNL_MSG_BATCH_BEGIN, nftables, 0),
			[]netlink.Message{table(unix.NFT_MSG_NEWTABLE, "a"), table(unix.NFT_MSG_DELTABLE, "none")}, unix.ENOENT, false},
		// review h/revlowfix: a big batch, the error early and in the
		// middle, hundreds of acknowledgements after it: all queued
		// within the send (nfnl_err_deliver after the abort), none left
		// for the next batch.
		{"big batch, message 2 of 1500 fails", header(unix.NFNL_MSG_BATCH_BEGIN, nftables, 0),
			bigBatch(table, 1500, 1), unix.ENOENT, false},
		{"big batch, message 751 of 1500 fails", header(unix.NFNL_MSG_BATCH_BEGIN, nftables, 0),
			bigBatch(table, 1500, 750), unix.ENOENT, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, nl := nsConn(t, "lowfix")
			batch := append([]netlink.Message{tc.begin}, tc.msgs...)
			batch = append(batch, header(unix.NFNL_MSG_BATCH_END, nftables, 0))
			if _, err := nl.SendMessages(batch); err != nil {
				t.Fatal(err)
			}
			_ = nl.SetReadDeadline(time.Now().Add(flushDeadline))
			ended, err := readReplies(nl, len(tc.msgs))
			_ = nl.SetReadDeadline(time.Time{})
			t.Logf("readReplies: ended %v, %v", ended, err)
			if !errors.Is(err, tc.errno) || errors.Is(err, os.ErrDeadlineExceeded) {
				t.Errorf("readReplies: %v; want the kernel's %v, not a deadline", err, tc.errno)
			}
			if ended != tc.ended || errors.Is(err, errBatchEnded) != tc.ended {
				t.Errorf("ended %v (batch-wide %v), want %v", ended, errors.Is(err, errBatchEnded), tc.ended)
			}
			if n := drain(nl); n != 0 {
				t.Errorf("%d datagrams left queued after the batch's replies", n)
			}
		})
	}
}

// bigBatch is n NEWTABLE messages, the one at bad a DELTABLE of a table
// that does not exist (ENOENT: the batch aborted, every message answered).
func bigBatch(table func(uint16, string) netlink.Message, n, bad int) []netlink.Message {
	out := make([]netlink.Message, n)
	for i := range out {
		out[i] = table(unix.NFT_MSG_NEWTABLE, fmt.Sprintf("t%d", i))
	}
	out[bad] = table(unix.NFT_MSG_DELTABLE, "none")
	return out
}
