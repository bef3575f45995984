package pinhole

import "net/netip"

// FlowedFromDump is what one read of flowed6 whole (flowedFromDump,
// flowedsmall.go) answers for asked, before any lookup: seen[a] true
// (in the set), false (known absent), or unset (left to the lookups).
func FlowedFromDump(b *Backend, asked []netip.Addr) map[netip.Addr]bool {
	f := &b.flowed
	f.mu.Lock()
	defer f.mu.Unlock()
	seen := map[netip.Addr]bool{}
	b.flowedFromDump(asked, seen)
	return seen
}
