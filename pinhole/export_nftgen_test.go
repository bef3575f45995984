package pinhole

// SetForeignReadHook makes each ForeignDNAT read call h once it has
// listed the chains (nil: none).
func SetForeignReadHook(h func()) { foreignReadHook = h }

// ForgetForeign makes b's next ForeignDNAT read the ruleset whatever
// changed (benchmarks: the cost of a read).
func ForgetForeign(b *Backend) {
	b.foreignMu.Lock()
	defer b.foreignMu.Unlock()
	b.foreignGen.last = nil
}
