package pinhole

// OnSetupLayout makes fn run right before each Setup's layout transaction
// is sent (b.mu held), until restore.
func OnSetupLayout(fn func()) (restore func()) {
	testHookSetupLayout = fn
	return func() { testHookSetupLayout = nil }
}
