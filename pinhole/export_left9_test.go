package pinhole

// OnSetupReads makes fn run as each of Setup's reads of conntrack begins
// (what: "labelled", whether to lay the cut out disarmed; "pin" and
// "dnat", whether flows were admitted or DNAT-ed unlabelled), told
// whether the Backend's lock was held then, until restore.
func OnSetupReads(fn func(what string, locked bool)) (restore func()) {
	testHookSetupRead = func(b *Backend, what string) {
		free := b.mu.TryLock()
		if free {
			b.mu.Unlock()
		}
		fn(what, !free)
	}
	return func() { testHookSetupRead = nil }
}
