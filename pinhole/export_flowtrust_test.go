package pinhole

import (
	"github.com/google/nftables"
)

// FailFlushes makes the Backend's next n flushes fail at the kernel's
// commit (QueueCommitFailure's unbound anonymous set, each time), then
// flush as before (h/flowtrust).
func FailFlushes(b *Backend, n int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.flushHook = func(c *nftables.Conn) {
		if n--; n <= 0 {
			b.flushHook = nil
		}
		_ = c.AddSet(&nftables.Set{Table: b.table, Name: "__set%d", ID: 4711, Anonymous: true, Constant: true,
			KeyType: nftables.TypeIPAddr}, nil)
	}
}

// FlowedTampered is what the watch does once it sees flowed6's elements
// deleted by another process or loses what it was told (flowedlife.go).
func FlowedTampered(b *Backend) { b.flowedTampered() }

// SetFlowedSize sets flowed6's size for the sets Setups make from now on,
// until restore is called; tests using it must not run in parallel.
func SetFlowedSize(n int) (restore func()) {
	old := flowedSize
	flowedSize = n
	return func() { flowedSize = old }
}
