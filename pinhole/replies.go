package pinhole

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// How nfnetlink answers a batch (nfnetlink_rcv_batch, Linux 6.18), all
// within the sender's sendmsg, so every reply is queued by the time the
// send returns:
//
//   - each message passes, the commit succeeds: an acknowledgement per
//     message (pcpd's all ask for one), in order, after the notifications
//     of the rules it added or replaced (NLM_F_ECHO: readReplies);
//     committed;
//   - some message fails (not ENOMEM): the batch is aborted
//     (NFNL_BATCH_FAILURE), then nfnl_err_deliver sends a reply per
//     message in order, each failing one its errno;
//   - a message fails with ENOMEM, or the kernel cannot record an error
//     (commit a1a64a151dae, 2023): the errors collected are dropped, one
//     ENOMEM is sent for the whole batch, the batch aborted: the only
//     reply;
//   - every message passes but the commit fails (nf_tables_commit: an
//     anonymous set no rule binds, EINVAL; a driver refusing an offload;
//     ENOMEM preparing a chain): the batch is aborted, its error sent
//     first, then an acknowledgement per message: one reply more than
//     messages;
//   - before any message is looked at (a batch header the kernel refuses,
//     no nf_tables, a stale generation, the clone of the batch failing
//     with ENOMEM; EPERM from nfnetlink_rcv): one error; nothing applied.
//
// So an error reply, whatever its place, means nothing of the batch was
// applied, and one with ENOMEM or EPERM ends the batch's replies but for
// a commit's acknowledgements, which say nothing more. ENOBUFS is no
// reply: replies past the receive buffer were dropped, the batch possibly
// committed. An error reply for the whole batch other than ENOMEM and
// EPERM (EINVAL: a subsystem id out of range or a batch attribute refused;
// EOPNOTSUPP: no nf_tables; ERESTART: a stale NFNL_BATCH_GENID) is its
// only reply too: since every reply is queued by the time the send
// returns, once an error reply is read the read goes on only while more
// are queued (queued), and ends at once when none are (h/lowfix; before,
// such a batch waited out flushDeadline under the Backend's lock).
// A batch answered with no reply at all (a malformed message, a second
// batch header, a fatal signal: the errors collected are dropped) still
// waits for flushDeadline: google/nftables sends none such.

// flushConn sends the batch queued on c and reads its replies. With nl,
// c's netlink socket (the Backend's own connection, Healthy's), it reads
// them itself: google/nftables' Flush reads one reply per message whatever
// they say, so it waited out flushDeadline after an ENOMEM (the only
// reply) under the Backend's lock, stalling the engine 30 s per batch,
// and it left a failed commit's extra acknowledgement queued, read by the
// next batch as its own (TestApplyAfterCommitFailure: batches the kernel
// took reported failed). Flush is made to only send, its reads failing at
// once on a read deadline in the past; readReplies then reads what the
// kernel sent, with flushDeadline counted from the end of the send (a
// send waiting for the commit lock no longer eats into it). inStep
// reports whether nl may be used again; false: replace it (a reply that
// ends the batch, replies missing or dropped, extra replies). Without nl,
// Flush as it is (fake or fallback connections).
func flushConn(c *nftables.Conn, nl *netlink.Conn) (inStep bool, err error) {
	if nl == nil {
		err := c.Flush()
		return !outOfStep(err), err
	}
	_ = nl.SetReadDeadline(time.Unix(1, 0))
	ferr := c.Flush()
	n, sentOnly := unread(ferr)
	if !sentOnly || n == 0 { // failed before its first read (encoding, send), or nothing to send
		_ = nl.SetReadDeadline(time.Time{})
		return !outOfStep(ferr), ferr
	}
	if sentHook != nil {
		sentHook(n)
	}
	_ = nl.SetReadDeadline(time.Now().Add(flushDeadline))
	ended, err := readReplies(nl, n)
	_ = nl.SetReadDeadline(time.Time{})
	if ended {
		return false, err
	}
	if err != nil {
		// A failed commit's last acknowledgement (its error came first):
		// already queued, so a non-blocking read finds it. Only after an
		// error reply: n acknowledgements say the batch committed, and no
		// more follow them (a syscall per batch saved: BenchmarkApply).
		return drain(nl) == 0, err
	}
	return true, nil
}

// sentHook, when set (tests only: CountSent), is told how many messages
// each batch flushConn reads the replies of sent.
var sentHook func(n int)

// unread counts the reads a Flush made with its read deadline already
// past: each fails at once, reading nothing. sentOnly is false when err
// holds anything else (Flush failed before reading).
func unread(err error) (n int, sentOnly bool) {
	if err == nil {
		return 0, true
	}
	sentOnly = true
	var walk func(error)
	walk = func(e error) { // Flush joins its errors one by one: nested joins
		if m, ok := e.(interface{ Unwrap() []error }); ok {
			for _, x := range m.Unwrap() {
				walk(x)
			}
		} else if _, op := e.(*netlink.OpError); !op && errors.Unwrap(e) != nil {
			walk(errors.Unwrap(e))
		} else if errors.Is(e, os.ErrDeadlineExceeded) {
			n++
		} else {
			sentOnly = false
		}
	}
	walk(err)
	return n, sentOnly
}

// readReplies reads the replies to a batch of n messages, each asking for
// an acknowledgement (an error per failing message, joined, wrapped as
// google/nftables' Flush does), but stops at a reply that ends the batch
// (ENOMEM, EPERM; or any error reply with nothing queued after it:
// errBatchEnded), at a read that fails (ENOBUFS) and at flushDeadline
// (no reply at all). ended: it stopped early, nl is out of step.
//
// A reply is an NLMSG_ERROR message (an acknowledgement, errno 0, or an
// error), each in a datagram of its own (netlink_ack), quoting only its
// message's header (an error too on the Backend's sockets: capAck); only
// its errno is read. Anything else is a notification the batch asked
// for: google/nftables sets NLM_F_ECHO on every rule it adds or
// replaces, so a committed batch's replies start with its rules' NEWRULE
// (and, for a replaced one, DELRULE) coalesced into datagrams of about a
// page (nft_commit_notify), and a NEWGEN when
// its first message asked for an echo. They are skipped, however they are
// split: google/nftables' receiveAckAware, which flushConn mirrored until
// review h/revenomem, skipped a datagram of them only when its last
// message's type had NLMSG_OVERRUN's bits (NEWRULE has, DELRULE has not),
// and took the next datagram for the acknowledgement: a committed batch
// of ReplaceRules reported failed (TestFlushConnEchoedRules).
func readReplies(nl *netlink.Conn, n int) (ended bool, err error) {
	var errs error
	for read := 0; read < n; {
		if errs != nil && !queued(nl) {
			// An error reply came and nothing follows it: an error for
			// the whole batch, its only reply (the others are queued
			// with the first: a per-message error's batch answers every
			// message, a failed commit's has its acknowledgements after).
			return true, fmt.Errorf("conn.Receive: %w", errors.Join(errs,
				fmt.Errorf("%d of %d replies: %w", read, n, errBatchEnded)))
		}
		msgs, e := nl.Receive()
		if e == nil {
			for _, m := range msgs {
				if m.Header.Type == netlink.Error { // checked by Receive: an acknowledgement
					read++
				}
			}
			continue
		}
		if errors.Is(e, os.ErrDeadlineExceeded) {
			timeout := fmt.Errorf("replies missing after %v (%d reads): %w", flushDeadline, n-read, os.ErrDeadlineExceeded)
			return true, fmt.Errorf("conn.Receive: %w", errors.Join(errs, timeout))
		}
		read++
		errs = errors.Join(errs, e)
		if !kernelReply(e) || errors.Is(e, unix.ENOMEM) || errors.Is(e, unix.EPERM) {
			return true, fmt.Errorf("conn.Receive: %w", errs)
		}
	}
	if errs != nil {
		return false, fmt.Errorf("conn.Receive: %w", errs)
	}
	return false, nil
}

// errBatchEnded marks a batch answered with fewer replies than messages,
// its error for the whole of it (readReplies): about no one message, so
// Apply's blame does not replay prefixes of the batch to find one.
var errBatchEnded = errors.New("the kernel answered the whole batch with one error")

// queued reports whether a datagram (or a socket error, such as ENOBUFS)
// is waiting on nl, without reading it or waiting (poll(2), no timeout).
// When it cannot tell, it says true: the read then waits as before.
func queued(nl *netlink.Conn) bool {
	rc, err := nl.SyscallConn()
	if err != nil {
		return true
	}
	ready := true
	if err := rc.Control(func(fd uintptr) {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for {
			k, err := unix.Poll(fds, 0)
			if err == unix.EINTR {
				continue
			}
			ready = err != nil || k > 0
			return
		}
	}); err != nil {
		return true
	}
	return ready
}

// kernelReply reports whether err is an error reply of the kernel's (an
// errno in an NLMSG_ERROR message), not a failed read: mdlayher/netlink
// gives the former as a bare errno, a read's wrapped in os.SyscallError.
func kernelReply(err error) bool {
	var oe *netlink.OpError
	if !errors.As(err, &oe) {
		return false
	}
	_, ok := oe.Err.(syscall.Errno)
	return ok
}

// drain reads and drops whatever is queued on nl without waiting, and
// returns how many datagrams (or pending socket errors, such as ENOBUFS)
// it found. The kernel queues a request's replies within its send, so
// what is queued between requests belongs to none.
func drain(nl *netlink.Conn) int {
	rc, err := nl.SyscallConn()
	if err != nil {
		return 0
	}
	found := 0
	var buf [256]byte   // a datagram longer than this is dropped whole
	for found < 1<<20 { // bounded, should a socket error repeat
		var rerr error
		if err := rc.Control(func(fd uintptr) {
			_, _, rerr = unix.Recvfrom(int(fd), buf[:], unix.MSG_DONTWAIT)
		}); err != nil || rerr == unix.EAGAIN || rerr == unix.EBADF {
			return found
		}
		found++
	}
	return found
}
