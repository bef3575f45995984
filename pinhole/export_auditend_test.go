package pinhole

// ListSetHookForTest sets the hook List calls before it reads each
// pinhole set, with the set's index (0 first); nil clears it.
func ListSetHookForTest(f func(set int)) { listSetHook = f }
