package pinhole

// CloseHealthConn closes b's kept Healthy connection as a check that
// failed does (Healthy: the next check dials another), and returns its
// port id (0: none was open).
func CloseHealthConn(b *Backend) uint32 {
	b.healthMu.Lock()
	defer b.healthMu.Unlock()
	if b.healthConn.nl == nil {
		return 0
	}
	port, _ := portOf(b.healthConn.nl)
	b.healthConn.close()
	return port
}
