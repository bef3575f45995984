package pinhole

// SetFlowedRecvHook has hook told of each batch of flowed6 lookup answers
// read (flowedReader: the path and how many datagrams); nil removes it.
func SetFlowedRecvHook(hook func(path string, n int)) (restore func()) {
	prev := flowedRecvHook
	flowedRecvHook = hook
	return func() { flowedRecvHook = prev }
}
