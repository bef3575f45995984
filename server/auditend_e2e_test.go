package server

import (
	"runtime"
	"strings"
	"testing"
	"time"
)

// auditGoroutines counts the goroutines running an audit or its dump
// (the server's audit, pinhole's listSets).
func auditGoroutines() int {
	buf := make([]byte, 1<<22)
	n := 0
	for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
		if strings.Contains(g, "server.(*Server).audit(") || strings.Contains(g, "pinhole.listSets(") {
			n++
		}
	}
	return n
}

// stopHeld ends l's Serve while h holds its audit's dump: it fails the
// test if Serve has not returned within watchBound (it waits for the
// dump), and then lets the dump go to end it.
func stopHeld(t *testing.T, l *lab, h *heldList) {
	t.Helper()
	l.cancel()
	select {
	case err := <-l.done:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
	case <-time.After(watchBound):
		h.let()
		<-l.done
		t.Errorf("Serve had not returned %v after its ctx ended while the audit's dump was in progress (it waited for the dump)", watchBound)
	}
	l.st.Close()
	l.cancel = nil
}

// TestE2EStopDuringAuditDump (h/auditend): Serve's ctx ending (SIGTERM,
// systemctl stop) while the start's audit dumps (held after reading the
// kernel: heldList, which ends its hold with ctx as the Backend's
// ListContext ends a dump) returns without waiting for the dump's rest,
// writes nothing from it (an element added by hand before the start, an
// orphan the dump read, is still in the kernel: the deaf watch leaves it
// to the audit), and leaves no audit running. Before, Serve waited out
// the dump: 4.9-6.2 s at 100 000 IPv4 mappings (BENCHMARKS.md item 77),
// here for ever (the hold).
func TestE2EStopDuringAuditDump(t *testing.T) {
	l := watchLab(t)
	l.stop()
	l.addByHand(t, 444)
	h := newHeldList(l.fw)
	h.armed.Store(true)
	l.firewall = h
	t.Cleanup(h.let)
	l.start()
	select {
	case <-h.dumped:
	case <-time.After(watchBound):
		t.Fatal("the start's audit did not dump")
	}
	stopHeld(t, l, h)
	if n := auditGoroutines(); n != 0 {
		t.Errorf("%d audit goroutines left after Serve returned", n)
	}
	if _, held := l.holds(6, l.topo.ClientV6, 444); !held {
		t.Error("the element added by hand before the start is gone: the stopped audit acted on its dump")
	}
}
