package pinhole

import "golang.org/x/sys/unix"

// SetFlowedRecvHook has hook told of each batch of flowed6 lookup answers
// read (flowedReader: the path and how many datagrams); nil removes it.
func SetFlowedRecvHook(hook func(path string, n int)) (restore func()) {
	prev := flowedRecvHook
	flowedRecvHook = hook
	return func() { flowedRecvHook = prev }
}

// SetFlowedDumpMax sets the most elements flowed6 may count for a walk to
// read it whole (flowedsmall.go; negative: never, the lookups alone).
func SetFlowedDumpMax(n int) (restore func()) {
	prev := flowedDumpMax
	flowedDumpMax = n
	return func() { flowedDumpMax = prev }
}

// SetFlowedDumpHook has hook told of each dump of flowed6 read (the count
// it was taken at, whether it came whole in its first datagram); nil
// removes it.
func SetFlowedDumpHook(hook func(count int, whole bool)) (restore func()) {
	prev := flowedDumpHook
	flowedDumpHook = hook
	return func() { flowedDumpHook = prev }
}

// FlowedSetCount is flowed6's element count as the kernel gives it
// (NFTA_SET_COUNT; -1 when it gives none), read on b's lookup socket.
func FlowedSetCount(b *Backend) (int, bool) {
	f := &b.flowed
	f.mu.Lock()
	defer f.mu.Unlock()
	c := b.flowedConn()
	if c == nil {
		return 0, false
	}
	rc, err := c.SyscallConn()
	if err != nil {
		return 0, false
	}
	n, _, ok := b.flowedReaderOf().setCount(rc, b.flowedSetRequest(unix.NFT_MSG_GETSET, unix.NFTA_SET_TABLE, unix.NFTA_SET_NAME, 0))
	return n, ok
}
