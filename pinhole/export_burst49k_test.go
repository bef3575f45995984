package pinhole

// SetLeaseGCForTest asks for the lease sets' gc interval again, as Setup
// does after its layout (setgc.go), and returns the error Setup drops.
func (b *Backend) SetLeaseGCForTest() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.setLeaseGC()
}
