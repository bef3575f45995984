package pinhole

// ConntrackChecks runs the conntrack reads of a Backend's first Setup
// under its lock, as Setup does (BenchmarkFirstSetupConntrack): which of
// them is asked is dnat's and pinholes' choice.
func ConntrackChecks(b *Backend, dnat, pinholes bool) (dnatFound, pinholesFound bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if dnat {
		dnatFound = b.dnatFlowsUnlabelled()
	}
	if pinholes {
		pinholesFound = b.pinFlowsUnlabelled()
	}
	return dnatFound, pinholesFound
}
