package pinhole

// SetUpdatesInPlace overrides what Setup's probe found, so a test on a
// kernel with in-place updates can exercise the add, delete, add sequence
// older kernels need.
func SetUpdatesInPlace(b *Backend, v bool) {
	b.mu.Lock()
	b.inPlace = v
	b.mu.Unlock()
}
