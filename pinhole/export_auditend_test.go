package pinhole

// ListSetHookForTest sets the hook List calls before it reads each
// pinhole set, with the set's index (0 first); nil clears it.
func ListSetHookForTest(f func(set int)) { listSetHook = f }

// ListCutHookForTest sets the hook ListContext calls once it has set the
// read deadline that cuts its dump (its ctx ended); nil clears it.
func ListCutHookForTest(f func()) { listCutHook = f }
